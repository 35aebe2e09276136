"""Winoground (Thrush et al., CVPR 2022): 2 captions x 2 images; caption j matches image j.

Hub: facebook/winoground (split test, 400 rows: id, image_0, image_1, caption_0, caption_1,
tag, secondary_tag, num_main_preds, collapsed_tag; gated: accept the licence and log in).
The repo was published with a loading script, which `datasets` >= 4 refuses to run; the
error is reported as it is, with the licence hint beside it. Local:
data_dir holds the release's examples.jsonl and images/<stem>.png. Each (caption j,
image k) is a yes/no item, yes iff j == k. Native metrics compare the items' rank_score:
text score (each image prefers its own caption), image score (each caption prefers its own
image), group score (both). rank_score follows scoring.rank_by: P(yes) under the softmax
over the whole vocabulary (p_yes, the default: what VQAScore does) or the log-odds
yes_logit - no_logit (log_odds); the two can order a pair of items differently."""

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from sysattn_exp.benchmarks.base import (
    Benchmark,
    DatasetImages,
    Item,
    SummedStatistics,
    check_groups,
    check_template,
    data_dir,
    fraction,
    hub_split,
    json_lines,
    mme_answer,
    one_each,
    open_image_file,
    require_columns,
    required_file,
)
from sysattn_exp.errors import UsageError

MAIN_METRIC = "winoground/group_score"  # the native metric the report shows
STAT_METRICS = (MAIN_METRIC,)  # given SE, CI and change statistics (evaluation.stats)
FIELDS = ("id", "caption_0", "caption_1", "image_0", "image_1")
LOCAL_HINT = "the release's examples.jsonl and images/"


def items_of_example(record: dict, image_ids: tuple[str, str]) -> list[Item]:
    return [
        Item(
            item_id=f"{record['id']}/c{j}_i{k}",
            group_id=str(record["id"]),
            image_id=image_ids[k],
            question=record[f"caption_{j}"],
            label=j == k,
            meta={"caption_index": j, "image_index": k},
        )
        for j in (0, 1)
        for k in (0, 1)
    ]


def local_items(directory: Path) -> list[Item]:
    path = required_file(directory / "examples.jsonl", LOCAL_HINT)
    items = []
    for number, record in json_lines(path):
        if not isinstance(record, dict):
            raise UsageError(f"{path} line {number}: must be a JSON object")
        missing = [f for f in FIELDS if record.get(f) is None]
        if missing:
            raise UsageError(f"{path} line {number}: missing field {missing[0]!r}")
        paths = tuple(str(directory / "images" / f"{record[f'image_{k}']}.png") for k in (0, 1))
        items += items_of_example(record, paths)
    return items


def hub_items(dataset, source: str) -> tuple[list[Item], DatasetImages]:
    require_columns(dataset, FIELDS, source)
    items, index = [], {}
    for row, record in enumerate(dataset.select_columns(["id", "caption_0", "caption_1"])):
        ids = (f"{record['id']}/image_0", f"{record['id']}/image_1")
        index |= {ids[0]: (row, "image_0"), ids[1]: (row, "image_1")}
        items += items_of_example(record, ids)
    return items, DatasetImages(dataset, index)


def example_problem(members: list[Item]) -> str | None:
    """The text, image and group scores compare each example's 2 captions x 2 images, once
    each (an id on two lines would merge two examples)."""
    return one_each(
        members,
        lambda item: (item.meta["caption_index"], item.meta["image_index"]),
        [(0, 0), (0, 1), (1, 0), (1, 1)],
        "(caption, image) pairs",
    )


def example_scores(scored: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per example (indexed by group_id): whether its text score and its image score are
    right (each image ranks its own caption first; each caption its own image)."""
    score = scored.pivot_table(
        index="group_id", columns=["caption_index", "image_index"], values="rank_score"
    )
    c0i0, c0i1, c1i0, c1i1 = (score[(j, k)] for j, k in ((0, 0), (0, 1), (1, 0), (1, 1)))
    return (c0i0 > c1i0) & (c1i1 > c0i1), (c0i0 > c0i1) & (c1i1 > c1i0)


def native_metrics(scored: pd.DataFrame) -> dict[str, float]:
    text, image = example_scores(scored)
    return {
        "winoground/text_score": float(text.mean()),
        "winoground/image_score": float(image.mean()),
        "winoground/group_score": float((text & image).mean()),
    }


def stat_columns(scored: pd.DataFrame) -> pd.DataFrame:
    """Per example (SummedStatistics.columns): 1, and whether its group score is right."""
    text, image = example_scores(scored)
    right = (text & image).astype(float)
    return pd.DataFrame({"examples": 1.0, "group_right": right}, index=right.index)


def stat_from_sums(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """winoground/group_score: examples whose group score is right / examples."""
    return {MAIN_METRIC: fraction(sums["group_right"], sums["examples"])}


STATISTICS = SummedStatistics(STAT_METRICS, stat_columns, stat_from_sums)


def load(cfg) -> Benchmark:
    template = check_template(cfg.template)
    directory = data_dir(cfg)
    if directory is None:
        dataset, source = hub_split(cfg, LOCAL_HINT)
        items, images = hub_items(dataset, source)
    else:
        items = local_items(directory)
        images, source = open_image_file, str(directory / "examples.jsonl")
    check_groups(items, source, example_problem)
    return Benchmark("winoground", items, template, images, native_metrics)


# Winoground's official evaluation scores image-text matching and parses no generated text
# (VQAScore, whose yes/no prompt this uses, reads P("Yes")): generated answers are parsed
# with MME's rule.
parse_generated = mme_answer
