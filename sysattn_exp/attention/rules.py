"""The attention rules (docs/design.md, section 1), one class each, registered by the name their
config gives (`intervention.name`, conf/intervention/<name>.yaml), in the manner of
transformers' AttentionInterface: `RULES[name]` is the class, `register_rule(name)` adds
one. A rule class owns everything about its rule:

  configure(section)     its config section checked (unknown keys, types, ranges: one
                         UsageError line naming the key and what is allowed), returned as
                         the class with its settings, waiting for its layers;
  describe()             its label: in the run name, and logged as `job.label` for the report;
  guidance               whether scoring needs a second pass over the prompt without its
                         image (PAI's classifier-free guidance), and with what weight;
  can_change(key_modality), first_changed_position(spans)
                         which calls and query rows it can change (elsewhere plain SDPA runs);
  eager_scores, eager_weights
                         its eager application: on the (B, H, Q, K) scores before the softmax
                         and on the weights after it (intervention.eager_edited_attention);
  merge(parts, block), fused(...)
                         its fused application: from each modality's attention output and
                         log-sum-exp over a block of query rows (fused.modality_attention),
                         or, where that is not the rule's shape, the whole call (PAI).

A rule object is the rule at its decoder layers (0-based `layers`): a frozen dataclass
whose class name and fields are the job key's `intervention` entry (identity.condition), so
they must not change for the rules below. The baseline (`none`) has a class for its config
and label, but no object: a job without a rule passes `attention_edit=None`.

Dependencies: this module uses fused.py's per-modality attention and modality.py; the
attention function (intervention.py) and the config (conditions.py) use this module.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from typing import ClassVar

import torch
from transformers.integrations.sdpa_attention import repeat_kv

from sysattn_exp.attention.fused import Block, KeyBias, masses, modality_attention, plain_merge
from sysattn_exp.attention.modality import FIRST_KEY, MODALITIES, PAD, TEXT, answer_rows
from sysattn_exp.errors import UsageError

RULES: dict[str, type["Rule"]] = {}
IMPLEMENTATIONS = ("fused", "eager")


def register_rule(name: str):
    """Class decorator: the rule for `intervention.name=<name>` (a name given again is the
    new class's, as with transformers' registries)."""

    def register(cls):
        cls.name = name
        RULES[name] = cls
        return cls

    return register


def configure(section) -> Callable[..., "Rule"] | None:
    """The `intervention` config section checked by its rule (RULES[section.name]): the
    rule class with its settings, to be called with `layers=` once they are resolved
    against the model's depth; None for the baseline. Raises UsageError."""
    name = section.get("name")
    if name not in RULES:
        raise UsageError(f"intervention.name={name!r} is unknown; allowed: {', '.join(RULES)}")
    return RULES[name].configure(section)


def label(edit: "Rule | None") -> str:
    """The job's rule label (logged as job.label; the report's intervention column)."""
    return Baseline.LABEL if edit is None else edit.describe()


class Rule:
    """Base of the rules; subclasses are frozen dataclasses with a `layers` field
    (frozenset of 0-based decoder layers) and `impl` ("fused" or "eager"). Defaults here:
    no guidance, any call and row may change, no change before or after the softmax."""

    name: ClassVar[str]  # set by register_rule
    layers: frozenset[int]
    impl: str

    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        """The keys its config section may have: name and the fields but layers (and
        head_selection, which heads gives)."""
        derived = ("layers", "head_selection")
        return ("name", *(f.name for f in fields(cls) if f.name not in derived))

    @classmethod
    def configure(cls, section) -> Callable[..., "Rule"] | None:
        """The section checked: the class with its settings, waiting for `layers=`. A rule
        without a fused path (neither merge nor fused overridden) is refused on it, rather
        than leaving attention unchanged."""
        cls.check_keys(section)
        settings = cls.settings(section)
        if "heads" in cls.config_keys():
            settings["heads"] = checked_heads(section.get("heads"))
        fused = cls.merge is not Rule.merge or cls.fused is not Rule.fused
        if settings.get("impl") == "fused" and not fused:
            raise UsageError(
                f"the {cls.name} rule has no fused path (Rule.merge or Rule.fused); "
                "use intervention.impl=eager"
            )
        return partial(cls, **settings)

    @classmethod
    def check_keys(cls, section) -> None:
        """Refuse a key the rule does not have (a misspelling added with +)."""
        for key in section:
            if key not in cls.config_keys():
                raise UsageError(
                    f"intervention.{key} is not a key of the {cls.name} rule; allowed: "
                    + ", ".join(cls.config_keys())
                )

    @classmethod
    def settings(cls, section) -> dict:
        """The checked, canonical values of every field but `layers` (UsageError)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def heads_label(self) -> str:
        """The label's part for `heads` (describe): '' for all heads."""
        heads = getattr(self, "heads", None)
        if heads is None:
            return ""
        if getattr(self, "head_selection", None):
            return f" {self.head_selection} heads"
        if len(heads) <= 3:
            return " heads " + ",".join(f"{layer}.{head}" for layer, head in heads)
        return f" {len(heads)} heads"

    def heads_in(self, layer: int) -> list[int] | None:
        """The query heads of decoder `layer` the rule edits: None for all of them (heads
        not given); the others run plain attention."""
        heads = getattr(self, "heads", None)
        return None if heads is None else [h for at, h in heads if at == layer]

    @property
    def guidance(self) -> float | None:
        """The weight gamma of guidance against the prompt without its image (scoring's
        `guided`), or None: no second pass."""
        return None

    def can_change(self, key_modality: torch.Tensor) -> bool:
        """Whether the rule can change any row of a call whose keys have these modality ids
        (B, K); where it cannot, plain SDPA gives the same output faster."""
        return True

    def first_changed_position(self, spans: dict) -> int:
        """Under plain causal masking, the first sequence position whose row the rule can
        change (rows before it take one plain SDPA call); spans: fused.ModalitySpan by name."""
        return 0

    @classmethod
    def edits_weights(cls) -> bool:
        """Whether the rule has an eager edit of its own (eager_scores or eager_weights
        overridden): what the fused implementation's rows path applies (fused.choose_path);
        a rule with a merge only keeps the span path."""
        return (
            cls.eager_scores is not Rule.eager_scores or cls.eager_weights is not Rule.eager_weights
        )

    def key_bias(self, key_modality: torch.Tensor) -> KeyBias | None:
        """Where the rule, on a call whose keys have these modality ids (B, K), is exactly
        one number added to the scores of one modality's keys for every row it changes
        (fused.biased_attention): that modality and bias; None where it is not (the
        default)."""
        return None

    def eager_scores(self, scores: torch.Tensor, key_modality: torch.Tensor) -> torch.Tensor:
        """The rule on the scores (B, H, Q, K) before masking and the softmax."""
        return scores

    def eager_weights(self, weights, visible, key_modality, query_is_real) -> torch.Tensor:
        """The rule on the post-softmax weights (B, H, Q, K); visible (B|1, 1, Q, K);
        key_modality (B, K); query_is_real (B, Q)."""
        return weights

    def weight_factors(self, shares: dict, query_is_real) -> dict | None:
        """Where eager_weights multiplies every weight of a row on one modality's keys by
        one number: modality -> that factor (B, H, n, 1), from shares, modality -> A_X
        (B, H, n, 1), the row's mass on the modality's keys, and query_is_real (B, 1, n,
        1); a modality left out keeps factor 1. The rows path (fused.rows_attention) then
        needs the masses and one product instead of eager_weights' many elementwise
        passes. None (the default): the rule is not of that form."""
        return None

    def merge(self, parts: dict, block: Block) -> tuple[torch.Tensor, dict]:
        """A block's output from parts, modality -> (o_X (B, H, n, D), LSE_X (B, H, n)):
        (output, modality -> (o_X, share after the rule (B, H, n, 1))). The output must be
        linear in the o_X and read values only through them and block.spans, as attention
        is linear in V: a profile merges a key's indicator the same way to get the weight
        the rule leaves on it (fused.FirstKey)."""
        return plain_merge(parts)

    def fused(
        self, query, key, value, attention_mask, scaling, key_modality, profile=None, layer=None
    ) -> torch.Tensor:
        """The rule's attention output (B, H, Q, D) without a (Q, K) weight matrix."""
        return modality_attention(
            query, key, value, attention_mask, scaling, key_modality, self, profile, layer
        )


@register_rule("none")
class Baseline(Rule):
    """The unchanged model (intervention=none): its section has a name only."""

    LABEL: ClassVar[str] = "baseline"

    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        return ("name",)

    @classmethod
    def configure(cls, section) -> None:
        cls.check_keys(section)


@register_rule("redistribute")
@dataclass(frozen=True)
class Redistribution(Rule):
    """Move `fraction` of the post-softmax mass of the `source` modality onto `recipients`
    in the decoder layers `layers` (0-based): in proportion to the weights they already
    have (mode proportional, the paper's) or equally over their visible keys (uniform)."""

    source: str
    recipients: tuple[str, ...]
    layers: frozenset[int]
    impl: str = "fused"  # or "eager", the reference
    fraction: float = 1.0
    mode: str = "proportional"
    heads: tuple[tuple[int, int], ...] | None = None
    head_selection: str | None = None

    MODES: ClassVar[tuple[str, ...]] = ("proportional", "uniform")

    @classmethod
    def settings(cls, section) -> dict:
        source = checked_modality(section, "source")
        recipients = section.get("recipients")
        recipients = [recipients] if isinstance(recipients, str) else list(recipients or [])
        others = [m for m in MODALITIES if m != source]
        if not recipients:
            raise UsageError(
                f"intervention.recipients is empty; give one or more of {others} "
                f"(e.g. [{others[-1]}])"
            )
        for name in recipients:
            if name not in others:
                raise UsageError(
                    f"intervention.recipients contains {name!r}; with source {source} allowed "
                    f"recipients are {', '.join(others)}"
                )
        fraction = section.get("fraction", 1.0)
        if not is_number(fraction) or not 0 <= fraction <= 1:
            raise UsageError(f"intervention.fraction={fraction!r} must be a number in [0, 1]")
        mode = checked_choice(section, "mode", "proportional", cls.MODES)
        return {
            "source": source,
            "recipients": tuple(m for m in MODALITIES if m in recipients),
            "fraction": float(fraction),
            "mode": mode,
            "impl": checked_impl(section),
        }

    def describe(self) -> str:
        dose = "" if self.fraction == 1 else f" f={self.fraction:g}"
        mode = "" if self.mode == "proportional" else f" {self.mode}"
        return f"{self.source}->{'+'.join(self.recipients)}{dose}{mode}{self.heads_label()}"

    def can_change(self, key_modality) -> bool:
        """A row changes only where it sees source and recipient keys."""
        present = present_codes(key_modality)
        recipients = {MODALITIES[r] for r in self.recipients}
        return MODALITIES[self.source] in present and bool(recipients & present)

    def first_changed_position(self, spans: dict) -> int:
        """A row before the first key of the source, or of every recipient, sees none of
        them (A_S = 0 or A_R = 0)."""
        start = span_starts(spans)
        first = max(start[self.source], min(start[r] for r in self.recipients))
        return 0 if first == math.inf else first

    def key_bias(self, key_modality) -> KeyBias | None:
        """The source's keys hidden (bias -inf), where all of its mass moves (fraction 1) in
        proportion to the weights and every other modality of the call is a recipient:
        a'_s = 0 and a'_r = a_r (1 + A_S / A_R) = a_r / A_R (A_R = 1 - A_S), the softmax
        over the keys but the source's. Padding rows are left as they are."""
        if self.fraction != 1 or self.mode != "proportional":
            return None
        others = present_codes(key_modality) - {PAD, MODALITIES[self.source]}
        if not others <= {MODALITIES[r] for r in self.recipients}:
            return None
        return KeyBias(MODALITIES[self.source], -math.inf, padding_rows=False)

    def eager_weights(self, weights, visible, key_modality, query_is_real) -> torch.Tensor:
        """a'_s = (1 - f) a_s; the recipients gain f A_S, as a_r f A_S / A_R (proportional)
        or f A_S / n_R over their n_R visible keys (uniform); others unchanged. A row with
        A_S == 0 or A_R == 0, or whose query is padding, is left as it is."""
        is_source = (key_modality == MODALITIES[self.source])[:, None, None, :]
        is_recipient = torch.isin(key_modality, modality_codes(self.recipients, weights.device))
        is_recipient = is_recipient[:, None, None, :]
        mass_source = (weights * is_source).sum(dim=-1, keepdim=True)
        mass_recipient = (weights * is_recipient).sum(dim=-1, keepdim=True)
        change = (mass_source > 0) & (mass_recipient > 0) & query_is_real[:, None, :, None]
        moved = self.fraction * mass_source
        if self.mode == "uniform":
            receiving = visible & is_recipient
            share = receiving / receiving.sum(dim=-1, keepdim=True).clamp_min(1)
        else:
            share = weights * is_recipient / mass_recipient.clamp_min(1e-30)
        edited = torch.where(is_source, (1 - self.fraction) * weights, weights + moved * share)
        return torch.where(change, edited, weights)

    def weight_factors(self, shares: dict, query_is_real) -> dict | None:
        """Proportional mode: the source's weights times (1 - f), every recipient's times
        1 + f A_S / A_R, in rows that see source and recipient keys and whose query is
        real (eager_weights); uniform mode is not a product (None)."""
        if self.mode != "proportional":
            return None
        a_s = shares[self.source]
        a_r = sum(shares[r] for r in self.recipients)
        change = (a_s > 0) & (a_r > 0) & query_is_real
        gain = 1 + torch.where(change, self.fraction * a_s / torch.where(change, a_r, 1.0), 0.0)
        kept = torch.where(change, 1 - self.fraction, 1.0)
        return {self.source: kept} | {r: gain for r in self.recipients}

    def merge(self, parts: dict, block: Block) -> tuple[torch.Tensor, dict]:
        """In closed form (fused.py's docstring): the source keeps (1 - f) A_S; f A_S goes
        to the recipients in proportion to A_X o_X, or (uniform) equally over their visible
        keys, from each recipient span's (mean of V, log count): a zero query's attention."""
        uniform = None
        if self.mode == "uniform":
            zeros = torch.zeros_like(block.query)
            uniform = [block.spans[r].attend(zeros, block.first, block.visible, block.scaling)
                       for r in self.recipients]  # fmt: skip
        return self.redistribute(masses(parts), block.query_is_real, uniform)

    def redistribute(self, shares: dict, query_is_real, uniform=None):
        """shares: modality -> (o_X, A_X); query_is_real (B, 1, n, 1). Returns the output
        and each modality's (o_X, share after the rule): proportional, each share times
        its weight factor; uniform, the source's f A_S spread over the recipients' visible
        keys, from their (mean of V, log count) in `uniform`."""
        if uniform is None:
            factors = self.weight_factors({n: a for n, (_, a) in shares.items()}, query_is_real)
            after = {
                n: (o, a * factors[n]) if n in factors else (o, a) for n, (o, a) in shares.items()
            }
            return sum(a * o for o, a in after.values()), after
        o_s, a_s = shares[self.source]
        a_r = sum(shares[r][1] for r in self.recipients)
        change = (a_s > 0) & (a_r > 0) & query_is_real
        moved = torch.where(change, self.fraction * a_s, 0.0)
        counts = [lse.exp()[..., None] for _, lse in uniform]
        total = sum(counts).clamp_min(1)
        mean_value = sum(n * o for n, (o, _) in zip(counts, uniform, strict=True)) / total
        after = dict(shares)
        for r, n in zip(self.recipients, counts, strict=True):  # in proportion to its keys
            o, a = shares[r]
            after[r] = (o, a + moved * n / total)
        after[self.source] = (o_s, a_s - moved)
        plain = sum(a * o for name, (o, a) in shares.items() if name != self.source)
        return plain + moved * mean_value + (a_s - moved) * o_s, after


@register_rule("scale")
@dataclass(frozen=True)
class Scale(Rule):
    """Multiply the post-softmax mass of `modality` by `factor` and renormalise each row
    (the paper's "Image x2.0" baseline): the same as adding ln(factor) to its scores."""

    modality: str
    factor: float
    layers: frozenset[int]
    impl: str = "fused"
    heads: tuple[tuple[int, int], ...] | None = None
    head_selection: str | None = None

    @classmethod
    def settings(cls, section) -> dict:
        modality = checked_modality(section, "modality")
        factor = section.get("factor")
        if not is_number(factor) or factor <= 0:
            raise UsageError(f"intervention.factor={factor!r} must be a positive number")
        return {"modality": modality, "factor": float(factor), "impl": checked_impl(section)}

    def describe(self) -> str:
        return f"{self.modality}x{self.factor:g}{self.heads_label()}"

    def can_change(self, key_modality) -> bool:
        return MODALITIES[self.modality] in present_codes(key_modality)

    def first_changed_position(self, spans: dict) -> int:
        """Nothing changes before the modality's first key."""
        first = span_starts(spans)[self.modality]
        return 0 if first == math.inf else first

    def key_bias(self, key_modality) -> KeyBias:
        """ln(factor) added to the modality's scores, on every row (padding too, as
        eager_weights)."""
        return KeyBias(MODALITIES[self.modality], math.log(self.factor), padding_rows=True)

    def eager_weights(self, weights, visible, key_modality, query_is_real) -> torch.Tensor:
        """a'_x = c a_x / (1 + (c - 1) A_X), a'_y = a_y / (1 + (c - 1) A_X). With attention
        sinks the weights sum to less than 1: the sink's mass stays in the denominator."""
        is_x = (key_modality == MODALITIES[self.modality])[:, None, None, :]
        scaled = weights * torch.where(is_x, self.factor, 1.0)
        sink = (1 - weights.sum(dim=-1, keepdim=True)).clamp_min(0)
        return scaled / (scaled.sum(dim=-1, keepdim=True) + sink).clamp_min(1e-30)

    def merge(self, parts: dict, block: Block) -> tuple[torch.Tensor, dict]:
        """ln(factor) added to the modality's log-sum-exp."""
        o_x, lse_x = parts[self.modality]
        return plain_merge(parts | {self.modality: (o_x, lse_x + math.log(self.factor))})


@register_rule("pai")
@dataclass(frozen=True)
class Pai(Rule):
    """PAI (Liu et al., ECCV 2024; code github.com/LALBJ/PAI): on the answer position's
    query row only, the pre-softmax image scores z become z + alpha |z|; optionally
    (cfg_gamma) the answer's log-probs are then refined by classifier-free guidance against
    the prompt without the image."""

    alpha: float
    layers: frozenset[int]
    impl: str = "fused"
    cfg_gamma: float | None = None
    heads: tuple[tuple[int, int], ...] | None = None
    head_selection: str | None = None

    @classmethod
    def settings(cls, section) -> dict:
        alpha, gamma = section.get("alpha"), section.get("cfg_gamma")
        if not is_number(alpha) or alpha < 0:
            raise UsageError(f"intervention.alpha={alpha!r} must be a number >= 0")
        if gamma is not None and (not is_number(gamma) or gamma < 1):
            raise UsageError(
                f"intervention.cfg_gamma={gamma!r} must be null (off) or a number >= 1"
            )
        return {
            "alpha": float(alpha),
            "cfg_gamma": None if gamma is None else float(gamma),
            "impl": checked_impl(section),
        }

    def describe(self) -> str:
        cfg = "" if self.cfg_gamma is None else f" cfg={self.cfg_gamma:g}"
        return f"PAI a={self.alpha:g}{cfg}{self.heads_label()}"

    @property
    def guidance(self) -> float | None:
        return self.cfg_gamma

    def can_change(self, key_modality) -> bool:
        """It needs image keys and an answer (text) row."""
        present = present_codes(key_modality)
        return MODALITIES["image"] in present and TEXT in present

    def eager_scores(self, scores, key_modality) -> torch.Tensor:
        return self.raised(scores, key_modality, answer_rows(key_modality, scores.shape[2]))

    def raised(self, scores, key_modality, answer: torch.Tensor) -> torch.Tensor:
        """scores (B, H, Q, K) before masking: z + alpha |z| on the image keys of the rows
        that `answer` (B, Q) marks."""
        is_image = (key_modality == MODALITIES["image"])[:, None, None, :]
        return scores + self.alpha * scores.abs() * (answer[:, None, :, None] & is_image)

    def fused(
        self, query, key, value, attention_mask, scaling, key_modality, profile=None, layer=None
    ) -> torch.Tensor:
        """Plain SDPA for every row, then the answer row of each sequence again with its
        image scores raised: one (1 x K) score row per sequence is all PAI materialises.
        A profile gets plain attention's shares, the answer rows' from PAI's weights."""
        out, answer = self.answer_row_attention(
            query, key, value, attention_mask, scaling, key_modality
        )
        if profile is not None:
            modality_attention(
                query, key, value, attention_mask, scaling, key_modality, None,
                AnswerRowShares(profile, answer), layer,
            )  # fmt: skip
        return out

    def answer_row_attention(self, query, key, value, attention_mask, scaling, key_modality):
        """(output (B, H, Q, D), (batch, row, weights)): the sequences with an answer row,
        that row, and its PAI weights (b, H, 1, K)."""
        q_len, k_len = query.shape[2], key.shape[2]
        # transformers passes no mask only when Q == K (a plain causal prefill) or Q == 1.
        out = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            is_causal=attention_mask is None and q_len > 1,
            scale=scaling,
            enable_gqa=True,
        )
        answer = answer_rows(key_modality, q_len)
        batch = answer.any(dim=1).nonzero()[:, 0]
        if len(batch) == 0:
            return out, (batch, batch, None)
        rows = answer[batch].int().argmax(dim=1)
        n_rep = query.shape[1] // key.shape[1]
        k, v = repeat_kv(key[batch], n_rep).float(), repeat_kv(value[batch], n_rep).float()
        q = query[batch, :, rows][:, :, None].float()  # (b, H, 1, D)
        scores = torch.matmul(q, k.transpose(2, 3)) * scaling
        every = torch.ones(len(batch), 1, dtype=torch.bool, device=query.device)
        scores = self.raised(scores, key_modality[batch], every)
        if attention_mask is None:
            last = (k_len - q_len + rows)[:, None]
            visible = torch.arange(k_len, device=query.device)[None] <= last
        else:
            visible = attention_mask.expand(len(key_modality), -1, -1, -1)[batch, 0, rows]
        weights = torch.softmax(scores.masked_fill(~visible[:, None, None, :], -math.inf), -1)
        out[batch, :, rows] = torch.matmul(weights, v)[:, :, 0].to(out.dtype)
        return out, (batch, rows, weights)


class AnswerRowShares:
    """An AttentionProfile's stand-in that records each block's shares with the answer
    rows' replaced by those of their PAI weights (Pai.answer_row_attention)."""

    def __init__(self, profile, answer):
        self.profile, self.answer = profile, answer
        self.first_key = profile.first_key  # (B, K): the first real key (profile.CallProfile)

    def record(self, layer: int, shares: dict, key_modality, rows: slice, q_len: int) -> None:
        batch, answer, weights = self.answer
        in_block = (answer >= rows.start) & (answer < rows.stop)
        if in_block.any():
            masks = {name: key_modality[batch] == code for name, code in MODALITIES.items()}
            masks[FIRST_KEY] = self.first_key[batch]
            for name, is_x in masks.items():
                share = (weights[:, :, 0] * is_x[:, None, :]).sum(-1)  # (b, H)
                shares[name][batch[in_block], :, answer[in_block] - rows.start] = share[in_block]
        self.profile.record(layer, shares, key_modality, rows, q_len)


@dataclass(frozen=True)
class HeadSelection:
    """intervention.heads={top_k, by, profile}: the `top_k` query heads of the rule's
    layers with the highest share of the answer position's attention on `by` (system: the
    whole system span; bos: the first position alone, the classic attention sink of Xiao
    et al. 2023) in `profile`, an attention_profile_heads.csv of an earlier profile job;
    resolved to (layer, head) pairs by experiment/conditions.py."""

    top_k: int
    by: str
    profile: str

    BY: ClassVar[tuple[str, ...]] = ("system", "bos")

    def label(self) -> str:
        return f"top{self.top_k} {self.by}"


def checked_heads(value) -> tuple[tuple[int, int], ...] | HeadSelection | None:
    """intervention.heads: null (every head), a list of [layer, head] pairs (0-based; sorted,
    duplicates dropped) or {top_k, by, profile} (HeadSelection; top_k null: every head).
    UsageError otherwise."""
    if value is None:
        return None
    if hasattr(value, "keys"):
        return checked_selection(value)
    allowed = "null, a list of [layer, head] pairs, or {top_k: K, by: system|bos, profile: PATH}"
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise UsageError(f"intervention.heads={value!r}; allowed: {allowed}")
    pairs = set()
    for pair in value:
        pair = list(pair) if hasattr(pair, "__iter__") and not isinstance(pair, str) else [pair]
        if len(pair) != 2 or not all(is_index(v) for v in pair):
            raise UsageError(
                f"intervention.heads has {pair!r}: each entry is a [layer, head] pair of "
                "integers >= 0"
            )
        pairs.add((int(pair[0]), int(pair[1])))
    if not pairs:
        raise UsageError(f"intervention.heads is an empty list; allowed: {allowed}")
    return tuple(sorted(pairs))


def checked_selection(value) -> HeadSelection | None:
    """{top_k, by, profile}; top_k null: every head (so that a sweep over top_k can
    include the rule on all heads: +sweep=heads)."""
    keys = ("top_k", "by", "profile")
    for key in value:
        if key not in keys:
            raise UsageError(f"intervention.heads.{key} is unknown; allowed: {', '.join(keys)}")
    top_k = value.get("top_k")
    if top_k is None:
        return None
    by, profile = value.get("by", "system"), value.get("profile")
    if not is_index(top_k) or top_k < 1:
        raise UsageError(
            f"intervention.heads.top_k={top_k!r} must be an integer >= 1 (null: every head)"
        )
    if by not in HeadSelection.BY:
        allowed = ", ".join(HeadSelection.BY)
        raise UsageError(f"intervention.heads.by={by!r} is unknown; allowed: {allowed}")
    if not isinstance(profile, str) or not profile:
        raise UsageError(
            "intervention.heads.profile must be the path of an attention_profile_heads.csv "
            "(from a +task=profile job)"
        )
    return HeadSelection(int(top_k), by, profile)


def is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checked_modality(section, key: str) -> str:
    value = section.get(key)
    if value not in MODALITIES:
        allowed = ", ".join(MODALITIES)
        raise UsageError(f"intervention.{key}={value!r} is not a modality; allowed: {allowed}")
    return value


def checked_impl(section) -> str:
    return checked_choice(section, "impl", "fused", IMPLEMENTATIONS)


def checked_choice(section, key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = section.get(key, default)
    if value not in allowed:
        raise UsageError(f"intervention.{key}={value!r} is unknown; allowed: {', '.join(allowed)}")
    return value


def is_number(value) -> bool:
    """A finite int or float (NaN and inf pass `<` checks, and would score as garbage)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def present_codes(key_modality: torch.Tensor) -> set[int]:
    """The modality ids among a call's keys (B, K): a count per id, cheaper than
    torch.unique's sort (every edited layer asks, in every call)."""
    counts = torch.bincount(key_modality.flatten(), minlength=1 + len(MODALITIES))
    return set(counts.nonzero()[:, 0].tolist())


def span_starts(spans: dict) -> dict:
    """Modality -> its first key position (math.inf where it has no key)."""
    return {name: span.lo if span.present else math.inf for name, span in spans.items()}


def modality_codes(names, device) -> torch.Tensor:
    return torch.tensor([MODALITIES[n] for n in names], device=device)
