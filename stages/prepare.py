"""Stage kind `prepare`: read the task dataset once; write tensors and answers, tokenised as the pairs are.

Reads params: seed, task, data. Takes: pairs (prepare_pairs.data), and the files the spec
names. Writes: data (data). Runs evlm_cli.recipe.prepare.run_prepare(). Declared in
evlm_cli/pipeline/registry.py; DVC runs it as `evlm stage prepare --params FILE ...`, and this file
takes the same arguments.
"""

import sys

from evlm_cli.pipeline.entry import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("prepare", sys.argv[1:]))
