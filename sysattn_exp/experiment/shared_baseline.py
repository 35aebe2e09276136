"""One baseline per sweep: the jobs of a sweep that start together (a SLURM array, or
submitit_local) share the baseline's scores through the score cache, and compute each of
its items exactly once between them.

How: the baseline's batches (scoring.plan_batches, the same in every job) are cut into
parts of about `runtime.baseline_part_items` items, and each part is claimed with a lease
(sysattn_exp.experiment.claim) before it is computed. A job claims and computes every part nobody
holds, then computes its own intervention while the parts others hold are finished, then
waits for those (polling the cache), taking over the claim of a job that died or stopped
beating for `runtime.lease_seconds`. With 12 jobs starting at once, each computes about a
twelfth of the baseline and no GPU waits while work is left.

Why not the alternatives: a first job that the others wait for leaves 11 GPUs idle for a
whole baseline (or does the baseline alone, then its intervention, while the others end
early); a launcher-side stage runs where Hydra's launcher runs, the login node for
submitit's SLURM launcher, which has no GPU. One claim on the whole baseline would fix the
GPU time but not the wall time: its holder computes baseline and intervention, twice as long
as the rest. Parts are named by a hash of their item keys, so jobs that cut the baseline
differently (another batch size) never share a claim for different items.
"""

import logging
import time
from pathlib import Path

from sysattn_exp.evaluation.cache import ScoreCache, digest
from sysattn_exp.evaluation.scoring import item_keys, plan_batches, score_batches
from sysattn_exp.experiment.claim import Claims

log = logging.getLogger(__name__)


def cut_parts(plan: list[list[int]], part_items: int) -> list[list[list[int]]]:
    """Consecutive batches of the plan, grouped until a group has >= part_items items."""
    parts, current = [], []
    for batch in plan:
        current.append(batch)
        if sum(len(b) for b in current) >= part_items:
            parts.append(current)
            current = []
    return parts + ([current] if current else [])


class SharedBaseline:
    """The baseline's parts of one job: `compute_free_parts()` first, `finish()` once the
    job's other work is done; then every baseline item is in `cache`. `computed` and
    `seconds`: items this job scored and the time it spent scoring them."""

    def __init__(self, loaded, benchmark, prompts, words, cache: ScoreCache, settings: dict):
        self.loaded, self.benchmark, self.prompts, self.words = loaded, benchmark, prompts, words
        self.cache, self.settings = cache, settings
        self.keys = item_keys(benchmark, prompts, cache)
        plan = plan_batches([item.image_id for item in benchmark.items], settings["batch_size"])
        self.parts = cut_parts(plan, settings["part_items"])
        self.names = [
            "baseline-" + digest([self.keys[j] for batch in part for j in batch])
            for part in self.parts
        ]
        self.claims = Claims(Path(cache.dir) / "claims", settings["lease_seconds"])
        self.pending: list[int] = []
        self.computed, self.seconds = 0, 0.0

    def missing(self, index: int, done: dict) -> list[list[int]]:
        return [b for b in self.parts[index] if not all(self.keys[j] in done for j in b)]

    def work_on(self, index: int, done: dict) -> bool:
        """Compute part `index` if it is missing and this job can claim it; True when the
        part is done (by anyone), False while another job holds it."""
        if not self.missing(index, done):
            return True
        lease = self.claims.try_claim(self.names[index])
        if lease is None:
            return False
        with lease:
            batches = self.missing(index, self.cache.load())  # done while we claimed it?
            if batches:
                self.compute(index, batches)
            if lease.lost:
                log.warning("baseline part %d: another job took it over meanwhile", index + 1)
        return True

    def compute(self, index: int, batches: list[list[int]]) -> None:
        n_items = sum(len(b) for b in batches)
        started = time.perf_counter()
        score_batches(
            self.loaded,
            self.benchmark,
            self.prompts,
            batches,
            self.keys,
            None,
            self.words,
            self.settings["num_workers"],
            f"baseline part {index + 1}/{len(self.parts)}",
            self.cache,
            progress_seconds=self.settings["progress_seconds"],
        )
        seconds = time.perf_counter() - started
        self.computed, self.seconds = self.computed + n_items, self.seconds + seconds
        log.info(
            "baseline part %d of %d: %d items computed by this job (%.3g items/s)",
            index + 1,
            len(self.parts),
            n_items,
            n_items / seconds if seconds > 0 else float("inf"),
        )

    def compute_free_parts(self) -> None:
        """Every part that is neither done nor held by a live job: claimed and computed."""
        done = self.cache.load()
        cached = sum(key in done for key in self.keys)
        missing = sum(bool(self.missing(i, done)) for i in range(len(self.parts)))
        log.info(
            "baseline: %d of %d items from the score cache; %d of %d parts to compute, "
            "shared with any job computing them too",
            cached,
            len(self.keys),
            missing,
            len(self.parts),
        )
        self.pending = [i for i in range(len(self.parts)) if not self.work_on(i, done)]
        if self.pending:
            log.info(
                "baseline: %d of %d parts are being computed by other jobs",
                len(self.pending),
                len(self.parts),
            )

    def finish(self) -> None:
        """Wait until the parts other jobs hold are done, taking over those whose holder is
        gone (its lease expired)."""
        poll = min(max(self.settings["lease_seconds"] / 20, 0.05), 15.0)
        waited = False
        while self.pending:
            done = self.cache.load()
            self.pending = [i for i in self.pending if not self.work_on(i, done)]
            if self.pending:
                if not waited:
                    log.info("baseline: waiting for %d parts other jobs hold", len(self.pending))
                    waited = True
                time.sleep(poll)
