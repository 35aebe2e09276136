"""The config's schema: one dataclass per section of conf/config.yaml (and report.yaml),
checked against the composed config when a job starts, before anything loads.

`check_config(cfg)` merges the composed config into these OmegaConf structured configs and
turns the first problem into a UsageError of one line naming the key and what is allowed:
a key the section does not have (a misspelt `+model.batchsize=2` or `+layer=q4`, which
Hydra adds without a check), a value of the wrong type, a value outside its set (the
Enum fields), a required key removed, a number outside its range (BOUNDS). The merged,
typed copy is thrown away: jobs read the config Hydra composed, so job keys, cache keys
and the config.yaml a job writes stay what the yaml files make them.

Why a merge at job start and not only Hydra's schema pattern (`defaults: [base_model]`):
Hydra applies `+key=value` with OmegaConf's force_add, which adds a key to a structured
config without a check, so the misspelt additions this catches would pass composition.

The yaml files hold the values; the schema holds the types: every field a yaml file sets
is required here (MISSING), so that code can read it without a fallback default.

Open on purpose (typed Any or Dict[str, Any]; checked where they are used, or not at all):
- `intervention`: its keys depend on the rule (intervention.name); each rule checks its
  own section (conditions.intervention_rule), before anything loads.
- `model.chat_template_kwargs`: passed to the model's chat template, whose arguments are
  the template's own (e.g. Qwen3's enable_thinking).
- `model.config_overrides`: changes to a shipped config.json, nested as there (checked
  against the config class by random_weights).
- `model.device_map`: null, a strategy name (auto, balanced...) or a mapping of module
  names to devices, as from_pretrained takes it (checked against the model's modules).
- `benchmark.prompts`: presets by name, user-defined names allowed (each preset's keys
  are checked); HallusionBench's `split`: one hub split or a list of them.
- `runtime.num_workers`: `auto` or a whole number (checked in BOUNDS' place, check_values).
- the `hydra` section and its launcher settings: Hydra's and the launcher plugin's own
  schemas check them.
"""

import difflib
import enum
import math
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)
from omegaconf.nodes import BooleanNode, EnumNode, FloatNode, IntegerNode, StringNode

from sysattn_exp.errors import UsageError

# ---- allowed values -----------------------------------------------------------------


class Dtype(enum.Enum):
    """model.dtype: auto (by device, models.auto_dtype) or one of models.DTYPES."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Weights(enum.Enum):
    """model.weights: the checkpoint's, or random weights (random_weights.py)."""

    pretrained = "pretrained"
    random = "random"


class ScoringMode(enum.Enum):
    """scoring.mode: one forward pass, or greedy decoding parsed to yes/no/unknown."""

    logit = "logit"
    generate = "generate"


class Parser(enum.Enum):
    """scoring.parser: each benchmark's own rule, or MME's for all (benchmarks.answer_parser)."""

    native = "native"
    mme = "mme"


class RankBy(enum.Enum):
    """scoring.rank_by: the score that metrics comparing items rank by (job_yes_no.RANKINGS)."""

    p_yes = "p_yes"
    log_odds = "log_odds"


class Singularize(enum.Enum):
    """caption.singularize: CHAIR's singulariser (chair.SINGULARIZERS)."""

    original = "original"
    lemminflect = "lemminflect"


class Interval(enum.Enum):
    """stats.interval: the bootstrap's intervals (evaluation.stats.INTERVALS)."""

    percentile = "percentile"
    bca = "bca"


# prompt.ablation (models.ablation.ABLATIONS; spelt with hyphens, so by the functional API).
Ablation = enum.Enum(
    "Ablation", [(name, name) for name in ("none", "no-system-prompt", "no-bos", "no-system")]
)


class SplitHalf(enum.Enum):
    """benchmark.split_half: the calibration or held-out half of the groups
    (benchmarks.base.split_groups; python -m sysattn_exp.locate)."""

    calibration = "calibration"
    held_out = "held_out"


class ToySplit(enum.Enum):
    """The toy benchmark's splits (benchmarks/toy.py)."""

    demo = "demo"
    test = "test"
    hard = "hard"


class PopeSplit(enum.Enum):
    """POPE's question sets (benchmarks/pope.py SPLITS)."""

    random = "random"
    popular = "popular"
    adversarial = "adversarial"


class SugarCrepeSubset(enum.Enum):
    """SugarCrepe's seven subsets (benchmarks/sugarcrepe.py SUBSETS)."""

    add_att = "add_att"
    add_obj = "add_obj"
    replace_att = "replace_att"
    replace_obj = "replace_obj"
    replace_rel = "replace_rel"
    swap_att = "swap_att"
    swap_obj = "swap_obj"


# ---- sections -----------------------------------------------------------------------


@dataclass
class ModelConfig:
    """conf/model/*.yaml (every preset extends llava15_7b.yaml)."""

    name_or_path: str = MISSING
    revision: str | None = MISSING
    weights: Weights = MISSING
    config_overrides: dict[str, Any] | None = MISSING  # open: a shipped config.json's keys
    seed: int = MISSING
    device: str = MISSING
    dtype: Dtype = MISSING
    batch_size: int = MISSING
    system_prompt: str | None = MISSING
    device_map: Any = MISSING  # open: null, a strategy name or {module: device}
    chat_template_kwargs: dict[str, Any] = MISSING  # open: the chat template's arguments


@dataclass
class PromptPreset:
    """One entry of benchmark.prompts."""

    template: str | None = MISSING
    remove: str | None = MISSING


@dataclass
class BenchmarkConfig:
    """The keys every benchmark has."""

    name: str = MISSING
    prompt: str = MISSING
    template: str | None = MISSING
    prompts: dict[str, PromptPreset] = MISSING
    limit: int | None = MISSING
    # Not in the shipped benchmark files (the job keys stay as they were; identity.job_key):
    # null = every group; else one half of a seeded hash split of the group ids.
    split_half: SplitHalf | None = None
    calibration_fraction: float = 0.5
    calibration_seed: int = 0


@dataclass
class ToyBenchmark(BenchmarkConfig):
    split: ToySplit = MISSING


@dataclass
class JsonlBenchmark(BenchmarkConfig):
    path: str | None = MISSING
    skip_missing_images: bool = MISSING


@dataclass
class HubBenchmark(BenchmarkConfig):
    """A benchmark read from the hub (hub_id, split, revision) or a local release."""

    hub_id: str | None = MISSING
    split: str = MISSING
    revision: str | None = MISSING
    data_dir: str | None = MISSING
    skip_missing_images: bool = MISSING


@dataclass
class ImageDirBenchmark(HubBenchmark):
    image_dir: str | None = MISSING


@dataclass
class HallusionBenchBenchmark(ImageDirBenchmark):
    split: Any = MISSING  # open: one hub split or a list of them


@dataclass
class PopeBenchmark(ImageDirBenchmark):
    subsets: list[PopeSplit] | None = MISSING


@dataclass
class SugarCrepeBenchmark(ImageDirBenchmark):
    subsets: list[SugarCrepeSubset] | None = MISSING


BENCHMARKS = {  # benchmark.name -> its section's schema (benchmarks.LOADERS' names)
    "toy": ToyBenchmark,
    "jsonl": JsonlBenchmark,
    "mme": ImageDirBenchmark,
    "hallusionbench": HallusionBenchBenchmark,
    "naturalbench": HubBenchmark,
    "winoground": HubBenchmark,
    "sugarcrepe": SugarCrepeBenchmark,
    "beaf": ImageDirBenchmark,
    "pope": PopeBenchmark,
}


@dataclass
class LayersConfig:
    """conf/layers/*.yaml: a quarter (1..4) or a 0-based, end-exclusive range."""

    quarter: int | None = MISSING
    start: int | None = MISSING
    end: int | None = MISSING


@dataclass
class TrackingConfig:
    """conf/tracking/*.yaml: the MLflow store."""

    uri: str = MISSING
    experiment: str = MISSING
    artifact_location: str = MISSING


@dataclass
class ScoringConfig:
    """config.yaml's scoring section."""

    yes_words: list[str] = MISSING
    no_words: list[str] = MISSING
    rank_by: RankBy = MISSING
    mode: ScoringMode = MISSING
    max_new_tokens: int = MISSING
    parser: Parser = MISSING


@dataclass
class RuntimeConfig:
    """config.yaml's runtime section: how a job runs, not (mostly) what it computes."""

    dry_run: bool = MISSING
    num_workers: Any = MISSING  # auto or a whole number >= 0 (check_values)
    cache_dir: str | None = MISSING
    profile: bool = MISSING
    lens: bool = MISSING
    probes: bool = MISSING
    report_at_end: bool = MISSING
    progress_seconds: float = MISSING
    baseline_part_items: int = MISSING
    lease_seconds: float = MISSING
    deterministic: bool = MISSING
    published_table: str | None = MISSING  # experiment/parity.py: null, the shipped table


@dataclass
class StatsConfig:
    """config.yaml's stats section: the bootstrap of a job's statistics (evaluation.stats)."""

    bootstrap_samples: int = MISSING
    seed: int = MISSING
    discordance: float = MISSING  # (0, 1] (check_values): the dry run's power line
    interval: Interval = MISSING


@dataclass
class PromptConfig:
    """config.yaml's prompt section: what is removed from every prompt (models.ablation)."""

    ablation: Ablation = MISSING


@dataclass
class CaptionConfig:
    """conf/task/caption.yaml's caption section (+task=caption)."""

    prompt: str = MISSING
    singularize: Singularize = MISSING
    max_new_tokens: int = MISSING
    data_dir: str | None = MISSING
    image_dir: str | None = MISSING
    image_list: str | None = MISSING
    limit: int | None = MISSING
    seed: int | None = MISSING


@dataclass
class SweepConfig:
    """conf/sweep/layers.yaml and windows.yaml's sweep section (experiment/layer_sweeps.py):
    windows of `window` consecutive decoder layers, starting `stride` layers apart."""

    window: int = MISSING
    stride: int = MISSING


@dataclass
class Config:
    """conf/config.yaml as composed (the hydra section aside)."""

    model: ModelConfig = MISSING
    benchmark: Any = MISSING  # BENCHMARKS[benchmark.name], chosen by check_config
    intervention: dict[str, Any] = MISSING  # open: each rule checks its own keys
    layers: LayersConfig = MISSING
    tracking: TrackingConfig = MISSING
    scoring: ScoringConfig = MISSING
    runtime: RuntimeConfig = MISSING
    stats: StatsConfig = MISSING
    prompt: PromptConfig = MISSING
    caption: CaptionConfig | None = None  # +task=caption
    sweep: SweepConfig | None = None  # +sweep=layers, +sweep=windows


class Correction(enum.Enum):
    """report.correction: the multiple-comparison correction of each benchmark's p-values
    (statsmodels.stats.multitest.multipletests' method; none: the raw p-values)."""

    holm = "holm"
    bonferroni = "bonferroni"
    none = "none"


@dataclass
class ReportSection:
    out: str = MISSING
    parent: str = MISSING
    correction: Correction = MISSING
    alpha: float = MISSING  # (0, 1) (check_report_config)


@dataclass
class ReportConfig:
    """conf/report.yaml (python -m sysattn_exp.report)."""

    tracking: TrackingConfig = MISSING
    report: ReportSection = MISSING


# Numbers the types alone do not bound: key -> (lowest, highest), None for no bound.
BOUNDS = {
    "model.batch_size": (1, None),
    "benchmark.limit": (1, None),
    "benchmark.calibration_seed": (0, None),
    "layers.quarter": (1, 4),
    "scoring.max_new_tokens": (1, None),
    "runtime.progress_seconds": (0, None),
    "runtime.baseline_part_items": (1, None),
    "runtime.lease_seconds": (0.001, None),
    "stats.bootstrap_samples": (2, None),  # an interval needs two resamples
    "stats.seed": (0, None),  # numpy's default_rng takes seeds >= 0
    "caption.max_new_tokens": (1, None),
    "caption.limit": (1, None),
    "sweep.window": (1, None),
    "sweep.stride": (1, None),
}


# ---- the config's own resolvers -----------------------------------------------------


def window_starts(model, window, stride) -> str:
    """A layer sweep's layers.start values (conf/sweep/layers.yaml, windows.yaml), on the
    model's depth (layer_sweeps.sweep_starts), imported only when such a sweep starts: it
    reads the model's config with transformers, which a mistyped key must not wait for."""
    from sysattn_exp.experiment.layer_sweeps import sweep_starts

    return sweep_starts(model, window, stride)


def window_end(start: int | None, window: int) -> int | None:
    """A layer sweep's layers.end: its window's end, start + window (exclusive); None
    while layers.start is unset (before the sweeper sets it)."""
    return None if start is None else start + window


def register_resolvers() -> None:
    """Register the resolvers above (again: replaced). Done when this module is imported:
    every process that reads a job's or a sweep's config imports it first (the entry
    point and a launcher's worker to check the config; sync to key a sweep's parent)."""
    OmegaConf.register_new_resolver("sysattn.window_starts", window_starts, replace=True)
    OmegaConf.register_new_resolver("sysattn.window_end", window_end, replace=True)


register_resolvers()


# ---- checking -----------------------------------------------------------------------


def check_config(cfg) -> None:
    """UsageError (one line naming the key and what is allowed) unless the composed job
    config `cfg` fits Config, its benchmark section the schema of its benchmark.name
    (BENCHMARKS), and its numbers BOUNDS. A `hydra` key (a callback's view) is ignored."""
    plain = plain_config(cfg)
    benchmark = plain.get("benchmark")
    name = benchmark.get("name") if isinstance(benchmark, dict) else None
    if name not in BENCHMARKS:
        raise UsageError(f"benchmark.name={name!r} is unknown; allowed: {', '.join(BENCHMARKS)}")
    checked(Config(benchmark=BENCHMARKS[name]()), plain)
    check_values(OmegaConf.create(plain))


def check_report_config(cfg) -> None:
    """check_config for report.yaml's config; report.alpha in (0, 1)."""
    plain = plain_config(cfg)
    checked(ReportConfig(), plain)
    check_fraction("report.alpha", plain["report"]["alpha"], one_allowed=False)


def check_fraction(key: str, value, one_allowed: bool) -> None:
    """UsageError unless `value` is in (0, 1] (`one_allowed`) or in (0, 1); NaN is in
    neither."""
    inside = 0 < value <= 1 if one_allowed else 0 < value < 1
    if not inside:
        allowed = "(0, 1]" if one_allowed else "(0, 1)"
        raise UsageError(f"{key}={value!r} must be a number in {allowed}")


def plain_config(cfg) -> dict:
    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    plain.pop("hydra", None)
    return plain


def checked(schema, plain: dict) -> None:
    """UsageError unless `plain` merges into the structured config `schema` (an instance
    of one of the dataclasses above) with every required key set and nothing converted."""
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), plain)
    except OmegaConfBaseException as error:
        raise UsageError(message(error)) from None
    missing = sorted(OmegaConf.missing_keys(typed))
    if missing:
        raise UsageError(f"{missing[0]} is required (it was removed or never set)")
    check_kinds(typed, plain, "")


def message(error: OmegaConfBaseException) -> str:
    """OmegaConf's error as one line naming the key and what is allowed."""
    key = error.full_key or str(error.key)
    if isinstance(error, ConfigKeyError) and is_dataclass(error.object_type):
        allowed = [f.name for f in fields(error.object_type)]
        section = key.rpartition(".")[0] or "the config"
        close = difflib.get_close_matches(str(error.key), allowed, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{key} is not a key of {section}; allowed: {', '.join(allowed)}{hint}"
    if isinstance(error, MissingMandatoryValue):
        return f"{key} is required"
    if isinstance(error, ValidationError):
        node = error.child_node
        if node is None and isinstance(error.parent_node, ListConfig):  # a list's element
            node = error.parent_node._metadata.element_type
        values = allowed_values(node)
        if values:
            return f"{key}={shown(error.value)} is not allowed; allowed: {', '.join(values)}"
        return f"{key}={shown(error.value)} must be {kind_of(node)}"
    return f"{key}: {str(error.msg).splitlines()[0]}"


def allowed_values(node) -> list[str]:
    """The values an Enum node (or a list's Enum element type) allows; [] for others."""
    enum_type = node.enum_type if isinstance(node, EnumNode) else node
    if isinstance(enum_type, type) and issubclass(enum_type, enum.Enum):
        return [member.value for member in enum_type]
    return []


def shown(value) -> str:
    """A value as the command line writes it (null, true, 'text', 8)."""
    if value is None or isinstance(value, bool):
        return OmegaConf.to_yaml({"v": value}).split(": ", 1)[1].strip()
    return repr(value)


def kind_of(node) -> str:
    """What a typed node holds, in words."""
    null = " or null" if node is not None and node._is_optional() else ""
    for node_type, kind in (
        (BooleanNode, "true or false"),
        (IntegerNode, "a whole number"),
        (FloatNode, "a number"),
        (StringNode, "a string"),
        (ListConfig, "a list"),
        (DictConfig, "a mapping"),
    ):
        if isinstance(node, node_type):
            return kind + null
    return "of another type"


def check_kinds(typed: DictConfig, plain, path: str) -> None:
    """OmegaConf converts what it can ("8" to 8, "true" to True, 1 to "1"); the job reads
    the unconverted value, so a value that needed converting is refused here. A whole
    number where a number goes is not a conversion."""
    if isinstance(plain, dict) and isinstance(typed, DictConfig):
        pairs = ((str(k), typed._get_node(k), v) for k, v in plain.items())
    elif isinstance(plain, list) and isinstance(typed, ListConfig):
        pairs = ((f"[{i}]", typed._get_node(i), v) for i, v in enumerate(plain))
    else:
        return
    for key, node, value in pairs:
        where = f"{path}{key}" if key.startswith("[") or not path else f"{path}.{key}"
        if isinstance(node, DictConfig | ListConfig):
            check_kinds(node, value, where)
        elif value is not None and not fits(node, value):
            raise UsageError(f"{where}={shown(value)} must be {kind_of(node)}")


def fits(node, value) -> bool:
    if isinstance(node, BooleanNode):
        return isinstance(value, bool)
    if isinstance(node, IntegerNode):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(node, FloatNode):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(node, StringNode | EnumNode):
        return isinstance(value, str)
    return True


def check_values(cfg: DictConfig) -> None:
    """The bounds of BOUNDS, and runtime.num_workers (auto or a whole number >= 0), in a
    config whose types check_config has checked."""
    for key, (low, high) in BOUNDS.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if not math.isfinite(value):  # NaN and inf pass the comparisons below
            raise UsageError(f"{key}={value!r} must be a finite number")
        if high is not None and not low <= value <= high:
            raise UsageError(f"{key}={value!r} must be a number from {low} to {high}")
        if value < low:
            raise UsageError(f"{key}={value!r} must be a number >= {low}")
    check_fraction("stats.discordance", cfg.stats.discordance, one_allowed=True)
    fraction = OmegaConf.select(cfg, "benchmark.calibration_fraction")
    if fraction is not None:
        check_fraction("benchmark.calibration_fraction", fraction, one_allowed=False)
    workers = cfg.runtime.num_workers
    whole = isinstance(workers, int) and not isinstance(workers, bool) and workers >= 0
    if workers != "auto" and not whole:
        raise UsageError(f"runtime.num_workers={workers!r} must be auto or a whole number >= 0")
