"""Every PNG evlm writes is written, decodes, has a sane size, and has drawn what it promises
in each panel (a blank figure, or a panel left empty, fails)."""

import numpy as np
from click.testing import CliRunner
from PIL import Image

from evlm_cli.cli.main import main
from evlm_cli.report.plots import allocation_grid, read_log, run_plot
from evlm_cli.report.runs import Run
from tests.helpers.runs import three_seeds  # noqa: F401  (a fixture)

MASKS = {"encoders": {
    "vision": {"layers": [{"layer": 0, "heads": {"kept": 3, "total": 4}, "ffn": {"kept": 100,
                                                                                "total": 512}},
                          {"layer": 1, "heads": {"kept": 0, "total": 4}, "ffn": {"kept": 512,
                                                                                "total": 512}}]},
    "fusion": {"layers": [{"layer": 0, "heads": {"kept": 1, "total": 4},
                           "cross_heads": {"kept": 2, "total": 4},
                           "ffn": {"kept": 10, "total": 512}}]}}}
# A pixel whose channels differ this much is coloured: data (markers, bars, heatmap cells,
# curves), not the black, grey and white of frames, ticks and text.
CHROMA = 60
# The share of a panel's pixels that its data colours, at least: far above anti-aliasing specks.
DRAWN = 0.002


def assert_png(path, min_side=300, max_side=4000) -> np.ndarray:
    """The decoded RGB pixels of a PNG of a sane size."""
    with Image.open(path) as image:
        image.load()  # decodes every pixel, not only the header
        assert image.format == "PNG"
        assert min_side <= min(image.size) and max(image.size) <= max_side, image.size
        return np.asarray(image.convert("RGB")).astype(int)


def panels(pixels: np.ndarray, rows: int, columns: int) -> list[list[np.ndarray]]:
    """The figure cut into its grid of panels (`plt.subplots(rows, columns)`)."""
    height, width = pixels.shape[0] // rows, pixels.shape[1] // columns
    return [[pixels[r * height:(r + 1) * height, c * width:(c + 1) * width]
             for c in range(columns)] for r in range(rows)]


def coloured(panel: np.ndarray) -> float:
    """The share of a panel's pixels that are coloured."""
    return float(((panel.max(axis=-1) - panel.min(axis=-1)) > CHROMA).mean())


def inked(panel: np.ndarray) -> float:
    """The share of a panel's pixels that are not white (text and frames too)."""
    return float((panel.min(axis=-1) < 200).mean())


def test_the_checks_tell_a_blank_figure_from_a_drawn_one(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[1].plot([0, 1], [0, 1], lw=3)  # the left panel keeps its frame and ticks, no data
    fig.savefig(tmp_path / "half.png", dpi=100)
    plt.close(fig)
    left, right = panels(assert_png(tmp_path / "half.png"), 1, 2)[0]
    assert coloured(left) < DRAWN <= coloured(right)
    blank = plt.figure(figsize=(8, 4))
    blank.savefig(tmp_path / "blank.png", dpi=100)
    plt.close(blank)
    assert inked(assert_png(tmp_path / "blank.png")) == 0.0


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
    out = run_plot(Run("a", {}, None, MASKS), {"a-prune": log, "a-finetune": finetune},
                   tmp_path / "show.png")
    # top: the vision and fusion heatmaps; bottom: the loss and the sparsity curves
    grid = panels(assert_png(out), 2, 2)
    for row, name in ((0, "heatmap"), (1, "curves")):
        for column in range(2):
            assert coloured(grid[row][column]) >= DRAWN, (name, column)
    assert min(coloured(cell) for cell in grid[0]) > 10 * DRAWN  # heatmaps fill their panels
    # a run that has not pruned yet still gets a picture, saying so: text, and no data
    empty = assert_png(run_plot(Run("b", {}, None, None), {}, tmp_path / "empty.png"))
    top_left = panels(empty, 2, 2)[0][0]
    assert inked(top_left) > DRAWN and coloured(empty) < DRAWN


def test_diff_plot_draws_the_pareto_view_with_seeds(three_seeds):  # noqa: F811
    result = CliRunner().invoke(main, ["diff", "a", "b", "--plot", "pareto.png"])
    assert result.exit_code == 0, result.output
    assert "wrote pareto.png" in result.output
    # one panel per latency batch size (1 and 32), then sparsity per encoder
    pixels = assert_png(three_seeds / "pareto.png")
    for column, panel in enumerate(panels(pixels, 1, 3)[0]):
        assert coloured(panel) >= DRAWN, column
    # the two runs in their own colours (matplotlib's C0 blue, C1 orange) in every panel
    for panel in panels(pixels, 1, 3)[0]:
        for rgb in ((31, 119, 180), (255, 127, 14)):
            assert (np.abs(panel - rgb).max(axis=-1) < 30).sum() > 20, rgb
    assert not list(three_seeds.glob("*.tmp*"))  # written atomically: no leftovers
