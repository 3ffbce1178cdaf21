"""Stage kind `prepare_pairs`: read the pre-training image-text pairs once; write tensors and the tokenizer every task uses.

Reads params: seed, pairs. Takes: the files the spec names. Writes: data (data). Runs
evlm_cli.recipe.prepare.run_prepare_pairs(). Declared in evlm_cli/pipeline/registry.py; DVC runs it
as `evlm stage prepare_pairs --params FILE ...`, and this file takes the same arguments.
"""

import sys

from evlm_cli.pipeline.entry import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("prepare_pairs", sys.argv[1:]))
