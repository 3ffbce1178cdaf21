"""DVC stage: read the dataset once and write tensors that later stages read fast."""

from evlm_cli.data.prepare import prepare
from evlm_cli.stage import stage_main

if __name__ == "__main__":
    stage_main("prepare", ["out"], lambda spec, a: prepare(spec, a.out))
