"""SugarCrepe (Hsieh et al., NeurIPS 2023): a COCO image with its caption (yes) and a hard
negative caption (no), in seven subsets.

Hub: HuggingFaceM4/SugarCrepe_<subset> (split test; columns image, tested_labels =
[caption, negative] (a sequence of strings), true_label = the caption as a ClassLabel whose
names are every caption of all seven subsets). Local: data_dir holds the release's
<subset>.json files ({id: {filename, caption, negative_caption}}) and image_dir the COCO
val2017 images by file name. Native metrics per subset: pyes_acc, how often the caption's
rank_score beats the negative's on the same image, and paired yes/no accuracy (both
right); and their means over subsets. rank_score follows scoring.rank_by: P(yes) under
the softmax over the whole vocabulary (p_yes, the default: what VQAScore does) or the
log-odds yes_logit - no_logit (log_odds); the two can order a pair differently."""

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from sysattn_exp.benchmarks.base import (
    Benchmark,
    DatasetImages,
    DatasetsByPrefix,
    Item,
    SummedStatistics,
    check_groups,
    check_template,
    data_dir,
    fraction,
    hub_dataset,
    image_dir,
    mme_answer,
    one_each,
    open_image_file,
    read_json,
    require_columns,
)
from sysattn_exp.errors import UsageError

MAIN_METRIC = "sugarcrepe/mean_pyes_acc"  # the native metric the report shows
STAT_METRICS = (MAIN_METRIC,)  # given SE, CI and change statistics (evaluation.stats)
SUBSETS = [
    "add_att",
    "add_obj",
    "replace_att",
    "replace_obj",
    "replace_rel",
    "swap_att",
    "swap_obj",
]
LOCAL_HINT = "the release's <subset>.json files (and benchmark.image_dir=COCO val2017)"


def pair(subset: str, key: str, image_id: str, caption: str, negative: str) -> list[Item]:
    group = f"{subset}/{key}"
    return [
        Item(
            f"{group}/{polarity}",
            group,
            image_id,
            text,
            polarity == "positive",
            {"subset": subset, "polarity": polarity},
        )
        for polarity, text in (("positive", caption), ("negative", negative))
    ]


def chosen_subsets(cfg, available: list[str]) -> list[str]:
    wanted = list(cfg.subsets) if cfg.get("subsets") else available
    missing = [s for s in wanted if s not in available]
    if missing:
        raise UsageError(
            f"benchmark.subsets asks for {missing[0]!r} but there is no {missing[0]}.json"
        )
    if not wanted:
        raise UsageError(f"no SugarCrepe subset found: benchmark.data_dir must hold {LOCAL_HINT}")
    return wanted


def local_items(cfg, directory: Path, images: Path) -> list[Item]:
    available = [s for s in SUBSETS if (directory / f"{s}.json").is_file()]
    items = []
    for subset in chosen_subsets(cfg, available):
        path = directory / f"{subset}.json"
        records = read_json(path)
        if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
            raise UsageError(f"{path}: must be a JSON object {{id: {{filename, caption, ...}}}}")
        for key, record in records.items():
            missing = [f for f in ("filename", "caption", "negative_caption") if not record.get(f)]
            if missing:
                raise UsageError(f"{path} id {key}: missing field {missing[0]!r}")
            image = str(images / record["filename"])
            items += pair(subset, key, image, record["caption"], record["negative_caption"])
    return items


def hub_items(cfg) -> tuple[list[Item], dict]:
    items, sources = [], {}
    for subset in chosen_subsets(cfg, SUBSETS):
        repo = f"{cfg.hub_id}_{subset}"
        dataset = hub_dataset(repo, cfg.split, LOCAL_HINT, cfg.get("revision"))
        require_columns(dataset, ["image", "tested_labels", "true_label"], repo)
        names = dataset.features["true_label"]
        if not hasattr(names, "int2str"):
            raise UsageError(f"{repo}: true_label must be a ClassLabel of captions")
        index = {}
        for row, record in enumerate(dataset.select_columns(["tested_labels", "true_label"])):
            caption, tested = names.int2str(record["true_label"]), record["tested_labels"]
            if len(tested) != 2 or caption not in tested:
                raise UsageError(
                    f"{repo} row {row}: tested_labels must be the caption and one negative"
                )
            # By position, not by text: a negative may read the same as its caption.
            negative = tested[1 - tested.index(caption)]
            image_id = f"{subset}/{row}"
            index[image_id] = (row, "image")
            items += pair(subset, str(row), image_id, caption, negative)
        sources[subset] = DatasetImages(dataset, index)
    return items, sources


def pair_problem(members: list[Item]) -> str | None:
    """pyes_acc compares a caption's score with its negative's on the same image: a group
    is one caption and one negative."""
    return one_each(
        members, lambda item: item.meta["polarity"], ["negative", "positive"], "captions"
    )


def caption_first(rows: pd.DataFrame) -> pd.Series:
    """Per pair (indexed by group_id): whether the caption's rank_score beats the
    negative's."""
    by_group = rows.pivot_table(index="group_id", columns="polarity", values="rank_score")
    return by_group["positive"] > by_group["negative"]


def native_metrics(scored: pd.DataFrame) -> dict[str, float]:
    out = {}
    for subset, rows in scored.groupby("subset", sort=True):
        out[f"sugarcrepe/{subset}/pyes_acc"] = float(caption_first(rows).mean())
        out[f"sugarcrepe/{subset}/paired_accuracy"] = float(
            rows.groupby("group_id")["correct"].all().mean()
        )
    for name in ("pyes_acc", "paired_accuracy"):
        values = [v for k, v in out.items() if k.endswith(f"/{name}")]
        out[f"sugarcrepe/mean_{name}"] = sum(values) / len(values)
    return out


def stat_columns(scored: pd.DataFrame) -> pd.DataFrame:
    """Per pair (SummedStatistics.columns), for each subset of the data: 1 for the pair
    (`<subset>/pairs`) and whether its caption ranks first (`<subset>/pyes`); 0 in other
    subsets'."""
    subset = scored.groupby("group_id")["subset"].first()
    first = caption_first(scored).reindex(subset.index).astype(float)
    values = {}
    for name in sorted(set(subset)):
        member = (subset == name).astype(float)
        values |= {f"{name}/pairs": member, f"{name}/pyes": member * first}
    return pd.DataFrame(values, index=subset.index)


def stat_from_sums(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """sugarcrepe/mean_pyes_acc: the mean over subsets with pairs of pyes / pairs."""
    total, count = 0, 0
    for subset in sorted(name.removesuffix("/pairs") for name in sums if name.endswith("/pairs")):
        pairs = sums[f"{subset}/pairs"]
        total = total + np.where(pairs > 0, fraction(sums[f"{subset}/pyes"], pairs), 0.0)
        count = count + (pairs > 0)
    return {MAIN_METRIC: fraction(total, count)}


STATISTICS = SummedStatistics(STAT_METRICS, stat_columns, stat_from_sums)


def load(cfg) -> Benchmark:
    template = check_template(cfg.template)
    directory = data_dir(cfg)
    if directory is None:
        items, sources = hub_items(cfg)
        images = DatasetsByPrefix(sources)  # one hub dataset per subset; ids start with it
        source = f"{cfg.hub_id}_<subset>"
    else:
        items = local_items(cfg, directory, image_dir(cfg, None))
        images, source = open_image_file, f"benchmark.data_dir={directory}"
    check_groups(items, source, pair_problem)
    return Benchmark("sugarcrepe", items, template, images, native_metrics)


# SugarCrepe's official evaluation scores image-text matching and parses no generated text
# (VQAScore, whose yes/no prompt this uses, reads P("Yes")): generated answers are parsed
# with MME's rule.
parse_generated = mme_answer
