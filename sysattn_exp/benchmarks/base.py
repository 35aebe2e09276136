"""What every benchmark provides (yes/no items in groups, images by id, native metrics),
and the helpers the loaders share: templates, image files, hub datasets, group limits."""

import hashlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from sysattn_exp.errors import UsageError, first_line

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
            if isinstance(self.load_image, DatasetImages):
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


def open_image(path: Path) -> Image.Image:
    """Decode an image file to RGB, or a one-line error naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read image {path}: {err}") from None


def open_image_file(image_id: str) -> Image.Image:
    """Benchmark.load_image for benchmarks whose image ids are file paths."""
    return open_image(Path(image_id))


def readable(path: Path) -> bool:
    """Whether PIL recognises the file (reads the header only, not the pixels)."""
    try:
        with Image.open(path):
            return True
    except (OSError, ValueError):
        return False


def drop_unreadable(items: list[Item], skip: bool) -> tuple[list[Item], int]:
    """Check every image file of `items` (ids are paths). An unreadable one is an error naming
    it, or with `skip` its whole group is dropped (a partial group would distort paired
    accuracy). Returns the kept items and how many were skipped."""
    paths = dict.fromkeys(item.image_id for item in items if item.image_id is not None)
    bad = [p for p in paths if not readable(Path(p))]
    if not bad:
        return items, 0
    if not skip:
        raise UsageError(
            f"cannot read image {bad[0]} ({len(bad)} of {len(paths)} images unreadable); check "
            "benchmark.data_dir / benchmark.image_dir, or set benchmark.skip_missing_images=true"
        )
    bad_set = set(bad)
    bad_groups = {item.group_id for item in items if item.image_id in bad_set}
    kept = [item for item in items if item.group_id not in bad_groups]
    log.warning(
        "skipped %d items in %d groups: %d unreadable images (first: %s)",
        len(items) - len(kept),
        len(bad_groups),
        len(bad),
        bad[0],
    )
    return kept, len(items) - len(kept)


def first_groups(items: list[Item], limit: int | None) -> list[Item]:
    """The items of the first `limit` groups, in order of first appearance; never splits a group."""
    if limit is None:
        return items
    if not isinstance(limit, int) or limit < 1:
        raise UsageError(f"benchmark.limit={limit!r} must be a positive number of groups or null")
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
        source = io.BytesIO(data["bytes"]) if data.get("bytes") else data["path"]
        try:
            with Image.open(source) as image:
                return image.convert("RGB")
        except (OSError, ValueError) as err:
            raise UsageError(
                f"cannot decode image {image_id} (row {row}, {column}): {err}"
            ) from None


def all_correct_rate(scored: pd.DataFrame, keys: list[str]) -> float:
    """Share of the groups formed by `keys` whose items are all correct."""
    return float(scored.groupby(keys)["correct"].all().mean())


def mme_answer(text: str) -> str:
    """ "yes", "no" or "unknown", as the MME benchmark's eval tool parses a generated answer
    (eval_tool/calculation.py, parse_pred_ans: exactly yes/no; else "yes" within the first
    4 characters -> yes, else "no" within them -> no, else "other"), after the
    normalisation lmms-eval applies before it (tasks/mme/utils.py: lowercase, strip,
    periods removed). "unknown" is our name for MME's "other": neither answer, counted
    wrong. The parser of every benchmark without one of its own (scoring.parser=mme: of
    all)."""
    answer = text.lower().strip().replace(".", "")
    if answer in ("yes", "no"):
        return answer
    if "yes" in answer[:4]:
        return "yes"
    if "no" in answer[:4]:
        return "no"
    return "unknown"
