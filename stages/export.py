"""Stage kind `export`: the fine-tuned student as ONNX (fp32, and int8 when asked), checked for parity.

Reads params: task, resources, export. Takes: prepared (prepare.data), student
(finetune.model). Writes: onnx (onnx). Only in specs with an `export:` section. Runs
evlm_cli.recipe.export.run_export(). Declared in evlm_cli/pipeline/registry.py; DVC runs it as `evlm
stage export --params FILE ...`, and this file takes the same arguments.
"""

import sys

from evlm_cli.pipeline.entry import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("export", sys.argv[1:]))
