"""The job skeleton (job.run_job) runs any job kind: a kind defined here, in this file
alone, implements only its evaluation, and the skeleton checks the rule and layers, loads
the model once, watches the passes, writes the kind's files, predictions.parquet,
config.yaml and metrics.json last, and falls back to disk when MLflow cannot be reached."""

import logging

import pandas as pd
import pytest
import yaml
from conftest import make_image
from hydra import compose, initialize_config_module

from sysattn_exp.errors import UsageError
from sysattn_exp.evaluation.scoring import score_full_prompts
from sysattn_exp.experiment.conditions import build_edit, intervention_rule
from sysattn_exp.experiment.identity import condition, job_key
from sysattn_exp.experiment.job import Evaluation, Job, run_job
from sysattn_exp.experiment.tracking import DRY_RUN_FILE
from sysattn_exp.models.loading import load_model

QUESTIONS = ["Is there a red circle?", "Is there a blue circle?"]


class ReadoutJob(Job):
    """A stand-in for a new kind: the answer position's yes/no logits of two prompts."""

    benchmark_name = "readout"
    logged = ("mean_yes_logit",)

    def load(self) -> None:
        self.loads = getattr(self, "loads", 0) + 1
        self.images = [make_image("red"), make_image("blue")]

    def check(self) -> None:
        if self.cfg.scoring.yes_words == ["Maybe"]:
            raise UsageError("scoring.yes_words=['Maybe'] is not allowed here")

    def dry_run(self, config) -> tuple[dict, str]:
        return {"n_prompts": len(QUESTIONS)}, f"{len(QUESTIONS)} prompts"

    def evaluate(self, loaded, edit, name, watch) -> Evaluation:
        fmt = loaded.prompt_format(self.cfg.model)
        prompts = [fmt.render(question, True) for question in QUESTIONS]
        yes, no, _ = score_full_prompts(loaded, self.images, prompts, edit, [1], [2])
        frame = pd.DataFrame({"question": QUESTIONS, "yes_logit": yes.tolist()})
        self.seen_before_metrics = []

        def write_note(out_dir):  # an extra file: written before metrics.json
            self.seen_before_metrics = sorted(p.name for p in out_dir.iterdir())
            (out_dir / "note.txt").write_text(name)

        metrics = {"mean_yes_logit": float(yes.mean())}
        return Evaluation(frame, metrics, computed=len(prompts), artifacts=[write_note])


def config(*overrides: str):
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                "model=tiny",
                "runtime.num_workers=0",
                "tracking.uri=http://127.0.0.1:9",  # nothing listens there
                *overrides,
            ],
        )


def test_a_new_job_kind_runs_through_the_skeleton(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = config("intervention=redistribute", "layers=q4")
    job = ReadoutJob(cfg)
    with caplog.at_level(logging.INFO):
        metrics = run_job(job, tmp_path)
    assert job.loads == 1
    # The extra file came before predictions.parquet, config.yaml and metrics.json.
    assert job.seen_before_metrics == []
    names = ["note.txt", "predictions.parquet", "config.yaml", "metrics.json"]
    assert all((tmp_path / name).is_file() for name in names)
    times = [(tmp_path / name).stat().st_mtime_ns for name in names]
    assert times == sorted(times)  # metrics.json last: it marks the job complete
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    name = "readout system->text layers 6-7"
    assert (tmp_path / "note.txt").read_text() == written["job"]["name"] == name
    assert written["layers"]["resolved"] == [6, 7]
    # The skeleton's checks of how the evaluation ran: the rule applied in its two layers,
    # on the rows path (the tiny model's calls are a few rows: fused.choose_path).
    assert metrics["edited_layers"] == 2 and metrics["kernel_path"] == "rows"
    assert list(metrics) == ["mean_yes_logit", "kernel_path", "edited_layers"]
    assert pd.read_parquet(tmp_path / "predictions.parquet")["question"].tolist() == QUESTIONS
    # MLflow unreachable: the results stay on disk, with the command that logs them later.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "could not log to MLflow" in w and f"python -m sysattn_exp.sync {tmp_path}" in w
        for w in warnings
    )
    assert f"{name}: mean_yes_logit={metrics['mean_yes_logit']:.4f}" in caplog.text
    assert written["job"]["key"] == job_key(
        {k: v for k, v in written.items() if k not in ("job", "environment")}
        | {"layers": {k: v for k, v in written["layers"].items() if k != "depth"}},
        job_condition(cfg, written),
    )


def job_condition(cfg, written):
    """The condition the skeleton keyed the job by (no answer words for this kind)."""
    loaded = load_model(cfg.model)
    edit = build_edit(intervention_rule(cfg.intervention), written["layers"]["resolved"])
    return condition(cfg, loaded, edit, ([], []))


def test_the_skeleton_checks_before_the_model_loads_and_dry_runs(tmp_path, capsys):
    with pytest.raises(UsageError, match="scoring.yes_words"):
        run_job(ReadoutJob(config("scoring.yes_words=[Maybe]", "model.name_or_path=x")), tmp_path)
    with pytest.raises(UsageError, match="layers"):
        run_job(ReadoutJob(config("intervention=redistribute", "layers.end=99")), tmp_path)
    summary = run_job(ReadoutJob(config("runtime.dry_run=true")), tmp_path)
    assert summary == {"n_prompts": 2}
    assert "dry run: readout baseline on builtin:tiny" in capsys.readouterr().out
    assert (tmp_path / DRY_RUN_FILE).is_file() and not (tmp_path / "metrics.json").exists()
