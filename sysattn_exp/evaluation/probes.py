"""Linear probes and minimal-pair separation of the answer-position states, per decoder layer.

- **Linear probe** (Alain & Bengio 2016, "Understanding intermediate layers using linear
  classifier probes"): at each decoder layer, a logistic regression of the item's label
  from its answer-position state (the layer's output, the residual stream the logit lens
  reads: evaluation.lens), held-out accuracy by cross-validation over the benchmark's
  groups. It says whether the label is *linearly decodable* there, not that the model uses
  it (Belinkov 2022, "Probing Classifiers: Promises, Shortcomings, and Advances",
  Computational Linguistics 48(1): a probe's accuracy is a property of probe and data
  together; compare layers and conditions, not absolute values, against the majority
  baseline drawn in the plot).
- **Pair separation**: for the benchmark's minimal pairs (every two items of one group
  whose labels differ, minimal_pairs), the cosine distance between their states at each
  layer. The coarse-representation hypothesis predicts a small separation where the model
  says yes to both.

Memory: the states are never held as one (L, N, H) array in RAM. LayerStates streams each
scored batch's (L, B, H) states into a float32 numpy memmap of shape (L, N, H) in a
temporary folder (the job folder's, deleted after use); the probes and the separation then
read one layer (N, H) at a time. Its size on disk is L * N * H * 4 bytes per condition: a
7B model (32 layers, hidden size 4096) on BEAF's about 26,000 items takes 32 * 26,000 *
4096 * 4 B = 13.6 GB per condition (27 GB with an intervention, read one 426 MB layer at a
time); the toy model (4 layers, 64) on its 72 demo items, 74 KB."""

import logging
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from sysattn_exp.benchmarks.base import SummedStatistics, fraction, group_sums
from sysattn_exp.evaluation.stats import bootstrap_statistics

log = logging.getLogger(__name__)

FOLDS = 5  # cross-validation folds (fewer where the benchmark has fewer groups)
SEED = 0  # the folds' shuffle and the solver's random_state
# The probe's inverse L2 regularisation strength (scikit-learn's C, its default) on
# standardised features: a fixed, moderate penalty, the same at every layer, so that
# layers are compared under one probe (Belinkov 2022, sec. 4: probe capacity).
PROBE_C = 1.0
MAX_ITER = 1000  # lbfgs iterations per fit (a fit that stops there is logged)
PROBE_COLUMNS = ["condition", "layer", "accuracy", "ci_low", "ci_high", "n_items", "n_groups"]
PROBE_COLUMNS += ["folds"]
PAIR_KINDS = ("yes_yes", "right", "other")
FLIP_KINDS = ("fixed", "broken", "mixed", "unchanged")
SEPARATION_COLUMNS = ["condition", "layer", "pair_kind", "mean_distance", "n_pairs"]
SEPARATION_FLIPS_COLUMNS = ["condition", "layer", "flip", "mean_distance", "n_pairs"]


class LayerStates:
    """Every item's answer-position state per decoder layer, on disk: a float32 memmap
    (L, N, H) at `path`, filled by record (score_items(lens=...)) and read a layer at a
    time (layer). In RAM: one scored batch's states at a time."""

    def __init__(self, path: Path, n_layers: int, n_items: int, hidden: int):
        self.path = Path(path)
        self.array = np.lib.format.open_memmap(
            self.path, mode="w+", dtype=np.float32, shape=(n_layers, n_items, hidden)
        )
        self.recorded = np.zeros(n_items, bool)

    def record(self, items: list[int], states, yes_ids=None, no_ids=None) -> None:
        """states (L, B, H) (a torch tensor, any float dtype): the batch's rows, which are
        benchmark items `items`; written to disk at once."""
        self.array[:, items] = states.float().numpy()
        self.recorded[items] = True

    def layer(self, layer: int) -> np.ndarray:
        """The states of every item at `layer`, (N, H) float32, read into RAM."""
        if not self.recorded.all():
            raise ValueError(f"{np.count_nonzero(~self.recorded)} items have no recorded states")
        return np.array(self.array[layer])

    @property
    def n_layers(self) -> int:
        return self.array.shape[0]


class Recorders:
    """Several readers of the layer states (a lens.LogitLens, a LayerStates) fed by one
    score_items(lens=...): each gets every batch."""

    def __init__(self, *readers):
        self.readers = [reader for reader in readers if reader is not None]

    def record(self, items, states, yes_ids, no_ids) -> None:
        for reader in self.readers:
            reader.record(items, states, yes_ids, no_ids)


@contextmanager
def state_stores(folder: Path, conditions: list[str], n_layers: int, n_items: int, hidden: int):
    """A LayerStates per condition in a temporary folder under `folder` (the job's), which
    is deleted on leaving, whatever happens."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=".states-", dir=folder))
    try:
        yield {
            c: LayerStates(temporary / f"{c}.npy", n_layers, n_items, hidden) for c in conditions
        }
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def probe_folds(labels, groups, n_splits: int = FOLDS, seed: int = SEED) -> np.ndarray:
    """Each item's held-out fold (N,) ints: scikit-learn's StratifiedGroupKFold with
    min(n_splits, number of groups) folds, groups shuffled with `seed`: every group's items
    in one fold (the two items of a pair never on both sides of a split), label shares as
    even across folds as groups allow. ValueError with fewer than 2 groups."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    k = min(n_splits, len(np.unique(groups)))
    if k < 2:
        raise ValueError("cross-validation by group needs at least 2 groups")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = np.full(len(labels), -1)
    with warnings.catch_warnings():  # fewer items of a label than folds: said by the counts
        warnings.simplefilter("ignore", UserWarning)
        for f, (_, held_out) in enumerate(splitter.split(labels, labels, groups)):
            fold[held_out] = f
    return fold


def linear_probe() -> Pipeline:
    """The probe: standardised features (StandardScaler, fit on the training folds only),
    then L2 logistic regression (lbfgs, C = PROBE_C)."""
    return make_pipeline(
        StandardScaler(),
        LogisticRegression(C=PROBE_C, max_iter=MAX_ITER, random_state=SEED),
    )


def held_out_predictions(states: np.ndarray, labels, fold: np.ndarray) -> tuple[np.ndarray, int]:
    """Each item's label as predicted by a probe fit on the other folds, (N,) bool, and how
    many fits stopped at MAX_ITER. A training set with one label only predicts that label."""
    labels = np.asarray(labels, bool)
    predicted, unconverged = np.zeros(len(labels), bool), 0
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        if len(np.unique(labels[train])) < 2:
            predicted[test] = labels[train][0]
            continue
        probe = linear_probe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(states[train], labels[train])
        unconverged += int(probe[-1].n_iter_[0] >= MAX_ITER)
        predicted[test] = probe.predict(states[test])
    return predicted, unconverged


def held_out_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Per group: its items and the probe's right predictions among them."""
    values = pd.DataFrame({"items": True, "correct": frame["correct"].astype(bool)})
    return group_sums(values, frame["group_id"])


def held_out_accuracy(sums) -> dict[str, np.ndarray]:
    return {"accuracy": fraction(sums["correct"], sums["items"])}


# The probe's accuracy as a function of per-group sums: stats' cluster bootstrap.
HELD_OUT_ACCURACY = SummedStatistics(("accuracy",), held_out_columns, held_out_accuracy)


def probe_accuracy(
    states: LayerStates, labels, groups, samples: int, seed: int, method: str = "percentile"
) -> pd.DataFrame:
    """Per layer: the probe's held-out accuracy over all items (each predicted by the
    probe that did not see its group) and its 95% interval from the cluster bootstrap over
    groups of the per-item correctness (stats.bootstrap_statistics with `samples`, `seed`
    and `method`, as the job's other statistics), n_items, n_groups and the folds used."""
    labels, groups = np.asarray(labels, bool), np.asarray(groups)
    fold = probe_folds(labels, groups)
    rows, unconverged = [], 0
    for layer in range(states.n_layers):
        predicted, stopped = held_out_predictions(states.layer(layer), labels, fold)
        unconverged += stopped
        frame = pd.DataFrame({"group_id": groups, "correct": predicted == labels})
        spread = bootstrap_statistics(frame, None, [HELD_OUT_ACCURACY], samples, seed, method)
        rows.append(
            {
                "layer": layer,
                "accuracy": float(frame["correct"].mean()),
                "ci_low": spread["accuracy_ci_low"],
                "ci_high": spread["accuracy_ci_high"],
                "n_items": len(labels),
                "n_groups": len(np.unique(groups)),
                "folds": int(fold.max()) + 1,
            }
        )
    if unconverged:
        log.warning("%d probe fits stopped at %d lbfgs iterations", unconverged, MAX_ITER)
    return pd.DataFrame(rows)


def minimal_pairs(labels, groups) -> np.ndarray:
    """The benchmark's minimal pairs as item indices (P, 2), i < j: every two items of one
    group whose labels differ (a group of a yes and a no question is one pair; NaturalBench's
    2 x 2 group of two yes and two no items, four)."""
    labels, groups = np.asarray(labels, bool), np.asarray(groups)
    pairs = []
    for _, members in pd.Series(np.arange(len(groups))).groupby(groups, sort=True):
        index = members.to_numpy()
        pairs += [
            (i, j) for a, i in enumerate(index) for j in index[a + 1 :] if labels[i] != labels[j]
        ]
    return np.array(pairs, dtype=int).reshape(-1, 2)


def cosine_distances(states: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """1 - cos(h_i, h_j) for each pair (P,), in float64 (NaN where a state is all zero)."""
    a = states[pairs[:, 0]].astype(np.float64)
    b = states[pairs[:, 1]].astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 - np.einsum("ph,ph->p", a, b) / norms


def pair_kinds(pairs: np.ndarray, pred, correct) -> np.ndarray:
    """Per pair, how a condition answered it: yes_yes (yes to both: one of them is wrong,
    the labels differ), right (both right), other (no to both, or one right and one wrong
    otherwise)."""
    pred, correct = np.asarray(pred, bool), np.asarray(correct, bool)
    yes_yes = pred[pairs[:, 0]] & pred[pairs[:, 1]]
    right = correct[pairs[:, 0]] & correct[pairs[:, 1]]
    return np.where(yes_yes, "yes_yes", np.where(right, "right", "other"))


def item_flips(flipped: pd.DataFrame, item_ids) -> np.ndarray:
    """Per item (benchmark order): fixed (the intervention made it right), broken (it made
    it wrong) or unchanged (same answer), from stats.flips' `right` column (in the logit
    mode, which the lens and probes need, a changed answer is right in exactly one
    condition; "neither" could only come from generate mode's unknown answers)."""
    effect = flipped.set_index("item_id")["right"].map(
        {"intervention": "fixed", "baseline": "broken", "neither": "neither"}
    )
    return pd.Series(list(item_ids)).map(effect).fillna("unchanged").to_numpy()


def pair_flips(pairs: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Per pair: fixed (it holds a fixed item and no broken one), broken (a broken item
    and no fixed one), mixed (both), unchanged (neither item's answer changed)."""
    fixed = (flips[pairs] == "fixed").any(axis=1)
    broken = (flips[pairs] == "broken").any(axis=1)
    return np.select([fixed & broken, fixed, broken], ["mixed", "fixed", "broken"], "unchanged")


def separation(
    states: LayerStates, pairs: np.ndarray, kinds: np.ndarray, flips: np.ndarray | None
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Per layer: the mean cosine distance (cosine_distances) of the pairs of each kind
    (pair_kinds: PAIR_KINDS, every kind listed, n_pairs 0 and NaN where none) and, with
    per-pair `flips` (pair_flips), of each FLIP_KINDS class: (by kind, by flip or None)."""
    by_kind, by_flip = [], []
    for layer in range(states.n_layers):
        distance = pd.Series(cosine_distances(states.layer(layer), pairs))
        by_kind.append(mean_by(distance, kinds, PAIR_KINDS, layer, "pair_kind"))
        if flips is not None:
            by_flip.append(mean_by(distance, flips, FLIP_KINDS, layer, "flip"))
    flip_table = pd.concat(by_flip, ignore_index=True) if flips is not None else None
    return pd.concat(by_kind, ignore_index=True), flip_table


def mean_by(distance: pd.Series, classes, names, layer: int, column: str) -> pd.DataFrame:
    """The mean distance and number of pairs of each class `names` at `layer`."""
    stats = distance.groupby(np.asarray(classes)).agg(["mean", "count"]).reindex(list(names))
    return pd.DataFrame(
        {
            "layer": layer,
            column: list(names),
            "mean_distance": stats["mean"].to_numpy(),
            "n_pairs": stats["count"].fillna(0).astype(int).to_numpy(),
        }
    )
