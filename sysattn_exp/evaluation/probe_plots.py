"""Figures of the readouts by decoder layer (evaluation.probes, evaluation.lens): probe
accuracy, pair separation by how pairs were answered, and the lens and the separation split
by the items the intervention fixed, broke or left unchanged. In every figure with an
intervention its curves are solid and the baseline's dashed, as in lens.lens_plot."""

import numpy as np
import pandas as pd

STYLES = {"baseline": "--", "intervention": "-"}
FLIP_COLOURS = {
    "fixed": "tab:blue",
    "broken": "tab:orange",
    "mixed": "tab:purple",
    "unchanged": "tab:grey",
}
KIND_COLOURS = {"yes_yes": "tab:red", "right": "tab:green"}


def figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    return plt, fig, ax


def finish(plt, fig, ax, path, title: str, ylabel: str):
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_curves(ax, table: pd.DataFrame, column: str, value: str, colours: dict, what: str):
    """One line per (condition, class of `column` in `colours`) of `value` by layer, with
    the label '<condition>, <class> <what>'; classes without a defined value are left out."""
    for (condition, kind), curve in table.groupby(["condition", column], sort=False):
        curve = curve.dropna(subset=[value]).sort_values("layer")
        if kind not in colours or curve.empty:
            continue
        ax.plot(
            curve["layer"],
            curve[value],
            STYLES[condition],
            color=colours[kind],
            marker="o",
            markersize=3,
            label=f"{condition}, {kind} {what}",
        )


def probes_plot(table: pd.DataFrame, path, title: str, majority: float):
    """probes.csv's held-out accuracy by layer with its 95% interval (a band), per
    condition; the grey line is the majority label's share (a probe that learnt nothing)."""
    plt, fig, ax = figure()
    colours = {"baseline": "tab:grey", "intervention": "tab:blue"}
    for condition, curve in table.groupby("condition", sort=False):
        curve = curve.sort_values("layer")
        ax.plot(
            curve["layer"], curve["accuracy"], STYLES[condition], color=colours[condition],
            marker="o", markersize=3, label=f"{condition} probe",
        )  # fmt: skip
        low, high = curve["ci_low"].astype(float), curve["ci_high"].astype(float)
        ax.fill_between(curve["layer"], low, high, color=colours[condition], alpha=0.2)
    ax.axhline(majority, color="black", linestyle=":", linewidth=0.8, label="majority label")
    ax.set_ylim(0, 1.02)
    return finish(plt, fig, ax, path, title, "held-out accuracy of the label")


def separation_plot(table: pd.DataFrame, path, title: str):
    """separation.csv's mean cosine distance by layer for pairs answered yes to both
    (yes_yes) and pairs answered right (right), per condition."""
    plt, fig, ax = figure()
    draw_curves(ax, table, "pair_kind", "mean_distance", KIND_COLOURS, "pairs")
    return finish(plt, fig, ax, path, title, "mean cosine distance of the pair")


def separation_flips_plot(table: pd.DataFrame, path, title: str):
    """separation_flips.csv's mean cosine distance by layer of pairs with a fixed item, a
    broken one, both (mixed) or neither changed, per condition."""
    plt, fig, ax = figure()
    draw_curves(ax, table, "flip", "mean_distance", FLIP_COLOURS, "pairs")
    return finish(plt, fig, ax, path, title, "mean cosine distance of the pair")


def right_answer_log_odds(lens: pd.DataFrame) -> pd.Series:
    """The lens's log-odds toward each item's label: yes_logit - no_logit for yes-label
    items, no_logit - yes_logit for no-label ones (> 0: that layer would answer right).
    Signed so that fixed yes-label and no-label items, whose log-odds move in opposite
    directions, add up instead of cancelling."""
    return lens["log_odds"] * np.where(lens["label"].astype(bool), 1.0, -1.0)


def lens_flips_table(lens: pd.DataFrame, flips: pd.Series) -> pd.DataFrame:
    """Mean right_answer_log_odds by condition, flip class (`flips`: item_id -> fixed,
    broken or unchanged: probes.item_flips) and layer, with the number of items."""
    frame = lens.assign(right_log_odds=right_answer_log_odds(lens), flip=lens["item_id"].map(flips))
    grouped = frame.groupby(["condition", "flip", "layer"], sort=False)["right_log_odds"]
    return (
        grouped.agg(["mean", "count"])
        .reset_index()
        .rename(columns={"mean": "mean_right_log_odds", "count": "n_items"})
    )


def lens_flips_plot(lens: pd.DataFrame, flips: pd.Series, path, title: str):
    """The lens by layer for the items the intervention fixed, broke or left unchanged
    (lens_flips_table), baseline and intervention: the layer where a fixed item's
    intervention curve crosses 0 is where it changed its mind."""
    plt, fig, ax = figure()
    table = lens_flips_table(lens, flips)
    draw_curves(ax, table, "flip", "mean_right_log_odds", FLIP_COLOURS, "items")
    ax.axhline(0, color="grey", linewidth=0.8)
    return finish(plt, fig, ax, path, title, "mean log-odds of the right answer")
