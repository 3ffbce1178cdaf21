"""The shipped specs, and stand-in files for the ones at the paper's scale."""

from pathlib import Path

import yaml

from evlm_cli.core.config import PATH_KEYS

SPECS = Path(__file__).resolve().parents[2] / "specs"
# Recipes at the paper's scale name datasets and checkpoints no test has: the demo-spec tests
# (valid as they stand, extending the default, stored params) leave them out, and they are
# validated against stand-in files instead (`write_stand_ins`).
PAPER_SPECS = ("efficientvlm_vqa",)
DEMO_SPECS = sorted(path for path in SPECS.glob("*.yaml") if path.stem not in PAPER_SPECS)


def _safetensors_bytes() -> bytes:
    header = b'{"__metadata__":{"format":"pt"}}'
    return len(header).to_bytes(8, "little") + header


def write_stand_ins(spec_file: Path, folder: Path) -> list[Path]:
    """An empty stand-in under `folder` for every path the spec names: folders, JSON files
    holding [], and checkpoint files that look like safetensors. Returns what it wrote."""
    spec = yaml.safe_load(spec_file.read_text(encoding="utf-8"))
    written = []
    for path_key in PATH_KEYS:
        node = spec
        for key in path_key.key:
            node = node.get(key) if isinstance(node, dict) else None
        for value in node if isinstance(node, list) else [node]:
            if value is None:
                continue
            path = folder / value
            if path_key.names == "directory":
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.suffix == ".json":
                    path.write_text("[]\n", encoding="utf-8")
                else:
                    path.write_bytes(_safetensors_bytes())
            written.append(path)
    return written
