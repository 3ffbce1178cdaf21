"""DVC stage: read the dataset once and write tensors that later stages read fast."""

from evlm_cli.data.prepare import prepare
from evlm_cli.io import atomic_path
from evlm_cli.stage import stage_main


def body(spec, a):
    with atomic_path(a.out) as tmp:  # the folder appears whole or not at all
        return prepare(spec, tmp)


if __name__ == "__main__":
    stage_main("prepare", ["out"], body)
