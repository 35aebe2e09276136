"""Config -> the condition a job evaluates: which intervention, in which layers."""

from collections.abc import Callable

from sysattn_exp.attention import rules
from sysattn_exp.attention.rules import Rule
from sysattn_exp.errors import UsageError


def intervention_rule(cfg) -> Callable[..., Rule] | None:
    """The `intervention` section checked by its rule (rules.configure; UsageError before
    anything loads): the rule class with its settings, waiting for its layers; None for
    the baseline."""
    return rules.configure(cfg)


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


def build_edit(rule: Callable[..., Rule] | None, layers: list[int]) -> Rule | None:
    """The configured rule (intervention_rule) at its resolved decoder layers."""
    return None if rule is None else rule(layers=frozenset(layers))
