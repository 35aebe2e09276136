"""stats_seconds_beaf_size: the seconds all statistics of one BEAF-sized yes/no job take on
one CPU core (issue 19's cost bound: "a few seconds"), on the path the job takes
(job_yes_no.statistics: shared and BEAF's native metrics, SE, CI, the paired change's CI
and p, McNemar) with the shipped stats settings (10,000 paired resamples).

The job is BEAF's size and group structure: 26,118 questions on 500 original images and
1,727 edits (227 originals with 4 edits, 273 with 3), 11 or 12 questions per original,
each asked on the original and on every edit (a group), the first 3 about objects that
one edit each removes. Predictions are random (the cost does not depend on them).

    python scripts/bench_stats.py [--repeats N]   # prints {"stats_seconds_beaf_size": s}

scripts/bench.py runs it in a process of its own with one BLAS / OpenMP thread
(ONE_CORE), so the figure is one core's whatever the machine."""

import argparse
import json
import statistics
import time

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from sysattn_exp.benchmarks import beaf
from sysattn_exp.benchmarks.base import Benchmark
from sysattn_exp.experiment.identity import DEFAULT_STATS
from sysattn_exp.experiment.job_yes_no import scored_frame
from sysattn_exp.experiment.job_yes_no import statistics as job_statistics

ONE_CORE = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
N_ITEMS = 26_118


def beaf_sized() -> Benchmark:
    """The BEAF-shaped benchmark of the module's docstring (items only, no images)."""
    items = []
    for o in range(500):
        stem = f"COCO_val2014_{o:012d}"
        n_edits = 4 if o < 227 else 3
        # 11 questions each, a 12th for 225 of the 4-edit and 124 of the 3-edit originals.
        n_questions = 12 if o < 225 or 227 <= o < 227 + 124 else 11
        images = [(f"{stem}.jpg", True)] + [(f"{stem}_{e:02d}.png", False) for e in range(n_edits)]
        for q in range(n_questions):
            for e, (image, original) in enumerate(images):
                gone = q < 3 and e == q + 1  # edit q + 1 removed question q's object
                record = {
                    "id": len(items),
                    "image": image,
                    "question": f"Is there a thing {q} in the image?",
                    "orig_img": original,
                    "removed_q": q < 3,
                    "gt": "no" if gone else "yes",
                }
                items.append(beaf.make_item(record, image, "bench"))
    assert len(items) == N_ITEMS
    return Benchmark("beaf", items, "{question}", lambda image_id: None)


def predictions(benchmark: Benchmark, rng, flip: float) -> pd.DataFrame:
    """The columns of a job's predictions, answers right with probability 1 - flip."""
    label = np.array([item.label for item in benchmark.items])
    margin = rng.normal(size=len(label))
    pred = np.where(rng.random(len(label)) < flip, ~label, label)
    return pd.DataFrame(
        {
            "item_id": [item.item_id for item in benchmark.items],
            "group_id": [item.group_id for item in benchmark.items],
            "label": label,
            "pred": pred,
            "correct": pred == label,
            "yes_logit": np.where(pred, np.abs(margin), -np.abs(margin)),
            "no_logit": 0.0,
            "p_yes": 0.5,
        }
    )


def stats_seconds(repeats: int) -> float:
    """The median seconds of job_yes_no.statistics for an intervention job (a scored
    frame and its baseline's) over `repeats` runs, after one warm-up."""
    benchmark = beaf_sized()
    rng = np.random.default_rng(0)
    baseline = scored_frame(benchmark, predictions(benchmark, rng, 0.3), "p_yes")
    condition = scored_frame(benchmark, predictions(benchmark, rng, 0.25), "p_yes")
    cfg = OmegaConf.create(DEFAULT_STATS)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = job_statistics(cfg, benchmark, condition, baseline)
        times.append(time.perf_counter() - start)
    assert out["beaf/f1_tu_id_change_p"] is not None
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps({"stats_seconds_beaf_size": stats_seconds(args.repeats)}))


if __name__ == "__main__":
    main()
