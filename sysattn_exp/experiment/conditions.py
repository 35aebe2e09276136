"""Config -> the condition a job evaluates: which intervention, in which layers."""

from collections.abc import Callable

from sysattn_exp.attention import profile, rules
from sysattn_exp.attention.rules import HeadSelection, Rule
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


def build_edit(
    rule: Callable[..., Rule] | None, layers: list[int], n_heads: int | None = None
) -> Rule | None:
    """The configured rule (intervention_rule) at its resolved decoder layers, its
    `intervention.heads` resolved to (layer, head) pairs and checked against the layers and
    the model's `n_heads` query heads per layer (UsageError)."""
    if rule is None:
        return None
    heads = rule.keywords.get("heads")
    if heads is None:
        return rule(layers=frozenset(layers))
    selection = None
    if isinstance(heads, HeadSelection):
        selection = heads.label()
        heads = top_heads(heads, layers)
    check_heads(heads, layers, n_heads)
    return rule(layers=frozenset(layers), heads=heads, head_selection=selection)


def check_heads(heads, layers: list[int], n_heads: int | None) -> None:
    """Each [layer, head] pair must name a head of an edited layer."""
    for layer, head in heads:
        if layer not in layers:
            raise UsageError(
                f"intervention.heads has [{layer}, {head}], but layer {layer} is not edited; "
                f"the edited layers are {layers[0]}-{layers[-1]} (layers=...)"
            )
        if n_heads is not None and head >= n_heads:
            raise UsageError(
                f"intervention.heads has [{layer}, {head}], but the model has {n_heads} "
                f"query heads per layer; allowed heads 0-{n_heads - 1}"
            )


def top_heads(selection: HeadSelection, layers: list[int]) -> tuple[tuple[int, int], ...]:
    """The selection's top_k (layer, head) pairs among the edited layers, by their share of
    the answer position's attention on selection.by in its per-head profile
    (profile.top_heads), sorted by layer and head."""
    try:
        chosen = profile.top_heads(selection.profile, selection.top_k, selection.by, layers)
    except UsageError as error:
        raise UsageError(f"intervention.heads.profile={selection.profile}: {error}") from None
    return tuple(sorted(chosen))
