"""A job's labels, as the report's table and the tags of its MLflow run show them: the
rule (intervention_label), the layer range (layers_label, aligned_layers), the condition
(condition_names) and the task (job_task). One definition each, so that a tag that
groups runs in the MLflow UI is the same string as the report's column.

`run` below is a run's row as MLflow's search_runs gives it ('params.<key>' and
'tags.<key>' entries: a pd.Series), or a dict of the same keys built from a job's
config.yaml before it is logged (tracking.grouping_tags)."""

import re

import pandas as pd


def intervention_label(run) -> str:
    """The rule's label as the job logged it: job.label (rules.label, the string in the run
    name). A run logged before job.label was: the rule part of its run name (identity.run_name:
    '<benchmark>[ profile] <label> layers <first>-<last>'; a baseline's has no layers)."""
    logged = run.get("params.job.label")
    if isinstance(logged, str):
        return logged
    benchmark = re.escape(str(run.get("params.benchmark.name")))
    name = str(run.get("tags.mlflow.runName"))
    found = re.fullmatch(rf"{benchmark}(?: profile)? (.+) layers \d+-\d+", name)
    return found.group(1) if found else "baseline"


def layers_label(run) -> str:
    """The report's layers column: 'q4 (24-31)' (layers=q4), 'all (0-31)' (every layer),
    '24-31' (layers.start/end), '-' for a job without a rule (a baseline, a prompt
    ablation)."""
    if run["params.intervention.name"] == "none":
        return "-"
    layers = [int(x) for x in str(run["params.layers.resolved"]).split(",")]
    span = f"{layers[0]}-{layers[-1]}"
    unset = (None, "None")
    quarter = run.get("params.layers.quarter")
    if quarter not in unset:
        return f"q{quarter} ({span})"
    if run.get("params.layers.start") in unset and run.get("params.layers.end") in unset:
        return f"all ({span})"
    return span


def aligned_layers(layers: str) -> str:
    """'q4 (24-31)' -> 'q4', 'all (0-31)' -> 'all': the same for models of any depth."""
    return re.sub(r"^(q\d|all) \(.*\)$", r"\1", layers)


def condition_names(interventions: pd.Series, layers: pd.Series) -> pd.Series:
    """'system->text q4'; a condition without layers (a prompt ablation: layers '-') by its
    label alone ('no system tokens')."""
    return (interventions + " " + layers).str.removesuffix(" -")


def job_task(config) -> str:
    """What the job does beside its condition, from its config (a DictConfig or the dict of
    its config.yaml): 'caption' (+task=caption: a caption section), else the readouts it
    records ('profile', 'probes' (which include the lens) or 'lens'; several joined by
    '+'), else 'score'. Configs written before a runtime key existed have it off."""
    if config.get("caption") is not None:
        return "caption"
    runtime = config.get("runtime") or {}
    readouts = ["profile"] if runtime.get("profile") else []
    if runtime.get("probes"):
        readouts.append("probes")
    elif runtime.get("lens"):
        readouts.append("lens")
    return "+".join(readouts) or "score"
