"""Config -> the condition a job evaluates: which intervention, in which layers."""

from sysattn_exp.errors import UsageError
from sysattn_exp.intervention import Redistribution
from sysattn_exp.modality import MODALITIES

INTERVENTIONS = ("none", "redistribute")
IMPLEMENTATIONS = ("fused", "eager")


def intervention_rule(cfg) -> tuple[str, tuple[str, ...], str] | None:
    """(source, recipients, impl) for a redistribution, None for the baseline; checks every
    key."""
    if cfg.name not in INTERVENTIONS:
        raise UsageError(
            f"intervention.name={cfg.name!r} is unknown; allowed: {', '.join(INTERVENTIONS)}"
        )
    if cfg.name == "none":
        return None
    allowed = ", ".join(MODALITIES)
    if cfg.source not in MODALITIES:
        raise UsageError(
            f"intervention.source={cfg.source!r} is not a modality; allowed: {allowed}"
        )
    recipients = [cfg.recipients] if isinstance(cfg.recipients, str) else list(cfg.recipients or [])
    others = [m for m in MODALITIES if m != cfg.source]
    if not recipients:
        raise UsageError(
            f"intervention.recipients is empty; give one or more of {others} (e.g. [{others[-1]}])"
        )
    for name in recipients:
        if name not in others:
            raise UsageError(
                f"intervention.recipients contains {name!r}; with source {cfg.source} allowed "
                f"recipients are {', '.join(others)}"
            )
    impl = cfg.get("impl", "fused")
    if impl not in IMPLEMENTATIONS:
        raise UsageError(
            f"intervention.impl={impl!r} is unknown; allowed: {', '.join(IMPLEMENTATIONS)}"
        )
    return cfg.source, tuple(m for m in MODALITIES if m in recipients), impl


def resolve_layers(cfg, depth: int) -> list[int]:
    """0-based decoder layers from `layers.quarter` (1..4, floor formula on the model's own
    depth) or `layers.start`/`layers.end` (end exclusive); all layers when neither is set."""
    quarter, start, end = cfg.get("quarter"), cfg.get("start"), cfg.get("end")
    if quarter is not None:
        if start is not None or end is not None:
            raise UsageError("set either layers=q1..q4 or layers.start/layers.end, not both")
        if quarter not in (1, 2, 3, 4):
            raise UsageError(f"layers.quarter={quarter!r} must be 1, 2, 3 or 4")
        start, end = (quarter - 1) * depth // 4, quarter * depth // 4
    start = 0 if start is None else start
    end = depth if end is None else end
    for key, value in (("layers.start", start), ("layers.end", end)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageError(f"{key}={value!r} must be an integer layer index")
    if not 0 <= start < end <= depth:
        raise UsageError(
            f"layers [{start}, {end}) is outside the model's {depth} decoder layers; "
            f"allowed 0 <= layers.start < layers.end <= {depth}"
        )
    return list(range(start, end))


def build_edit(rule, layers: list[int]) -> Redistribution | None:
    if rule is None:
        return None
    source, recipients, impl = rule
    return Redistribution(source, recipients, frozenset(layers), impl)
