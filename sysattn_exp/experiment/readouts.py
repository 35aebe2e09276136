"""runtime.probes (+task=probes) in a yes/no job: the answer-position states of every item,
per decoder layer, streamed to disk while the baseline and the condition are scored
(probes.LayerStates in a temporary folder of the job's, deleted after use), then read a
layer at a time for the linear probes and the minimal-pair separation (evaluation.probes),
written as PROBES_FILES."""

import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from sysattn_exp.evaluation.probe_plots import probes_plot, separation_flips_plot, separation_plot
from sysattn_exp.evaluation.probes import (
    PROBE_COLUMNS,
    SEPARATION_COLUMNS,
    SEPARATION_FLIPS_COLUMNS,
    item_flips,
    minimal_pairs,
    pair_flips,
    pair_kinds,
    probe_accuracy,
    separation,
    state_stores,
)
from sysattn_exp.experiment.tracking import (
    PROBES_PLOT,
    PROBES_TABLE,
    SEPARATION_FLIPS_PLOT,
    SEPARATION_FLIPS_TABLE,
    SEPARATION_PLOT,
    SEPARATION_TABLE,
)
from sysattn_exp.files import write_atomically


@contextmanager
def job_states(cfg, loaded, n_items: int, conditions: list[str], out_dir: Path | None):
    """With runtime.probes: {condition: probes.LayerStates} in a temporary folder of
    `out_dir` (the job's; None: the system's temporary folder), deleted on leaving;
    otherwise {} (no states are read)."""
    if not cfg.runtime.get("probes"):
        yield {}
        return
    folder = Path(out_dir) if out_dir is not None else Path(tempfile.gettempdir())
    shape = (loaded.num_layers, n_items, loaded.text_config.hidden_size)
    with state_stores(folder, conditions, *shape) as stores:
        yield stores


def probe_files(stats, states: dict, benchmark, predictions: dict, flipped, name: str):
    """Computes now (while the states exist) and returns write(out_dir): PROBES_TABLE and
    PROBES_PLOT (probes.probe_accuracy, the stats section's resamples, seed and interval),
    SEPARATION_TABLE and SEPARATION_PLOT (probes.separation of probes.minimal_pairs, pairs
    classed by each condition's own answers `predictions`: condition -> predictions
    frame) and, with an intervention (`flipped`: stats.flips), SEPARATION_FLIPS_TABLE and
    its plot (pairs classed by probes.pair_flips)."""
    items = benchmark.items
    labels = np.array([item.label for item in items], bool)
    groups = np.array([item.group_id for item in items])
    samples, seed, method = stats.bootstrap_samples, stats.seed, str(stats.interval)
    probes = pd.concat(
        [
            probe_accuracy(store, labels, groups, samples, seed, method).assign(condition=c)
            for c, store in states.items()
        ],
        ignore_index=True,
    )[PROBE_COLUMNS]
    pairs = minimal_pairs(labels, groups)
    flips = None
    if flipped is not None:
        flips = pair_flips(pairs, item_flips(flipped, [item.item_id for item in items]))
    by_kind, by_flip = [], []
    for condition, store in states.items():
        frame = predictions[condition]
        kinds = pair_kinds(pairs, frame["pred"], frame["correct"])
        kind_table, flip_table = separation(store, pairs, kinds, flips)
        by_kind.append(kind_table.assign(condition=condition))
        if flip_table is not None:
            by_flip.append(flip_table.assign(condition=condition))
    kind_table = pd.concat(by_kind, ignore_index=True)[SEPARATION_COLUMNS]
    flip_table = None
    if by_flip:
        flip_table = pd.concat(by_flip, ignore_index=True)[SEPARATION_FLIPS_COLUMNS]
    majority = max(labels.mean(), 1 - labels.mean())

    def write(out_dir: Path) -> None:
        write_atomically(out_dir / PROBES_TABLE, lambda p: probes.to_csv(p, index=False))
        probes_plot(probes, out_dir / PROBES_PLOT, f"{name}: linear probe of the label", majority)
        write_atomically(out_dir / SEPARATION_TABLE, lambda p: kind_table.to_csv(p, index=False))
        separation_plot(kind_table, out_dir / SEPARATION_PLOT, f"{name}: minimal-pair separation")
        if flip_table is not None:
            write_atomically(
                out_dir / SEPARATION_FLIPS_TABLE, lambda p: flip_table.to_csv(p, index=False)
            )
            separation_flips_plot(
                flip_table, out_dir / SEPARATION_FLIPS_PLOT, f"{name}: separation by flips"
            )
        print(probe_summary(probes, name))

    return write


def probe_summary(probes: pd.DataFrame, name: str) -> str:
    """The probe's held-out accuracy per layer and condition, in percent, as a short table."""
    table = probes.pivot(index="layer", columns="condition", values="accuracy")
    return f"{name}: held-out accuracy of a linear probe of the label, %\n" + (
        (100 * table).round(1).to_string()
    )
