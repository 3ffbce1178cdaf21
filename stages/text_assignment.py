"""Stage kind `text_assignment`: NLVR2's domain pre-training (X-VLM's text assignment): the pre-trained teacher, fusion layers paired, learns on the pairs which of two images a caption describes.

Reads params: seed, device, precision, resources, text_assignment. Takes: pairs
(prepare_pairs.data), pretrained (teacher_pretrain.model), and the files the spec names.
Writes: model (model), log (log.csv, plots). Runs
evlm_cli.recipe.teacher.run_text_assignment(). Declared in evlm_cli/pipeline/registry.py; DVC
runs it as `evlm stage text_assignment --params FILE ...`, and this file takes the same
arguments.
"""

import sys

from evlm_cli.pipeline.entry import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("text_assignment", sys.argv[1:]))
