"""What a saved matplotlib figure shows, read from its artists as it is saved (test side):
the values drawn, not the file's size."""

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image


def tick_labels(axis) -> list[str]:
    """An axis's tick labels, also where a shared axis does not show them."""
    return [str(t) for t in axis.get_major_formatter().format_ticks(axis.get_majorticklocs())]


def panel(ax) -> dict:
    """One panel (axes) of a figure: its titles, tick labels and what is drawn in it."""
    lines = {line.get_label(): float(np.asarray(line.get_ydata())[0]) for line in ax.get_lines()}
    return {
        "title": ax.get_title(),
        "xlabel": ax.get_xlabel(),
        "ylabel": ax.get_ylabel(),
        "ylim": ax.get_ylim(),
        "xticks": tick_labels(ax.xaxis),
        "yticks": tick_labels(ax.yaxis),
        # An image's values (masked cells, e.g. a condition a model lacks, as NaN).
        "images": [np.ma.filled(np.ma.asarray(im.get_array(), float), np.nan) for im in ax.images],
        "bars": [bar.get_height() for bar in ax.patches],
        "texts": [text.get_text() for text in ax.texts],
        "lines": lines,
    }


def record_figures(monkeypatch) -> dict[str, list[dict]]:
    """{file name: [panel, ...]} of every figure saved from now on (colour bars left out),
    read as Figure.savefig is called, before the code that saved it clears it."""
    figures, savefig = {}, Figure.savefig

    def recording_savefig(fig, fname, *args, **kwargs):
        axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        figures[Path(fname).name] = [panel(ax) for ax in axes]
        return savefig(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    return figures


def pixels(path: Path) -> np.ndarray:
    """A PNG's pixels (H, W, 4), to compare two renderings of one figure."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA"))
