"""What every benchmark provides: yes/no items in groups, images by id, native metrics."""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from sysattn_exp.errors import UsageError


@dataclass(frozen=True)
class Item:
    item_id: str
    group_id: str  # items that must all be right for the group to count (paired accuracy)
    image_id: str  # key for Benchmark.load_image; items with one image share it
    question: str  # the benchmark's question, before the template is applied
    label: bool  # ground truth, True = yes


def no_native_metrics(predictions: pd.DataFrame) -> dict[str, float]:
    return {}


@dataclass
class Benchmark:
    name: str
    items: list[Item]
    template: str  # "{question}" is replaced by Item.question
    load_image: Callable[[str], Image.Image]
    native_metrics: Callable[[pd.DataFrame], dict[str, float]] = field(default=no_native_metrics)

    def question_text(self, item: Item) -> str:
        return self.template.format(question=item.question)


def check_template(template: str) -> str:
    if "{question}" not in template:
        raise UsageError(f"benchmark.template={template!r} must contain {{question}}")
    try:
        template.format(question="")
    except (KeyError, IndexError, ValueError) as err:
        raise UsageError(
            f"benchmark.template={template!r} may use only {{question}} ({err}); write {{{{ }}}} "
            "for literal braces"
        ) from None
    return template


def open_image(path: Path) -> Image.Image:
    """Decode an image file to RGB, or a one-line error naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read image {path}: {err}") from None


def first_groups(items: list[Item], limit: int | None) -> list[Item]:
    """The items of the first `limit` groups, in order of first appearance; never splits a group."""
    if limit is None:
        return items
    if limit < 1:
        raise UsageError(f"benchmark.limit={limit} must be a positive number of groups or null")
    kept: list[str] = list(dict.fromkeys(item.group_id for item in items))[:limit]
    keep = set(kept)
    return [item for item in items if item.group_id in keep]
