"""`+task=caption`: caption COCO val2014 images with the model (any intervention on) and
score the captions with CHAIR. Loads the ground truth, asks a generation function for the
captions (and, with an intervention, for the baseline's) and gives predictions.parquet's
rows (one per image: its caption and objects) and the job's metrics; the job skeleton
(job.run_job, through job_caption.CaptionJob) writes and logs them like any job's."""

import json
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from sysattn_exp.benchmarks.images import decode_errors, open_image
from sysattn_exp.errors import UsageError
from sysattn_exp.evaluation.chair import (
    CHAIR_STATISTICS,
    caption_counts,
    chair_metrics,
    ground_truth_objects,
    score_caption,
    vocabulary,
)
from sysattn_exp.evaluation.stats import bootstrap_statistics, mcnemar_test
from sysattn_exp.files import read_text

INSTANCES = "instances_val2014.json"
CAPTIONS = "captions_val2014.json"

# generate_fn(loaded, images, prompts, edit, max_new_tokens) -> one caption per image
GenerateFn = Callable[[object, Sequence[Image.Image], list[str], object, int], list[str]]


@dataclass(frozen=True)
class CocoImage:
    image_id: int
    file_name: str
    path: Path
    ground_truth: frozenset[str]  # COCO objects, from instances and reference captions


class LazyImages(Sequence):
    """The images, decoded when indexed (500 decoded COCO images would hold ~0.5 GB)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [open_image(p) for p in self.paths[index]]
        return open_image(self.paths[index])


def read_annotations(data_dir: Path, name: str, keys: list[str]) -> dict:
    """One COCO annotation file of data_dir, checked for the lists CHAIR reads."""
    path = data_dir / name
    expected = f"the COCO 2014 annotation file {name} (with {', '.join(keys)})"
    if not path.is_file():
        raise UsageError(f"{path} not found: caption.data_dir must hold {expected}")
    try:
        data = json.loads(read_text(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read {path} as JSON ({err}); expected {expected}") from None
    for key in keys:
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise UsageError(f"{path} has no list {key!r}; expected {expected}")
    return data


def annotation_dirs(cfg) -> tuple[Path, Path]:
    """(data_dir, image_dir) from the caption config, checked."""
    if not cfg.get("data_dir"):
        raise UsageError(
            f"caption.data_dir is required: a directory with {INSTANCES} and {CAPTIONS}"
        )
    data_dir = Path(cfg.data_dir)
    if not data_dir.is_dir():
        raise UsageError(f"caption.data_dir={data_dir} is not a directory")
    image_dir = Path(cfg.image_dir) if cfg.get("image_dir") else data_dir / "val2014"
    if not image_dir.is_dir():
        raise UsageError(
            f"caption.image_dir={image_dir} is not a directory: it must hold the COCO val2014 "
            "images (COCO_val2014_000000XXXXXX.jpg)"
        )
    return data_dir, image_dir


def listed_ids(path: Path, known: dict[int, str]) -> list[int]:
    """caption.image_list: one COCO image id or file name per line ('#' starts a comment)."""
    if not path.is_file():
        raise UsageError(f"caption.image_list={path} not found")
    by_name = {name: image_id for image_id, name in known.items()}
    ids = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        entry = line.split("#")[0].strip()
        if not entry:
            continue
        image_id = int(entry) if entry.isdigit() else by_name.get(entry)
        if image_id not in known:
            raise UsageError(
                f"caption.image_list={path} line {number}: {entry!r} is not an image of {INSTANCES}"
            )
        ids.append(image_id)
    return list(dict.fromkeys(ids))


def select_ids(cfg, known: dict[int, str]) -> list[int]:
    """Which images to caption: caption.image_list, else `limit` of them drawn with
    random.Random(seed) from every image sorted by id (seed null: the first `limit` by id);
    limit null: all. Returned sorted by id, so the order does not depend on the draw."""
    if cfg.get("image_list"):
        return listed_ids(Path(cfg.image_list), known)
    ids = sorted(known)
    limit, seed = cfg.get("limit"), cfg.get("seed")
    if limit is None:
        return ids
    if limit >= len(ids):
        return ids
    if seed is None:
        return ids[:limit]
    return sorted(random.Random(seed).sample(ids, limit))


def fields(entries: list, path: Path, where: str, *keys: str) -> list[tuple]:
    """The values of `keys` in every entry of a COCO list, or a one-line error naming the
    file and the key an entry lacks."""
    try:
        return [tuple(entry[key] for key in keys) for entry in entries]
    except (KeyError, TypeError) as err:
        raise UsageError(
            f"{path}: an entry of {where!r} has no {err}; expected the COCO format "
            f"with {', '.join(keys)}"
        ) from None


def category_names(instances: dict, path: Path) -> dict[int, str]:
    names = dict(fields(instances["categories"], path, "categories", "id", "name"))
    unknown = sorted(set(names.values()) - set(vocabulary().node))
    if unknown:
        raise UsageError(f"{path}: category {unknown[0]!r} is not one of COCO's 80 objects")
    return names


def load_coco(cfg) -> list[CocoImage]:
    """The images to caption, with their CHAIR ground truth. `cfg` is the caption config
    (data_dir, image_dir, limit, seed, image_list). Every selected image file must exist
    and decode (images.open_image, the conversion every benchmark uses)."""
    vocab = vocabulary(cfg.get("singularize", "original"))
    data_dir, image_dir = annotation_dirs(cfg)
    instances = read_annotations(data_dir, INSTANCES, ["images", "annotations", "categories"])
    captions = read_annotations(data_dir, CAPTIONS, ["annotations"])
    names = category_names(instances, data_dir / INSTANCES)
    known = dict(fields(instances["images"], data_dir / INSTANCES, "images", "id", "file_name"))
    if not known:
        raise UsageError(f"{data_dir / INSTANCES} lists no images")
    ids = select_ids(cfg, known)
    chosen = set(ids)
    categories, references = defaultdict(list), defaultdict(list)
    path = data_dir / INSTANCES
    for image_id, category in fields(
        instances["annotations"], path, "annotations", "image_id", "category_id"
    ):
        if image_id in chosen:
            if category not in names:
                raise UsageError(f"{path}: category_id {category} is not in categories")
            categories[image_id].append(names[category])
    path = data_dir / CAPTIONS
    for image_id, caption in fields(
        captions["annotations"], path, "annotations", "image_id", "caption"
    ):
        if image_id in chosen:
            references[image_id].append(caption)
    images = [
        CocoImage(
            image_id,
            known[image_id],
            image_dir / known[image_id],
            frozenset(ground_truth_objects(categories[image_id], references[image_id], vocab)),
        )
        for image_id in ids
    ]
    missing = [image.path for image in images if not image.path.is_file()]
    if missing:
        raise UsageError(
            f"image {missing[0]} not found ({len(missing)} of {len(images)} missing); "
            "caption.image_dir must hold the COCO val2014 images"
        )
    # Decoded now, in full, so that a file cut short stops the job before the model loads.
    errors = [err for err in decode_errors(open_image, [i.path for i in images]).values() if err]
    if errors:
        raise UsageError(f"{errors[0]} ({len(errors)} of {len(images)} images cannot be read)")
    return images


def caption_prompt(cfg, loaded) -> str:
    """The caption request in the model's own prompt format, with the image."""
    return loaded.prompt_format(cfg.model).render(cfg.caption.prompt, with_image=True)


def caption_rows(images: list[CocoImage], prompt: str, captions: list[str], vocab=None):
    """One row per image for predictions.parquet, and each caption's CHAIR score (`vocab`:
    chair.vocabulary of the configured singulariser; None, the original's)."""
    rows, scores = [], []
    for image, caption in zip(images, captions, strict=True):
        score = score_caption(caption, image.ground_truth, vocab)
        scores.append(score)
        rows.append(
            {
                "image_id": image.image_id,
                "file_name": image.file_name,
                "prompt": prompt,
                "caption": caption,
                "mentioned_words": [w for w, _ in score.mentions],
                "mentioned_objects": [obj for _, obj in score.mentions],
                "hallucinated_objects": [obj for _, obj in score.hallucinated],
                "ground_truth_objects": sorted(image.ground_truth),
                "hallucinated": bool(score.hallucinated),
                "n_words": score.n_words,
            }
        )
    return rows, scores


def caption_predictions(
    cfg, loaded, edit, generate_fn: GenerateFn, images: list[CocoImage]
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Caption the images (load_coco(cfg.caption), loaded beforehand so that bad data
    fails before the model loads) and score them with CHAIR: one row per image for
    predictions.parquet (caption_rows), and the metrics with their statistics
    (caption_statistics). With an edit, the baseline's captions (edit None) give
    baseline_<metric>, the change of CHAIR_s and CHAIR_i in points and its statistics."""
    prompt = caption_prompt(cfg, loaded)
    vocab = vocabulary(cfg.caption.get("singularize", "original"))
    rows, scores = caption_rows(
        images, prompt, captions_of(cfg, loaded, edit, generate_fn, images, prompt), vocab
    )
    metrics = chair_metrics(scores)
    image_ids = [image.image_id for image in images]
    before = None
    if edit is not None:
        baseline_captions = captions_of(cfg, loaded, None, generate_fn, images, prompt)
        baseline_scores = caption_rows(images, prompt, baseline_captions, vocab)[1]
        baseline = chair_metrics(baseline_scores)
        metrics |= {f"baseline_{name}": value for name, value in baseline.items()}
        for name in ("chair_s", "chair_i"):
            metrics[f"{name}_change_points"] = 100.0 * (metrics[name] - baseline[name])
        before = caption_counts(image_ids, baseline_scores)
    metrics |= caption_statistics(caption_counts(image_ids, scores), before, cfg.stats)
    return pd.DataFrame(rows), metrics


def caption_statistics(captions: pd.DataFrame, baseline: pd.DataFrame | None, stats_cfg):
    """chair_s and chair_i's SE and 95% interval from a cluster bootstrap over the images
    (stats.bootstrap_statistics with chair.CHAIR_STATISTICS: one caption per image, so
    the image is the group), with `stats_cfg`'s resamples, seed and interval; with the baseline's
    captions (caption_counts of the same images in the same order), the paired change's
    interval and p-value, and McNemar's exact test on whether each caption hallucinates:
    chair_s_mcnemar_b = captions hallucinating only under the intervention (the
    intervention broke them), chair_s_mcnemar_c = only in the baseline (it fixed them),
    the orientation of the yes/no jobs' b (right only in the baseline) and c (right only
    under the intervention), a caption being right when it hallucinates nothing."""
    samples, seed = stats_cfg.bootstrap_samples, stats_cfg.seed
    method = str(stats_cfg.get("interval", "percentile"))
    out = bootstrap_statistics(captions, baseline, [CHAIR_STATISTICS], samples, seed, method)
    if baseline is not None:
        test = mcnemar_test(~baseline["hallucinated"], ~captions["hallucinated"])
        out |= {f"chair_s_mcnemar_{k}": v for k, v in test.items()}
    return out


def captions_of(cfg, loaded, edit, generate_fn, images, prompt) -> list[str]:
    captions = generate_fn(
        loaded,
        LazyImages([image.path for image in images]),
        [prompt] * len(images),
        edit,
        int(cfg.caption.max_new_tokens),
    )
    if len(captions) != len(images):
        raise RuntimeError(f"generation returned {len(captions)} captions for {len(images)}")
    return list(captions)
