"""The caption job (+task=caption): captions of COCO images under the configured
condition, scored with CHAIR (caption.py). The job skeleton (job.run_job) checks, loads,
writes and logs; this module captions (the baseline's captions kept in the cache
directory, so that the jobs of a sweep caption the baseline once)."""

from pathlib import Path

import pandas as pd

from sysattn_exp.attention.rules import Rule
from sysattn_exp.errors import UsageError
from sysattn_exp.evaluation.caption import caption_predictions, load_coco
from sysattn_exp.evaluation.generation import generate_in_batches
from sysattn_exp.experiment.identity import caption_baseline_key, prompt_ablation
from sysattn_exp.experiment.job import Evaluation, Job, Watch
from sysattn_exp.files import write_atomically
from sysattn_exp.models.ablation import NONE
from sysattn_exp.models.loading import LoadedModel

CAPTION_BENCHMARK = "chair"


class CaptionJob(Job):
    """Captions of the configured COCO images, with the baseline's when there is an edit."""

    benchmark_name = CAPTION_BENCHMARK
    # The benchmark group is not used: the report files the job under "chair".
    config_benchmark = {"name": CAPTION_BENCHMARK}
    logged = ("chair_s", "chair_i")

    def load(self) -> None:
        self.images = load_coco(self.cfg.caption)

    def check(self) -> None:
        ablation = prompt_ablation(self.cfg)
        if ablation != NONE:  # its baseline captions are keyed without one
            raise UsageError(
                f"prompt.ablation={ablation} applies to yes/no jobs; "
                "use prompt.ablation=none with +task=caption"
            )

    def dry_run(self, config) -> tuple[dict, str]:
        images = self.images
        print(f"caption: {len(images)} COCO images (first {images[0].file_name})")
        return {"n_images": len(images)}, f"{len(images)} images"

    def evaluate(self, loaded: LoadedModel, edit: Rule | None, name: str, watch: Watch):
        generate = CaptionGenerator(self.cfg, loaded)
        frame, metrics = caption_predictions(self.cfg, loaded, edit, generate, self.images)
        return Evaluation(frame, metrics, computed=len(self.images))


class CaptionGenerator:
    """Captions in batches of model.batch_size; the baseline's (edit None) kept in
    runtime.cache_dir, so that the jobs of a sweep caption the baseline once."""

    def __init__(self, cfg, loaded):
        self.cfg, self.loaded = cfg, loaded

    def __call__(self, loaded, images, prompts, edit, max_new_tokens) -> list[str]:
        path = self.baseline_file(images, prompts, max_new_tokens) if edit is None else None
        if path is not None and path.exists():
            return pd.read_parquet(path)["caption"].tolist()
        batch_size = self.cfg.model.batch_size
        captions = generate_in_batches(
            loaded,
            images,
            prompts,
            edit,
            max_new_tokens,
            batch_size,
            self.cfg.runtime.progress_seconds,
        )
        if path is not None:
            frame = pd.DataFrame({"caption": captions})
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda p: frame.to_parquet(p, index=False))
        return captions

    def baseline_file(self, images, prompts, max_new_tokens) -> Path | None:
        if not self.cfg.runtime.cache_dir:
            return None
        files = [str(path) for path in images.paths]
        key = caption_baseline_key(self.cfg, self.loaded, files, prompts, max_new_tokens)
        return Path(self.cfg.runtime.cache_dir) / "captions" / f"baseline-{key}.parquet"
