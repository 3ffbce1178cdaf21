"""Every PNG evlm writes is written, decodes, and has a sane size."""

from click.testing import CliRunner
from PIL import Image

from evlm_cli.cli.main import main
from evlm_cli.report.plots import allocation_grid, read_log, run_plot
from tests.test_seeds import three_seeds  # noqa: F401  (a fixture)

MASKS = {"encoders": {
    "vision": {"layers": [{"layer": 0, "heads": {"kept": 3, "total": 4}, "ffn": {"kept": 100,
                                                                                "total": 512}},
                          {"layer": 1, "heads": {"kept": 0, "total": 4}, "ffn": {"kept": 512,
                                                                                "total": 512}}]},
    "fusion": {"layers": [{"layer": 0, "heads": {"kept": 1, "total": 4},
                           "cross_heads": {"kept": 2, "total": 4},
                           "ffn": {"kept": 10, "total": 512}}]}}}


def assert_png(path, min_side=300, max_side=4000):
    with Image.open(path) as image:
        image.load()  # decodes every pixel, not only the header
        assert image.format == "PNG"
        assert min_side <= min(image.size) and max(image.size) <= max_side, image.size


def test_the_allocation_grid_is_the_share_kept_per_layer():
    grids = {name: (rows, labels) for name, rows, labels in allocation_grid(MASKS)}
    assert grids["vision"] == ([[0.75, 0.0], [100 / 512, 1.0]], ["heads", "ffn"])
    assert grids["fusion"] == ([[0.25], [0.5], [10 / 512]], ["heads", "cross heads", "ffn"])


def test_show_plot_draws_the_allocation_and_the_curves(tmp_path):
    log = tmp_path / "prune.csv"
    log.write_text("step,loss,target_sparsity,expected_sparsity/overall\n"
                   + "".join(f"{s},{10 / s},{min(s / 50, 0.5)},{min(s / 60, 0.5)}\n"
                             for s in range(1, 101)))
    finetune = tmp_path / "finetune.csv"
    finetune.write_text("step,loss\n1,0.5\n2,0.4\n3,\n")  # an empty cell is skipped
    assert read_log(finetune)["loss"] == [0.5, 0.4]
    assert read_log(tmp_path / "missing.csv") == {}
    out = run_plot({"name": "a", "masks": MASKS}, {"a-prune": log, "a-finetune": finetune},
                   tmp_path / "show.png")
    assert_png(out)
    # a run that has not pruned yet still gets a picture, saying so
    assert_png(run_plot({"name": "b", "masks": None}, {}, tmp_path / "empty.png"))


def test_diff_plot_draws_the_pareto_view_with_seeds(three_seeds):  # noqa: F811
    result = CliRunner().invoke(main, ["diff", "a", "b", "--plot", "pareto.png"])
    assert result.exit_code == 0, result.output
    assert "wrote pareto.png" in result.output
    assert_png(three_seeds / "pareto.png")
    assert not list(three_seeds.glob("*.tmp*"))  # written atomically: no leftovers
