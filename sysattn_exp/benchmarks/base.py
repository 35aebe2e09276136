"""What every benchmark provides (yes/no items in groups, images by id, native metrics),
and the helpers the loaders share: templates, image files, hub datasets, group limits."""

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from sysattn_exp.benchmarks.answers import mme_answer  # noqa: F401 - the loaders' default parser
from sysattn_exp.benchmarks.images import decode_errors, open_image
from sysattn_exp.errors import UsageError, first_line
from sysattn_exp.files import read_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    item_id: str
    group_id: str  # items that must all be right for the group to count (paired accuracy)
    # Key for Benchmark.load_image; items with one image share it. None: the question comes
    # without an image (HallusionBench's visual_input 0), and load_image is never called.
    image_id: str | None
    question: str  # the benchmark's question, before the template is applied
    label: bool  # ground truth, True = yes
    # What the native metrics need beyond the shared columns (category, caption index, ...).
    meta: dict = field(default_factory=dict, compare=False)


def no_native_metrics(scored: pd.DataFrame) -> dict[str, float]:
    return {}


@dataclass(frozen=True)
class SummedStatistics:
    """Metrics that are functions of sums over a benchmark's groups, so that a cluster
    bootstrap gets each resample's sums as (draw counts) @ (per-group sums), one matrix
    product for all resamples (evaluation.stats), instead of recomputing the metric on a
    resampled frame.

    - `names`: the metrics from_sums returns, the ones given statistics.
    - `columns(scored)`: one row per group (indexed by group_id), one numeric column per
      summed quantity (counts of items, of right items, of whole groups, ...), from a
      frame with the columns native_metrics reads.
    - `from_sums(sums)`: the metrics from summed columns, `sums` a mapping column name ->
      array of any shape (one value per resample); NaN where a metric is undefined. On
      the sums over all groups (one draw of each) it gives the observed metric; on a
      resample's, the metric native_metrics gives on the resampled frame (each drawn
      group a new group): the tests check both to 1e-12."""

    names: tuple[str, ...]
    columns: Callable[[pd.DataFrame], pd.DataFrame]
    from_sums: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def group_sums(values: pd.DataFrame, group_id: pd.Series) -> pd.DataFrame:
    """Per-group sums of item columns (booleans count as 0/1), indexed by group_id."""
    return values.astype(float).groupby(group_id.to_numpy(), sort=True).sum()


def fraction(part: np.ndarray, whole: np.ndarray) -> np.ndarray:
    """part / whole elementwise, NaN where whole is 0 (a metric with nothing to count)."""
    part, whole = np.asarray(part, float), np.asarray(whole, float)
    out = np.full(np.broadcast(part, whole).shape, np.nan)
    np.divide(part, whole, out=out, where=whole != 0)
    return out


@dataclass
class Benchmark:
    name: str
    items: list[Item]
    template: str  # "{question}" is replaced by Item.question
    load_image: Callable[[str], Image.Image]  # never called with None
    # Called with the predictions joined with every item's `meta` as columns.
    native_metrics: Callable[[pd.DataFrame], dict[str, float]] = no_native_metrics
    # Counts from loading (items excluded or skipped), logged with the metrics.
    load_counts: dict[str, int] = field(default_factory=dict)
    # Taken out of each question before the template is applied (the prompt preset's
    # `remove`): e.g. MME's own "Please answer yes or no.", which LLaVA-1.5's prompt replaces.
    remove: str | None = None
    # What is dropped whole with a group whose image cannot be read (skip_missing_images):
    # by default the group; a benchmark whose metrics also group items otherwise (e.g.
    # HallusionBench's figures) names a wider unit, so no such group is left incomplete.
    drop_unit: Callable[[Item], str] | None = None
    # False where the images are drawn in code: there is no file to check before the run.
    image_files: bool = True
    _digests: dict[str, str] = field(default_factory=dict, repr=False)  # image_digest's memo

    def question_text(self, item: Item) -> str:
        question = item.question
        if self.remove:
            question = question.replace(self.remove, "").strip()
        return self.template.format(question=question)

    def image_digest(self, image_id: str | None) -> str | None:
        """A hash of the image's content: the file's or the dataset's stored bytes, else the
        decoded pixels (images made in code). Keys the score cache, so that a replaced
        picture is never served the old scores."""
        if image_id is None:
            return None
        if image_id not in self._digests:
            if isinstance(self.load_image, DatasetImages | DatasetsByPrefix):
                data = self.load_image.stored_bytes(image_id)
            elif Path(image_id).is_file():
                data = Path(image_id).read_bytes()
            else:
                image = self.load_image(image_id)
                data = f"{image.mode} {image.size}".encode() + image.tobytes()
            self._digests[image_id] = hashlib.sha256(data).hexdigest()
        return self._digests[image_id]


def check_template(template: str, key: str = "benchmark.template") -> str:
    if "{question}" not in template:
        raise UsageError(f"{key}={template!r} must contain {{question}}")
    try:
        template.format(question="")
    except (KeyError, IndexError, ValueError) as err:
        raise UsageError(
            f"{key}={template!r} may use only {{question}} ({err}); write {{{{ }}}} "
            "for literal braces"
        ) from None
    return template


def prompt_preset(cfg) -> tuple[str, str | None]:
    """(template, remove) of the preset named by benchmark.prompt in benchmark.prompts
    (`native`: the benchmark's own yes/no prompt; `llava`: LLaVA-1.5's evaluation prompt).
    benchmark.template, when set, replaces the preset's template (the preset's `remove`
    still applies), so configs that set the template directly keep working."""
    presets = cfg.get("prompts") or {}
    name = cfg.get("prompt") or "native"
    if name not in presets and (presets or name != "native"):
        allowed = ", ".join(presets) or "native"
        raise UsageError(f"benchmark.prompt={name!r} is unknown; allowed: {allowed}")
    preset = presets.get(name) or {}
    template, key = cfg.get("template"), "benchmark.template"
    if template is None:
        template, key = preset.get("template"), f"benchmark.prompts.{name}.template"
    if template is None:
        raise UsageError(f"{key} is not set: it must hold the prompt, with {{question}}")
    remove = preset.get("remove")
    return check_template(str(template), key), str(remove) if remove else None


def open_image_file(image_id: str) -> Image.Image:
    """Benchmark.load_image for benchmarks whose image ids are file paths."""
    return open_image(Path(image_id))


def groups_of(items: list[Item]) -> dict[str, list[Item]]:
    """Items by group, groups in order of first appearance."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(item.group_id, []).append(item)
    return groups


def check_groups(items: list[Item], source: str, problem: Callable[[list[Item]], str | None]):
    """Every group must have the structure the benchmark's metrics assume: `problem(members)`
    says what is wrong with one (None: nothing). The first that fails stops the run with
    one line naming it; a pair metric is never computed from an incomplete pair."""
    for group, members in groups_of(items).items():
        what = problem(members)
        if what:
            raise UsageError(f"{source}: group {group!r} {what}")
    return items


def one_each(members: list[Item], key: Callable[[Item], object], want: list, what: str):
    """A `problem` for check_groups: the members' keys must be exactly `want`, once each."""
    got = sorted(key(item) for item in members)
    if got != sorted(want):
        return f"has {what} {got}; want {sorted(want)}, once each"
    return None


# Digests of the images that decoded in this process: the jobs of a sweep run one after
# another in one process (Hydra's basic launcher) and need not decode them again.
DECODED: set[str] = set()


def decode_once(benchmark: Benchmark, image_id: str) -> None:
    """Decode the image unless the same bytes decoded before (hashing them is ~10 times
    cheaper than decoding; the digest is the score cache's, so it is computed anyway)."""
    try:
        digest = benchmark.image_digest(image_id)
    except OSError:  # a stored path that is gone: load_image names it in one line
        digest = None
    if digest is None or digest not in DECODED:
        benchmark.load_image(image_id)
        if digest is not None:
            DECODED.add(digest)


def usable_groups(benchmark: Benchmark, limit: int | None, skip: bool) -> tuple[list[Item], int]:
    """The items of the first `limit` groups (all: None) whose images all decode, checked
    before the model loads by decoding them fully (a file cut short passes a header check).
    An image that does not decode is an error naming it, or with `skip` the groups that
    need it are dropped whole (with every group sharing a drop unit, Benchmark.drop_unit)
    and the next groups taken in their place. Returns the items and how many were dropped."""
    items = benchmark.items
    by_group = groups_of(items)
    order = list(by_group)
    limit = len(order) if limit is None else limit
    unit = benchmark.drop_unit or (lambda item: item.group_id)
    errors: dict[str, str | None] = {}
    examined, bad_units = 0, set()

    def kept_groups():
        return [g for g in order[:examined] if not any(unit(i) in bad_units for i in by_group[g])]

    while len(kept_groups()) < limit and examined < len(order):
        chunk = order[examined : examined + limit - len(kept_groups())]
        examined += len(chunk)
        ids = [i.image_id for g in chunk for i in by_group[g] if i.image_id is not None]
        todo = [k for k in dict.fromkeys(ids) if k not in errors]
        errors |= decode_errors(lambda image_id: decode_once(benchmark, image_id), todo)
        bad = [k for k, err in errors.items() if err]
        if bad and not skip:
            raise UsageError(
                f"{errors[bad[0]]} ({len(bad)} of {len(errors)} images checked cannot be read); "
                "check benchmark.data_dir / benchmark.image_dir, or set "
                "benchmark.skip_missing_images=true to drop their groups"
            )
        bad_units |= {unit(i) for g in chunk for i in by_group[g] if errors.get(i.image_id)}
    groups = kept_groups()
    keep = set(groups)
    kept = [item for item in items if item.group_id in keep]
    dropped = sum(len(by_group[g]) for g in order[:examined]) - len(kept)
    if dropped:
        bad = [k for k, err in errors.items() if err]
        log.warning(
            "skipped %d items in %d groups: %d images cannot be read (first: %s)",
            dropped,
            examined - len(groups),
            len(bad),
            errors[bad[0]],
        )
    return kept, dropped


def in_calibration(group_id: str, fraction: float, seed: int) -> bool:
    """Whether group `group_id` is in the calibration half of a seeded split: the first 8
    bytes of sha256(f"{seed}:{group_id}") as a number in [0, 1) below `fraction`. A hash,
    not a shuffle: a group's half depends on nothing but its id and the seed, the same in
    every run, process and machine, and whatever else the benchmark holds."""
    draw = int.from_bytes(hashlib.sha256(f"{seed}:{group_id}".encode()).digest()[:8], "big")
    return draw / 2**64 < fraction


def split_groups(items: list[Item], half: str | None, fraction: float, seed: int) -> list[Item]:
    """The items of one half of the groups (benchmark.split_half): "calibration" (the
    groups in_calibration), "held_out" (the others), None (all). Never splits a group."""
    if half is None:
        return items
    want = half == "calibration"
    return [i for i in items if in_calibration(i.group_id, fraction, seed) == want]


def first_groups(items: list[Item], limit: int | None) -> list[Item]:
    """The items of the first `limit` groups, in order of first appearance; never splits a group."""
    if limit is None:
        return items
    keep = set(list(dict.fromkeys(item.group_id for item in items))[:limit])
    return [item for item in items if item.group_id in keep]


def data_dir(cfg) -> Path | None:
    """benchmark.data_dir as a checked directory, or None for the hub."""
    if not cfg.get("data_dir"):
        return None
    path = Path(cfg.data_dir)
    if not path.is_dir():
        raise UsageError(f"benchmark.data_dir={path} is not a directory")
    return path


def image_dir(cfg, default: Path | None) -> Path:
    path = Path(cfg.image_dir) if cfg.get("image_dir") else default
    if path is None:
        raise UsageError(f"benchmark.image_dir is required for benchmark={cfg.name}")
    if not path.is_dir():
        raise UsageError(f"benchmark.image_dir={path} is not a directory")
    return path


def required_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UsageError(f"{path} not found: benchmark.data_dir must hold {what}")
    return path


def read_json(path: Path):
    """A release's JSON file, parsed; not valid JSON is a UsageError naming the file."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err.msg})") from None


def json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number from 1, parsed record) for each non-blank line of a JSON-lines file; a
    line that is not valid JSON is a UsageError naming the file and the line."""
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path} line {number}: not valid JSON ({err.msg})") from None
        yield number, record


def hub_split(cfg, local_hint: str):
    """benchmark.hub_id's benchmark.split at benchmark.revision (hub_dataset), and the
    source errors name it by: "<hub_id> split <split>"."""
    dataset = hub_dataset(cfg.hub_id, cfg.split, local_hint, cfg.get("revision"))
    return dataset, f"{cfg.hub_id} split {cfg.split}"


def hub_dataset(repo_id: str, split: str, local_hint: str, revision: str | None = None):
    """A split of a hub dataset via `datasets`. Fails fast, in one line, when the hub is
    unreachable (instead of datasets' retries), pointing at benchmark.data_dir; any other
    failure (a wrong split, a repo `datasets` cannot read) is reported with its own first
    line, and for a gated repo with the licence hint beside it, not instead of it.
    `revision` (benchmark.revision: a commit, tag or branch; None: the default branch) pins
    the data, and is part of the score cache's condition."""
    import datasets
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    use_local = f"use benchmark.data_dir=DIR with {local_hint}"
    gated = False
    if not constants.HF_HUB_OFFLINE:  # offline mode reads the local cache instead
        try:
            gated = bool(HfApi().dataset_info(repo_id, timeout=15).gated)
        except RepositoryNotFoundError:
            raise UsageError(f"dataset {repo_id} not found on the hub; {use_local}") from None
        except Exception as err:  # noqa: BLE001 - any failure to reach the hub means the same
            raise UsageError(
                f"cannot reach the Hugging Face hub for {repo_id} ({first_line(err)}); "
                f"{use_local}, or set HF_HUB_OFFLINE=1 to use a copy in the local cache"
            ) from None
    try:
        return datasets.load_dataset(repo_id, split=split, revision=revision)
    except Exception as err:  # noqa: BLE001 - reported in one line with what to do
        cause = f"cannot load {repo_id} split {split!r} ({first_line(err)})"
        if gated or "gated" in str(err).lower():
            # The licence is the usual cause, but not the only one (a wrong split, a
            # loading-script repo): say both.
            raise UsageError(
                f"{cause}; {repo_id} is gated: if you have not yet, accept its licence at "
                f"https://huggingface.co/datasets/{repo_id} and log in (huggingface-cli login "
                f"or HF_TOKEN); or {use_local}"
            ) from None
        raise UsageError(f"{cause}; {use_local}") from None


def require_columns(dataset, columns, source: str) -> None:
    """A hub dataset must have the columns the loader reads: name the first one missing."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise UsageError(
            f"{source}: no column {missing[0]!r} (it has {', '.join(dataset.column_names)})"
        )


class DatasetImages:
    """Benchmark.load_image for images stored in a `datasets.Dataset`: image id ->
    (row, column), decoded only when asked for."""

    def __init__(self, dataset, index: dict[str, tuple[int, str]]):
        import datasets

        for column in {column for _, column in index.values()}:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset, self.index = dataset, index

    def stored_bytes(self, image_id: str) -> bytes:
        """The image file as the dataset stores it (encoded, not decoded)."""
        row, column = self.index[image_id]
        data = self.dataset[row][column]
        return data["bytes"] if data.get("bytes") else Path(data["path"]).read_bytes()

    def __call__(self, image_id: str) -> Image.Image:
        row, column = self.index[image_id]
        data = self.dataset[row][column]
        source = io.BytesIO(data["bytes"]) if data.get("bytes") else Path(data["path"])
        return open_image(source, f"{image_id} (row {row}, {column})")


class DatasetsByPrefix:
    """Benchmark.load_image over several hub datasets (one per split or subset): an image
    id starts with its dataset's name, "<name>/..."."""

    def __init__(self, sources: dict[str, DatasetImages]):
        self.sources = sources

    def stored_bytes(self, image_id: str) -> bytes:
        return self.sources[image_id.split("/", 1)[0]].stored_bytes(image_id)

    def __call__(self, image_id: str) -> Image.Image:
        return self.sources[image_id.split("/", 1)[0]](image_id)


def all_correct_rate(scored: pd.DataFrame, keys: list[str]) -> float:
    """Share of the groups formed by `keys` whose items are all correct."""
    return float(scored.groupby(keys)["correct"].all().mean())
