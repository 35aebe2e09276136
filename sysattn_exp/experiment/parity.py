"""Parity with published numbers: does a baseline match the literature?

The table of published baselines (sysattn_exp/data/published.yaml, or the file
runtime.published_table names) gives, per model preset, benchmark and metric, the figure
in this tool's units, the protocol it was obtained under (prompt preset, scoring mode and
parser, dtype, image preparation), its source and a tolerance. A baseline job whose model
(preset, pretrained weights) and benchmark (name, split, subsets, all groups) match entries
is compared with them (compare): published_<metric>, published_delta_<metric> (the job's
value minus the figure, in the metric's units), the `parity` tag (match: every |delta| <=
its tolerance; differs; no published figure: no entry for the job) and `parity_note`, the
entries' labels where this tool knowingly differs from the published protocol, or why a
job on other data was not compared (not_compared). A job that differs prints one line
naming the likely causes in order (prompt preset, scoring mode and parser, dtype, image
preparation, system prompt), from its config, then the label.

Settings are the job's config flattened as MLflow params (tracking.flatten: "model.dtype"
-> "auto", lists joined by ",", None as "None"), so that a job and the report (which reads
logged params) compare alike.
"""

import logging
import math
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from sysattn_exp.benchmarks import answer_parser
from sysattn_exp.errors import UsageError
from sysattn_exp.experiment.tracking import flatten

log = logging.getLogger(__name__)
SHIPPED = files("sysattn_exp").joinpath("data", "published.yaml")
MODEL_PRESETS = files("sysattn_exp.conf").joinpath("model")
BENCHMARKS = files("sysattn_exp.conf").joinpath("benchmark")
# Every key an entry must have (null allowed where the source does not say), and the
# optional ones.
FIELDS = (
    "model",
    "benchmark",
    "metric",
    "figure",
    "published_as",
    "prompt",
    "scoring",
    "parser",
    "dtype",
    "image",
    "source",
    "tolerance",
    "tolerance_why",
    "note",
)
OPTIONAL = ("split", "subsets")
REQUIRED_TEXT = ("benchmark", "metric", "published_as", "source", "tolerance_why")
SCORING = (None, "logit", "generate")
PARSERS = (None, "native", "mme")
MATCH, DIFFERS, NONE = "match", "differs", "no published figure"
# Benchmarks this tool knowingly scores otherwise than their published figures: a job of
# one without a table entry says why in parity_note instead of a bare "no published
# figure" (issue 24, point 3; the benchmarks' modules give the protocols).
PROTOCOL_LABELS = {
    "naturalbench": (
        "not comparable: this tool scores NaturalBench's yes/no samples only (yesno_* "
        "metrics); the published Acc, Q-Acc, I-Acc and G-Acc cover all 1,900 samples, "
        "multiple-choice ones included (benchmarks/naturalbench.py)"
    ),
    "winoground": (
        "not comparable with generated-answer figures: Winoground's text, image and group "
        "scores here rank the items' P(yes) (VQAScore's protocol, scoring.rank_by); no "
        "published figure of that protocol for this model is in the table"
    ),
}
STATISTIC_SUFFIXES = (
    "_se",
    "_ci_low",
    "_ci_high",
)  # a metric's statistics (evaluation.stats)  # a baseline job's text metrics: MLflow tags too


@dataclass(frozen=True)
class Entry:
    """One published figure (see the module docstring and published.yaml's header)."""

    models: tuple[str, ...]
    benchmark: str
    metric: str
    figure: float
    published_as: str
    prompt: str | None
    scoring: str | None
    parser: str | None
    dtype: str | None
    image: str | None
    source: str
    tolerance: float
    tolerance_why: str
    note: str | None
    split: str | None = None  # flattened as a param: a list joined by ","
    subsets: str | None = None

    @property
    def metrics(self) -> list[str]:
        """The job metrics whose sum the figure is ("a+b": a published sum)."""
        return self.metric.split("+")


def load_table(path: str | Path | None = None) -> list[Entry]:
    """The entries of `path` (None: the shipped table), each checked: every key of FIELDS,
    no other, text where text is required, a finite figure, a tolerance >= 0, a known
    scoring mode and parser, model presets of conf/model. UsageError naming the file, the
    entry and the key."""
    where = str(path) if path is not None else "sysattn_exp/data/published.yaml"
    try:
        text = Path(path).read_text() if path is not None else SHIPPED.read_text()
        raw = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"runtime.published_table={where}: cannot be read ({error})") from None
    if not isinstance(raw, list):
        raise UsageError(f"{where}: must be a list of entries (published.yaml's header)")
    return [checked_entry(entry, f"{where}: entry {n}") for n, entry in enumerate(raw, 1)]


def checked_entry(raw, where: str) -> Entry:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: must be a mapping of {', '.join(FIELDS)}")
    missing = [key for key in FIELDS if key not in raw]
    unknown = [key for key in raw if key not in FIELDS + OPTIONAL]
    if missing or unknown:
        problem = f"lacks {', '.join(missing)}" if missing else f"has unknown {', '.join(unknown)}"
        raise UsageError(f"{where}: {problem}; keys: {', '.join(FIELDS + OPTIONAL)}")
    for key in REQUIRED_TEXT:
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise UsageError(f"{where}: {key} must be non-empty text")
    models = raw["model"] if isinstance(raw["model"], list) else [raw["model"]]
    for model in models:
        if not MODEL_PRESETS.joinpath(f"{model}.yaml").is_file():
            raise UsageError(f"{where}: model {model!r} is not a preset of conf/model")
    if not BENCHMARKS.joinpath(f"{raw['benchmark']}.yaml").is_file():
        known = ", ".join(sorted(p.name.removesuffix(".yaml") for p in BENCHMARKS.iterdir()))
        raise UsageError(f"{where}: benchmark {raw['benchmark']!r} is not one of {known}")
    figure = number(raw["figure"], where, "figure")
    tolerance = number(raw["tolerance"], where, "tolerance")
    if tolerance < 0:
        raise UsageError(f"{where}: tolerance must be >= 0, not {tolerance}")
    if raw["scoring"] not in SCORING or raw["parser"] not in PARSERS:
        raise UsageError(f"{where}: scoring must be one of {SCORING}, parser one of {PARSERS}")
    fields = {key: raw[key] for key in FIELDS if key not in ("model", "figure", "tolerance")}
    optional = {key: param(raw[key]) for key in OPTIONAL if raw.get(key) is not None}
    return Entry(tuple(models), figure=figure, tolerance=tolerance, **fields, **optional)


def number(value, where: str, key: str) -> float:
    """An entry's `key` (its value `value`) as a finite float; UsageError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"{where}: {key} must be a finite number, not {value!r}")
    return float(value)


def param(value) -> str:
    """A config value as tracking.flatten writes it as an MLflow param."""
    return flatten({"v": value})["v"]


def preset(name: str) -> dict:
    """The model preset `name`: conf/model/<name>.yaml over the presets its defaults list
    names (a model section is flat: a shallow merge is Hydra's)."""
    raw = yaml.safe_load(MODEL_PRESETS.joinpath(f"{name}.yaml").read_text())
    merged: dict = {}
    for base in raw.pop("defaults", []):
        if base != "_self_":
            merged |= preset(base)
    return merged | raw


def same_model_and_benchmark(entry: Entry, settings: dict) -> bool:
    """Whether the job of `settings` (flattened config) ran the entry's model preset
    (its checkpoint id) on the entry's benchmark."""
    paths = {param(preset(model)["name_or_path"]) for model in entry.models}
    return settings.get("model.name_or_path") in paths and (
        settings.get("benchmark.name") == entry.benchmark
    )


def data_differences(entry: Entry, settings: dict) -> list[str]:
    """Why the job's figure is not over what the entry's is: weights other than the
    pretrained ones, another split or subset (an entry without subsets is over all of
    them: a mean over POPE's three splits is not one split's figure), part of the groups
    (benchmark.limit, benchmark.split_half). [] where it is the same data."""
    found = []
    weights = settings.get("model.weights", "pretrained")
    if weights != "pretrained":
        found.append(f"model.weights={weights} (published: pretrained)")
    split = settings.get("benchmark.split")
    if entry.split is not None and split != entry.split:
        found.append(f"benchmark.split={split} (published: {entry.split})")
    subsets = settings.get("benchmark.subsets", "None")
    if subsets != (entry.subsets or "None"):
        found.append(f"benchmark.subsets={subsets} (published: {entry.subsets or 'all'})")
    for key in ("limit", "split_half"):
        if settings.get(f"benchmark.{key}", "None") != "None":
            found.append(f"benchmark.{key}={settings[f'benchmark.{key}']} (part of the data)")
    return found


def matches(entry: Entry, settings: dict) -> bool:
    """Whether the entry's figure is for the job of `settings`: its model and benchmark,
    on the same data with the pretrained weights."""
    return same_model_and_benchmark(entry, settings) and not data_differences(entry, settings)


def not_compared(table: list[Entry], settings: dict) -> str | None:
    """The label of a job with entries for its model and benchmark but none for its data
    (data_differences), e.g. "not compared: benchmark.limit=6 (part of the data)"; None
    where some entry matches or none is for its model and benchmark."""
    if entries_for(table, settings):
        return None
    found = [e for e in table if same_model_and_benchmark(e, settings)]
    reasons = dict.fromkeys(r for e in found for r in data_differences(e, settings))
    return f"not compared: {'; '.join(reasons)}" if reasons else None


def entries_for(table: list[Entry], settings: dict) -> list[Entry]:
    return [entry for entry in table if matches(entry, settings)]


@dataclass(frozen=True)
class Comparison:
    """An entry and the job's value of its metric (None: not computed), their difference."""

    entry: Entry
    value: float | None

    @property
    def delta(self) -> float | None:
        return None if self.value is None else self.value - self.entry.figure

    @property
    def within(self) -> bool:
        return self.delta is not None and abs(self.delta) <= self.entry.tolerance


def metric_value(metrics: dict, entry: Entry) -> float | None:
    """The job's value of the entry's metric (a sum for "a+b"); None where one is missing
    or null (e.g. POPE's mean F1 of a split without a yes answer)."""
    values = [metrics.get(name) for name in entry.metrics]
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    return float(sum(values))


def compare(table: list[Entry], settings: dict, metrics: dict) -> list[Comparison]:
    """The job's comparisons with every entry for its model and benchmark (settings: its
    flattened config; metrics: its baseline metrics by name)."""
    return [Comparison(e, metric_value(metrics, e)) for e in entries_for(table, settings)]


def tag(comparisons: list[Comparison]) -> str:
    """match (every metric within its tolerance), differs, or no published figure."""
    if not comparisons:
        return NONE
    return MATCH if all(c.within for c in comparisons) else DIFFERS


def note(comparisons: list[Comparison]) -> str:
    """The entries' labels where this tool knowingly differs from the published protocol."""
    return "; ".join(dict.fromkeys(c.entry.note for c in comparisons if c.entry.note))


def parity_metrics(comparisons: list[Comparison]) -> dict:
    """published_<metric> and published_delta_<metric> (the job's value minus the
    figure, None where the job has no value), `parity` (tag) and `parity_note` (note)."""
    out: dict = {"parity": tag(comparisons)}
    for c in comparisons:
        out[f"published_{c.entry.metric}"] = c.entry.figure
        out[f"published_delta_{c.entry.metric}"] = c.delta
    if comparisons and note(comparisons):
        out["parity_note"] = note(comparisons)
    return out


def causes(entry: Entry, settings: dict) -> list[str]:
    """The likely causes of a difference, in order: prompt preset, scoring mode and parser,
    dtype, image preparation, system prompt; each where the job's config differs from the
    entry's protocol (or the entry names it). A job on other data is not compared at all
    (data_differences)."""
    found = []
    prompt, template = settings.get("benchmark.prompt"), settings.get("benchmark.template")
    published = f"(published: benchmark.prompt={entry.prompt})"
    if entry.prompt is None:
        found.append("the published prompt is not reproduced by any preset")
    elif template not in (None, "None"):  # it replaces the preset's template
        found.append(f"benchmark.template={template!r} {published}")
    elif prompt != entry.prompt:
        found.append(f"benchmark.prompt={prompt} {published}")
    found += scoring_causes(entry, settings)
    dtype = settings.get("model.dtype")
    if entry.dtype is not None and dtype != entry.dtype:
        found.append(f"model.dtype={dtype} (published: {entry.dtype})")
    if entry.image is not None:
        found.append(f"image: {entry.image}")
    defaults = [param(preset(model).get("system_prompt")) for model in entry.models]
    if settings.get("model.system_prompt") not in defaults:
        found.append("model.system_prompt differs from the preset's")
    return found


def scoring_causes(entry: Entry, settings: dict) -> list[str]:
    """The scoring mode, else the parser, where it differs from the entry's. Parsers are
    compared as the rules they apply to the benchmark (benchmarks.answer_parser: on MME,
    scoring.parser=mme and native are one rule)."""
    mode, parser = settings.get("scoring.mode"), settings.get("scoring.parser")
    if entry.scoring is None:
        return ["the published scoring is not given"]
    if mode != entry.scoring:
        return [f"scoring.mode={mode} (published: {entry.scoring}, parser {entry.parser})"]
    if entry.scoring == "generate" and entry.parser is None:
        return ["the published answers were not read by a rule this tool has"]
    rule = answer_parser(entry.benchmark, entry.parser)
    if entry.scoring == "generate" and answer_parser(entry.benchmark, parser) is not rule:
        return [f"scoring.parser={parser} (published: {entry.parser})"]
    return []


def parity_line(comparisons: list[Comparison], settings: dict) -> str | None:
    """One line for a job that differs: each metric beyond its tolerance against its
    figure, then the likely causes, the entries' label where this tool knowingly differs
    from the published protocol (note) and the source of the first such entry; None for a
    job that matches or has no published figure."""
    off = [c for c in comparisons if not c.within]
    if not off:
        return None
    shown = ", ".join(
        f"{c.entry.metric} {fmt(c.value)} vs {fmt(c.entry.figure)} (delta {fmt(c.delta, '+')}, "
        f"tolerance {fmt(c.entry.tolerance)})"
        for c in off
    )
    reasons = "; ".join(
        f"{n}) {cause}" for n, cause in enumerate(causes(off[0].entry, settings), 1)
    )
    model = settings.get("model.name_or_path")
    line = (
        f"parity: {model} on {settings.get('benchmark.name')} differs from the published: {shown}"
    )
    label = f"; label: {note(off)}" if note(off) else ""
    return (
        line
        + f"; likely causes: {reasons or 'none in the config'}{label}"
        + f"; source: {off[0].entry.source}"
    )


def fmt(value: float | None, sign: str = "") -> str:
    return "n/a" if value is None else f"{value:{sign}.4g}"


def job_settings(cfg) -> dict:
    """The job's config flattened as its MLflow params (tracking.flatten)."""
    return flatten(OmegaConf.to_container(cfg, resolve=True))


def job_parity(cfg, metrics: dict) -> dict:
    """A baseline job's parity metrics (parity_metrics) against runtime.published_table
    (null: the shipped table); prints parity_line where it differs. A job with entries
    for its model and benchmark but not for its data is labelled so (not_compared); one
    without any, of a benchmark scored otherwise than published, by PROTOCOL_LABELS."""
    table = load_table(cfg.runtime.get("published_table"))
    settings = job_settings(cfg)
    comparisons = compare(table, settings, metrics)
    line = parity_line(comparisons, settings)
    if line is not None:
        print(line)
    out = parity_metrics(comparisons)
    label = not_compared(table, settings)
    if label is None and not comparisons:
        label = PROTOCOL_LABELS.get(settings.get("benchmark.name"))
    if label is not None:
        out["parity_note"] = label
    return out


def check_metrics(cfg, names) -> None:
    """Refuse, before the model loads, a table entry for this job whose metric the job
    does not log (a misspelt name would never be compared). `names()`: the job's metric
    names (job_yes_no.metric_names), computed only where an entry applies. UsageError
    naming the file, the metric and the job's metrics (their statistics left out)."""
    entries = entries_for(load_table(cfg.runtime.get("published_table")), job_settings(cfg))
    if not entries:
        return
    try:
        logged = set(names())
    except Exception:  # noqa: BLE001 - as job_yes_no.check_metric_names: a check only
        log.debug("published metric names not checked before scoring", exc_info=True)
        return
    for entry in entries:
        unknown = [name for name in entry.metrics if name not in logged]
        if unknown:
            where = cfg.runtime.get("published_table") or "sysattn_exp/data/published.yaml"
            shown = sorted(n for n in logged if not n.endswith(STATISTIC_SUFFIXES))
            raise UsageError(
                f"{where}: metric {unknown[0]!r} is not one a {entry.benchmark} job logs: "
                + ", ".join(shown)
            )
