"""Comparing conditions in the MLflow UI (issue 23), through MLflow's own API on a real store
after a demo-size run of the toy model on the toy benchmark's hard split: every job's
benchmark is a dataset input shared by identical configurations, runs carry the tags the
UI groups by (the report's labels), names are unique and say the task, a sweep's parent
run carries its summary, the experiment opens as model training; a store that mixes runs
logged before these tags still reports and syncs; and a real `mlflow server` answers a
search by tags.condition and stops with all its workers."""

import json
import shutil
import sqlite3
import subprocess
import sys
import urllib.request

import mlflow
import pandas as pd
import pytest
import yaml
from cli import read_metrics, run_cli
from mlflow_server import group_members, mlflow_server, stop_group
from omegaconf import OmegaConf

from sysattn_exp.experiment.tracking import EXPERIMENT_KIND, connect

TOY = ["model=toy", "benchmark=toy", "benchmark.limit=6", "runtime.num_workers=0"]
HARD = [*TOY, "benchmark.split=hard", "stats.bootstrap_samples=200"]
# Four conditions: system -> text, system -> image, in Q4 and in every layer.
GRID = ["+sweep=quarters", "layers=q4,all", "intervention.recipients=[text],[image]"]
GROUPING = ("benchmark", "model", "condition", "layers", "task")


def cli(*args, cwd):
    result = run_cli(*args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def sweep_dir_of(cwd, before: set):
    (new,) = set((cwd / "outputs" / "multiruns").iterdir()) - before
    return new


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sweep of a baseline and its profile (+ runtime.profile=false,true), a lens job on
    the demo split, and the four-condition sweep with its report, in one store."""
    cwd = tmp_path_factory.mktemp("ui")
    cli(*HARD, "runtime.profile=false,true", "--multirun", cwd=cwd)
    readouts = sweep_dir_of(cwd, set())
    cli(*TOY, "+task=lens", "benchmark.split=demo", cwd=cwd)
    swept = cli(*HARD, *GRID, "runtime.report_at_end=false", cwd=cwd)
    grid = sweep_dir_of(cwd, {readouts})
    uri = f"sqlite:///{cwd}/outputs/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name("sysattn")
    # The way in, printed at the sweep's end: the runs table, opened as model training.
    address = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
    assert f"(then open {address}?workflowType=machine_learning)" in swept.stdout
    return {"cwd": cwd, "uri": uri, "experiment": experiment, "grid": grid, "readouts": readouts}


def job_runs(store, filter_string: str = "") -> list:
    mlflow.set_tracking_uri(store["uri"])
    query = "tags.`sysattn.kind` = 'job'" + (f" and {filter_string}" if filter_string else "")
    ids = [store["experiment"].experiment_id]
    return mlflow.search_runs(ids, filter_string=query, output_format="list")


def parent_of(sweep_dir) -> str:
    return json.loads((sweep_dir / "mlflow_parent.json").read_text())["run_id"]


def test_every_job_logs_its_benchmark_as_a_dataset_shared_by_identical_configs(store):
    runs = job_runs(store)
    assert len(runs) == 2 + 1 + 4
    inputs = {}
    for run in runs:
        (dataset_input,) = run.inputs.dataset_inputs
        assert {t.key: t.value for t in dataset_input.tags} == {"mlflow.data.context": "evaluation"}
        dataset = dataset_input.dataset
        assert dataset.source_type == "code"  # the toy benchmark is drawn in code
        inputs[run.info.run_id] = (dataset.name, dataset.digest)
        job_dir = run.data.tags["sysattn.job_dir"]
        items = pd.read_parquet(f"{job_dir}/predictions.parquet")
        assert json.loads(dataset.profile)["num_rows"] == len(items)
    split = {r.info.run_id: r.data.params["benchmark.split"] for r in runs}
    assert {inputs[i][0] for i in inputs if split[i] == "hard"} == {"toy split=hard prompt=native"}
    assert {inputs[i][0] for i in inputs if split[i] == "demo"} == {"toy split=demo prompt=native"}
    # Identical configurations share one dataset (one digest), others have their own.
    assert len({inputs[i] for i in inputs if split[i] == "hard"}) == 1
    assert len(set(inputs.values())) == 2
    with sqlite3.connect(store["uri"].removeprefix("sqlite:///")) as db:
        assert db.execute("select count(*) from datasets").fetchone() == (2,)
    # MLflow's own dataset filter (the runs table's Dataset filter) finds them.
    hard = job_runs(store, "dataset.name = 'toy split=hard prompt=native'")
    assert sorted(r.info.run_id for r in hard) == sorted(i for i in split if split[i] == "hard")
    assert len(job_runs(store, "dataset.context = 'evaluation'")) == len(runs)


def test_tags_are_the_reports_labels(store):
    """condition and layers equal the report's columns (its comparison.csv), and each tag
    equals what the run's params say, read independently."""
    report = store["cwd"] / "report-grid"
    command = [sys.executable, "-m", "sysattn_exp.report", f"tracking.uri={store['uri']}"]
    command += [f"report.parent={parent_of(store['grid'])}", f"report.out={report}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(report / "comparison.csv")
    edits = table[table["intervention"] != "baseline"]
    # The report's layer column with its span: 'q4 (3-3)', 'all (0-3)'; the tag by quarter.
    pairs = zip(edits["intervention"], edits["layers"], strict=True)
    reported = {(rule, layers.split(" ")[0]) for rule, layers in pairs}
    runs = job_runs(store)
    grid = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_of(store["grid"])]
    assert {(r.data.tags["condition"], r.data.tags["layers"]) for r in grid} == reported
    for run in runs:
        tags, params = run.data.tags, run.data.params
        assert tags["benchmark"] == params["benchmark.name"] == "toy"
        assert tags["model"] == params["model.name_or_path"] == "builtin:toy"
        if params["intervention.name"] == "none":
            assert (tags["condition"], tags["layers"]) == ("baseline", "-")
        else:
            recipients = params["intervention.recipients"].replace(",", "+")
            assert tags["condition"] == f"{params['intervention.source']}->{recipients}"
            quarter = params["layers.quarter"]
            assert tags["layers"] == ("all" if quarter == "None" else f"q{quarter}")
            # The runs table's yes-rate change column, beside paired accuracy's.
            metrics = run.data.metrics
            yes_change = 100 * (metrics["yes_rate"] - metrics["baseline_yes_rate"])
            assert metrics["yes_rate_change_points"] == pytest.approx(yes_change)
        want = "profile" if params["runtime.profile"] == "True" else "score"
        assert tags["task"] == ("lens" if params["runtime.lens"] == "True" else want)
    # The search box: every Q4 run of one condition.
    (q4,) = job_runs(store, "tags.condition = 'system->text' and tags.layers = 'q4'")
    assert (q4.data.params["layers.resolved"], q4.data.params["intervention.recipients"]) == (
        "3",
        "text",
    )


def test_run_names_are_unique_and_say_the_task(store):
    names = sorted(r.info.run_name for r in job_runs(store))
    assert len(set(names)) == len(names)
    assert {"toy baseline", "toy profile", "toy lens"} <= set(names)


def holm_significant(p_values: list[float], alpha: float = 0.05) -> int:
    """Holm's step-down procedure by hand: reject the k-th smallest p while p <= alpha/(m-k)."""
    count = 0
    for k, p in enumerate(sorted(p_values)):
        if p > alpha / (len(p_values) - k):
            break
        count += 1
    return count


def test_the_parent_run_tells_what_the_sweep_found(store):
    """Against the job folders' metrics.json, read independently of the report."""
    jobs = sorted(store["grid"].glob("job*"))
    metrics = [read_metrics(j) for j in jobs]
    configs = [yaml.safe_load((j / "config.yaml").read_text()) for j in jobs]
    changes = [m["paired_accuracy_change_points"] for m in metrics]
    # The first of the best, in the report's order (by rule label, then layer range).
    order = sorted(
        range(len(jobs)), key=lambda i: (configs[i]["job"]["label"], layer_name(configs[i]))
    )
    best = next(i for i in order if changes[i] == max(changes))
    parent = mlflow.MlflowClient(store["uri"]).get_run(parent_of(store["grid"]))
    got, prefix = parent.data.metrics, "summary/toy/"
    assert got[prefix + "baseline_paired_accuracy"] == pytest.approx(
        metrics[0]["baseline_paired_accuracy"]
    )
    assert got[prefix + "baseline_yes_rate"] == pytest.approx(metrics[0]["baseline_yes_rate"])
    assert got[prefix + "n_conditions"] == len(jobs)
    assert got[prefix + "best_paired_accuracy_change_points"] == pytest.approx(max(changes))
    yes_change = 100 * (metrics[best]["yes_rate"] - metrics[best]["baseline_yes_rate"])
    assert got[prefix + "best_yes_rate_change_points"] == pytest.approx(yes_change)
    p_values = [m["paired_accuracy_mcnemar_p"] for m in metrics]
    assert got[prefix + "n_significant"] == holm_significant(p_values)
    label = f"{configs[best]['job']['label']} {layer_name(configs[best])}"
    assert parent.data.tags[prefix + "best_condition"] == label
    # The sweep of a baseline and its profile: no condition, so no best one.
    readouts = mlflow.MlflowClient(store["uri"]).get_run(parent_of(store["readouts"]))
    assert readouts.data.metrics[prefix + "n_conditions"] == 0
    assert not any(k.endswith("best_condition") for k in readouts.data.tags)


def layer_name(config: dict) -> str:
    """'q4 (3-3)' / 'all (0-3)', as the report's layers column names a range."""
    resolved, quarter = config["layers"]["resolved"], config["layers"]["quarter"]
    span = f"{resolved[0]}-{resolved[-1]}"
    return f"q{quarter} ({span})" if quarter is not None else f"all ({span})"


def test_the_experiment_opens_as_model_training(store, tmp_path):
    assert dict([EXPERIMENT_KIND]) == {"mlflow.experimentKind": "custom_model_development"}
    assert store["experiment"].tags["mlflow.experimentKind"] == "custom_model_development"
    # A store made before: its experiment gets the tag when a job connects; a kind chosen
    # in the UI is left as it is.
    for name, before, after in [
        ("old", {}, "custom_model_development"),
        ("chosen", {"mlflow.experimentKind": "genai_development"}, "genai_development"),
    ]:
        uri = f"sqlite:///{tmp_path / name}.db"
        mlflow.set_tracking_uri(uri)
        mlflow.create_experiment("sysattn", tags=before)
        tracking = OmegaConf.create({"uri": uri, "experiment": "sysattn", "artifact_location": "a"})
        _, experiment_id = connect(tracking)
        assert mlflow.get_experiment(experiment_id).tags.get("mlflow.experimentKind") == after


def test_a_store_with_runs_logged_before_the_tags_still_reports_and_syncs(store, tmp_path):
    """Runs logged before this change have no grouping tags, and job folders written before
    job.label have none in config.yaml: the report reads the old runs as before, and sync
    logs an old folder with tags taken from its run name, beside the old runs."""
    db = tmp_path / "mixed.db"
    shutil.copy(store["uri"].removeprefix("sqlite:///"), db)
    uri = f"sqlite:///{db}"
    client = mlflow.MlflowClient(uri)
    grid = parent_of(store["grid"])
    for run in job_runs(store):
        if run.data.tags.get("mlflow.parentRunId") == grid:
            for key in GROUPING:
                client.delete_tag(run.info.run_id, key)
    old = tmp_path / "old-job"
    shutil.copytree(sorted(store["grid"].glob("job*"))[-1], old)
    (old / "mlflow_run.json").unlink()
    config = yaml.safe_load((old / "config.yaml").read_text())
    label = config["job"].pop("label")
    for key in ("profile", "lens", "probes"):
        config["runtime"].pop(key)
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    sync = subprocess.run(
        [sys.executable, "-m", "sysattn_exp.sync", str(old), "--tracking-uri", uri],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sync.returncode == 0, sync.stderr[-3000:]
    assert "logged 1 job(s)" in sync.stdout
    mlflow.set_tracking_uri(uri)
    (synced,) = mlflow.search_runs(
        experiment_names=["sysattn"],
        filter_string=f"tags.`sysattn.job_dir` = '{old.resolve()}'",
        output_format="list",
    )
    assert synced.data.tags["condition"] == label and synced.data.tags["task"] == "score"
    out = tmp_path / "report"
    command = [sys.executable, "-m", "sysattn_exp.report", f"tracking.uri={uri}"]
    command += ["report.parent=all", f"report.out={out}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(out / "comparison.csv")
    assert len(table[table["intervention"] != "baseline"]) == 4  # the old runs and the synced
    summary = subprocess.run(
        [*command[:-2], f"report.parent={grid}", f"report.out={tmp_path / 'grid'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert summary.returncode == 0, summary.stderr[-3000:]
    tags = client.get_run(grid).data.tags
    assert tags["summary/toy/best_condition"].startswith("system->")


def test_a_real_server_answers_a_search_by_condition_and_stops_with_its_workers(store, tmp_path):
    """`mlflow server` on the store (with MLflow's job runner, as `mlflow ui` starts it),
    its REST API's runs/search grouped by tags.condition; then SIGTERM to its process group
    ends every process in it."""
    experiment_id = store["experiment"].experiment_id
    want = {r.info.run_id for r in job_runs(store, "tags.condition = 'system->text'")}
    assert len(want) == 2
    with mlflow_server(store["uri"], tmp_path) as (url, process):
        assert len(group_members(process.pid)) > 1, "the server and its workers"
        found = {}
        for condition in ("system->text", "system->image", "baseline"):
            body = {"experiment_ids": [experiment_id], "filter": f"tags.condition = '{condition}'"}
            request = urllib.request.Request(
                url + "/api/2.0/mlflow/runs/search",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as answer:
                found[condition] = json.load(answer)["runs"]
        assert {r["info"]["run_id"] for r in found["system->text"]} == want
        for condition, runs in found.items():
            tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
            assert {t["condition"] for t in tags} == {condition}
            names = {r["inputs"]["dataset_inputs"][0]["dataset"]["name"] for r in runs}
            assert names <= {"toy split=hard prompt=native", "toy split=demo prompt=native"}
        layers = [t["value"] for r in found["system->image"] for t in r["data"]["tags"]
                  if t["key"] == "layers"]  # fmt: skip
        assert sorted(layers) == ["all", "q4"]
        assert len(found["baseline"]) == 3  # the baseline, its profile and the lens job
        assert stop_group(process), "SIGTERM to the group ended the server and its workers"
    assert group_members(process.pid) == []


def test_dataset_names_and_sources_say_where_the_items_came_from(tmp_path):
    """Local data by its resolved path, hub data by its id, split and revision; a template
    given in place of the preset by its hash (two templates, two datasets)."""
    from sysattn_exp.experiment.benchmark_dataset import dataset_name, dataset_source

    pairs = str(tmp_path / "pairs.jsonl")
    local = {"benchmark": {"name": "jsonl", "path": pairs, "prompt": "native"}}
    assert dataset_name(local) == "jsonl prompt=native"
    assert dataset_source(local).to_dict() == {"uri": pairs}
    hub = {"name": "pope", "hub_id": "lmms-lab/POPE", "split": "test", "revision": "r1"}
    hub |= {"subsets": ["random", "adversarial"], "prompt": "llava"}
    name = dataset_name({"benchmark": hub})
    assert name == "pope split=test subsets=random,adversarial prompt=llava"
    source = dataset_source({"benchmark": hub})
    assert (source.path, source.split, source.revision) == ("lmms-lab/POPE", "test", "r1")
    assert source._get_source_type() == "hugging_face"
    templates = ("{question}?", "{question}")
    names = {dataset_name({"benchmark": hub | {"template": t}}) for t in templates}
    assert len(names) == 2 and all(" prompt=template:" in n for n in names)
    caption = {"benchmark": {"name": "chair"}, "caption": {"data_dir": str(tmp_path)}}
    assert dataset_name(caption) == "chair"
    assert dataset_source(caption).to_dict() == {"uri": str(tmp_path)}


def test_summary_of_two_models_and_the_caption_benchmark():
    """A hand-made report table: per benchmark and model (two models), the caption
    benchmark's best condition is its lowest CHAIR_s change; no test, no n_significant."""
    from sysattn_exp.experiment.parent_summary import summary
    from sysattn_exp.experiment.report import COLUMNS

    def row(benchmark, model, intervention, layers, **values):
        named = {"benchmark": benchmark, "model": model, "setting": "", "layers": layers}
        untested = {"p_corrected": None, "significant": None}
        return named | {"intervention": intervention} | untested | values

    rows = [
        row("chair", "a", "baseline", "-", native_value=0.4),
        row("chair", "a", "system->text", "q4 (6-7)", native_change_points=3.0),
        row("chair", "a", "system->image", "q4 (6-7)", native_change_points=-5.0),
        row("toy", "a", "baseline", "-", paired_accuracy=0.5, yes_rate=0.7),
        row(
            "toy",
            "a",
            "system->text",
            "all (0-7)",
            paired_accuracy_change_points=2.0,
            yes_rate_change_points=-4.0,
            p_corrected=0.01,
            significant="yes",
        ),
        row(
            "toy",
            "a",
            "system->image",
            "all (0-7)",
            paired_accuracy_change_points=-1.0,
            yes_rate_change_points=1.0,
            p_corrected=0.5,
            significant="no",
        ),
        row("toy", "b (2 layers)", "baseline", "-", paired_accuracy=0.25, yes_rate=0.9),
    ]
    metrics, tags = summary(pd.DataFrame(rows, columns=COLUMNS))
    assert metrics == {
        "summary/chair/a/baseline_chair_s": 0.4,
        "summary/chair/a/n_conditions": 2.0,
        "summary/chair/a/best_chair_s_change_points": -5.0,
        "summary/toy/a/baseline_paired_accuracy": 0.5,
        "summary/toy/a/baseline_yes_rate": 0.7,
        "summary/toy/a/n_conditions": 2.0,
        "summary/toy/a/n_significant": 1.0,
        "summary/toy/a/best_paired_accuracy_change_points": 2.0,
        "summary/toy/a/best_yes_rate_change_points": -4.0,
        "summary/toy/b _2 layers_/baseline_paired_accuracy": 0.25,
        "summary/toy/b _2 layers_/baseline_yes_rate": 0.9,
        "summary/toy/b _2 layers_/n_conditions": 0.0,
    }
    assert tags == {
        "summary/chair/a/best_condition": "system->image q4 (6-7)",
        "summary/toy/a/best_condition": "system->text all (0-7)",
    }
