"""Config -> the condition a job evaluates: which intervention, in which layers."""

from sysattn_exp.errors import UsageError
from sysattn_exp.intervention import Edit, Pai, Redistribution, Scale
from sysattn_exp.modality import MODALITIES

INTERVENTIONS = ("none", "redistribute", "scale", "pai")
IMPLEMENTATIONS = ("fused", "eager")
MODES = ("proportional", "uniform")


def intervention_rule(cfg) -> dict | None:
    """The checked settings of the configured rule (all but its layers), None for the
    baseline."""
    if cfg.name not in INTERVENTIONS:
        raise UsageError(
            f"intervention.name={cfg.name!r} is unknown; allowed: {', '.join(INTERVENTIONS)}"
        )
    if cfg.name == "none":
        return None
    impl = cfg.get("impl", "fused")
    if impl not in IMPLEMENTATIONS:
        raise UsageError(
            f"intervention.impl={impl!r} is unknown; allowed: {', '.join(IMPLEMENTATIONS)}"
        )
    rules = {"scale": scale_rule, "pai": pai_rule, "redistribute": redistribution_rule}
    return rules[cfg.name](cfg) | {"impl": impl}


def redistribution_rule(cfg) -> dict:
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
    fraction = cfg.get("fraction", 1.0)
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not 0 <= fraction <= 1
    ):
        raise UsageError(f"intervention.fraction={fraction!r} must be a number in [0, 1]")
    mode = cfg.get("mode", "proportional")
    if mode not in MODES:
        raise UsageError(f"intervention.mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
    return {
        "source": cfg.source,
        "recipients": tuple(m for m in MODALITIES if m in recipients),
        "fraction": float(fraction),
        "mode": mode,
    }


def scale_rule(cfg) -> dict:
    if cfg.modality not in MODALITIES:
        allowed = ", ".join(MODALITIES)
        raise UsageError(
            f"intervention.modality={cfg.modality!r} is not a modality; allowed: {allowed}"
        )
    factor = cfg.factor
    if not is_number(factor) or factor <= 0:
        raise UsageError(f"intervention.factor={factor!r} must be a positive number")
    return {"modality": cfg.modality, "factor": float(factor)}


def resolve_layers(cfg, depth: int) -> list[int]:
    """0-based decoder layers from `layers.quarter` (1..4, floor formula on the model's own
    depth) or `layers.start`/`layers.end` (end exclusive); all layers when neither is set."""
    quarter, start, end = cfg.get("quarter"), cfg.get("start"), cfg.get("end")
    if quarter is not None:
        if start is not None or end is not None:
            raise UsageError("set either layers=q1..q4 or layers.start/layers.end, not both")
        start, end = (quarter - 1) * depth // 4, quarter * depth // 4
    start = 0 if start is None else start
    end = depth if end is None else end
    if not 0 <= start < end <= depth:
        raise UsageError(
            f"layers [{start}, {end}) is outside the model's {depth} decoder layers; "
            f"allowed 0 <= layers.start < layers.end <= {depth}"
        )
    return list(range(start, end))


def pai_rule(cfg) -> dict:
    alpha, gamma = cfg.alpha, cfg.get("cfg_gamma")
    if not is_number(alpha) or alpha < 0:
        raise UsageError(f"intervention.alpha={alpha!r} must be a number >= 0")
    if gamma is not None and (not is_number(gamma) or gamma < 1):
        raise UsageError(f"intervention.cfg_gamma={gamma!r} must be null (off) or a number >= 1")
    return {"alpha": float(alpha), "cfg_gamma": None if gamma is None else float(gamma)}


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def build_edit(rule: dict | None, layers: list[int]) -> Edit | None:
    if rule is None:
        return None
    kind = Scale if "factor" in rule else Pai if "alpha" in rule else Redistribution
    return kind(layers=frozenset(layers), **rule)
