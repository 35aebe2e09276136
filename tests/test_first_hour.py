"""What a newcomer meets in the first hour (issue 18, section 7), through the real command
line: dry runs check layers and whole sweeps and log nothing, the model path stops at once
without a network, a profile job is named and shown as a profile."""

import os
import subprocess
import sys
import textwrap
import time

import mlflow
import pandas as pd
import pytest
import yaml
from cli import run_cli
from test_profile_heads import assert_sink_atlas_of_the_job

TOY = ["model=toy", "runtime.num_workers=0", "runtime.cache_dir=null"]


def runs_in(cwd) -> list:
    db = cwd / "outputs" / "mlflow.db"
    if not db.exists():
        return []
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    return mlflow.search_runs(experiment_names=["sysattn"], output_format="list")


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("intervention", ["intervention=none", "intervention=redistribute"])
def test_dry_run_refuses_layers_outside_the_model(tmp_path, intervention):
    """The toy model has 4 decoder layers (its config); a baseline's range is checked too,
    as the same config with an intervention would fail."""
    result = run_cli(
        *TOY, intervention, "layers.start=3", "layers.end=9", "runtime.dry_run=true", cwd=tmp_path
    )
    assert "layers [3, 9) is outside the model's 4 decoder layers" in one_line_error(result)


def test_dry_run_of_a_sweep_checks_every_job_and_logs_nothing(tmp_path):
    """A real sweep, then a dry run of +sweep=quarters: twelve lines, one per job, exit 0,
    no run and no parent run added to the store; the report still finds the real sweep."""
    real = run_cli(
        "-m", *TOY, "intervention=redistribute", "layers=q3,q4", "benchmark.limit=2", cwd=tmp_path
    )
    assert real.returncode == 0, real.stderr[-3000:]
    before = {r.info.run_id for r in runs_in(tmp_path)}
    assert len(before) == 3  # the parent and two jobs
    dry = run_cli(*TOY, "+sweep=quarters", "runtime.dry_run=true", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    lines = [line for line in dry.stdout.splitlines() if line.startswith("dry run job")]
    assert len(lines) == 12
    assert lines[11] == (
        "dry run job11: toy system->image+text layers 3-3 on builtin:toy (4 layers): "
        "72 items, 36 groups: config ok"
    )
    assert dry.stdout.count("example prompt") == 1
    assert "dry run: 12 of 12 jobs' configs are valid; nothing was run or logged" in dry.stdout
    assert "Traceback" not in dry.stderr and "failed" not in dry.stderr
    assert {r.info.run_id for r in runs_in(tmp_path)} == before
    report = subprocess.run(
        [sys.executable, "-m", "sysattn_exp.report"], capture_output=True, text=True, cwd=tmp_path
    )
    assert report.returncode == 0, report.stderr[-3000:]
    table = pd.read_csv(tmp_path / "outputs" / "report" / "comparison.csv")
    assert sorted(table["layers"]) == ["-", "q3 (2-2)", "q4 (3-3)"]


def test_dry_run_of_a_sweep_with_a_bad_job_names_it(tmp_path):
    result = run_cli(
        "-m",
        *TOY,
        "intervention=redistribute",
        "layers.end=9,4",
        "runtime.dry_run=true",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "dry run: 1 of 2 jobs' configs are valid" in result.stdout
    assert "error: 1 of 2 jobs failed: layers [0, 9) is outside" in result.stderr
    assert not runs_in(tmp_path)


def no_network(tmp_path) -> dict:
    """An environment in which every connection is refused at once (a proxy on a closed
    port) and the Hugging Face cache is empty."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HTTP"))}
    proxy = "http://127.0.0.1:9"
    return env | {"HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "HF_HOME": str(tmp_path / "hf")}


def test_model_path_without_network_stops_at_once(tmp_path):
    """The hub is unreachable and nothing is cached: one line at once (transformers' own
    retries took 30 to 47 s before their error). Timed around load_config alone, in a fresh
    process: the bound is generous, retries take far longer."""
    probe = textwrap.dedent(
        """
        import time
        from omegaconf import OmegaConf
        from sysattn_exp.errors import UsageError
        from sysattn_exp.models.loading import load_config
        cfg = OmegaConf.create({"name_or_path": "Qwen/Qwen2-VL-7B-Instruct", "revision": None})
        start = time.monotonic()
        try:
            load_config(cfg)
        except UsageError as error:
            print(f"{time.monotonic() - start:.3f}", error)
        """
    )
    env = no_network(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120
    )
    seconds, message = result.stdout.split(" ", 1)
    assert float(seconds) < 5.0, result.stdout
    assert "cannot reach the Hugging Face hub" in message and "local cache has no copy" in message
    cli = subprocess.run(
        [sys.executable, "-m", "sysattn_exp", "model=qwen2_vl_7b", "runtime.dry_run=true"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert "model.name_or_path='Qwen/Qwen2-VL-7B-Instruct': cannot reach" in one_line_error(cli)


def test_model_path_without_network_uses_the_cached_copy(tmp_path):
    """A checkpoint in the local cache (laid out as the hub client stores it) is used
    without a network, with one warning, as HF_HUB_OFFLINE=1 would."""
    from sysattn_exp.models.tiny import build_tiny_llava

    model, processor = build_tiny_llava(seed=0)
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-llava"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model.save_pretrained(repo / "snapshots" / commit)
    processor.save_pretrained(repo / "snapshots" / commit)
    start = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sysattn_exp",
            "model.name_or_path=someone/tiny-llava",
            "benchmark.limit=2",
            "runtime.dry_run=true",
        ],
        capture_output=True,
        text=True,
        env=no_network(tmp_path),
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "using the copy of someone/tiny-llava in the local cache" in result.stdout + result.stderr
    )
    assert "dry run: toy baseline on someone/tiny-llava (8 layers)" in result.stdout
    assert time.monotonic() - start < 120


def test_profile_job_is_named_a_profile_prints_its_shares_and_draws_the_sink_atlas(tmp_path):
    result = run_cli(*TOY, "+task=profile", "benchmark.limit=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = (tmp_path / "outputs" / "runs").iterdir()
    assert yaml.safe_load((job / "config.yaml").read_text())["job"]["name"] == "toy profile"
    (run,) = runs_in(tmp_path)
    assert run.info.run_name == "toy profile"
    table = pd.read_csv(job / "attention_profile.csv")
    answer = table[table["queries"] == "answer"]
    out = result.stdout.splitlines()
    start = out.index("toy profile: share of the answer position's attention per decoder layer")
    assert out[start + 1].split() == ["system", "%", "image", "%", "text", "%"]
    assert out[start + 2].split() == ["layer"]
    rows = out[start + 3 : start + 3 + len(answer)]
    printed = {int(r.split()[0]): [float(x) for x in r.split()[1:]] for r in rows}
    assert sorted(printed) == sorted(answer["layer"]) == [0, 1, 2, 3]
    for row in answer.itertuples():
        expected = [100 * row.system, 100 * row.image, 100 * row.text]
        assert printed[row.layer] == pytest.approx(expected, abs=0.05 + 1e-9)
    assert_sink_atlas_of_the_job(job, result.stdout, run)  # the per-head files (issue 20)


def test_dry_run_of_a_caption_sweep_checks_every_job(tmp_path):
    from test_caption_job import write_coco

    coco = write_coco(tmp_path / "coco")
    result = run_cli(
        "-m",
        *TOY,
        "+task=caption",
        f"caption.data_dir={coco}",
        "intervention=redistribute",
        "layers=q1,q4",
        "runtime.dry_run=true",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("dry run job")]
    assert lines == [
        f"dry run job{n}: chair system->text layers {k}-{k} on builtin:toy (4 layers): "
        "4 images: config ok"
        for n, k in ((0, 0), (1, 3))
    ]
    assert "dry run: 2 of 2 jobs' configs are valid" in result.stdout
    assert not runs_in(tmp_path)
