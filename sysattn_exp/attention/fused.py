"""Attention without an attention matrix, by modality (the rules' default implementation,
impl=fused): the machinery every rule's fused application uses (rules.py), which knows no
rule but calls the one it is given (merge, first_changed_position).

With o_X the attention output over the keys of modality X alone and A_X = exp(LSE_X -
LSE_all) the share of the row's mass those keys hold, plain attention is sum_X A_X o_X and
the redistribution is (docs/design.md, section 1.4)

    out' = (1 + A_S / A_R) sum_{X in R} A_X o_X + A_O o_O,

applied to rows whose query is real and that see some source and some recipient key
(A_S > 0, A_R > 0); other rows keep sum_X A_X o_X. Each modality is a contiguous span of
every row, so o_X and LSE_X come from one attention call on K and V sliced to the span.
When the span holds only keys of X (padding, if any, after them) and the model's mask is
plain causal attention over the real keys, causality is all the masking it needs: rows
inside the span attend causally to it, rows after it attend to all of it, and no mask is
built. Otherwise (left padding, say) a (rows x span) mask is built,
block by block of query rows so that it stays small at long context. So is a mask that
does more than causality: sliding windows (Gemma 3's local layers), bidirectional image
blocks (Gemma 3's image tokens), whatever the model's mask function builds.

Under plain causal masking, query rows before the first position the rule can change (the
first source key, or the first recipient key, whichever comes later) keep plain attention
and take one SDPA call: in a long any-res prompt under system -> text, nearly all rows.

Without a profile, the rows a rule can change may take a cheaper path than the spans
(choose_path, PATHS): a few rows' weights materialised ("rows": the question pass of a
small model), or one SDPA call with an additive bias on one modality's keys where the rule
is exactly that ("bias": system -> image in the image prefix pass hides the system keys;
Image x2 adds ln 2 to the image keys' scores). Every path is exact (the tests force each,
forced_path); the job's kernel_path names the ones taken.

The rules' merges (rules.py): the redistribution as above; the scale baseline adds
ln(factor) to one modality's LSE; PAI changes one score row per sequence (the answer's)
and so is plain SDPA plus that row, materialised (its own `fused`).
"""

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from transformers.integrations.sdpa_attention import repeat_kv

from sysattn_exp.attention import kernels
from sysattn_exp.attention.modality import FIRST_KEY, MODALITIES, PAD

# Query rows are taken in blocks of about this many (row, key) entries, so that masks and
# per-modality outputs stay small at long context: a prompt of ~650 tokens is one block,
# 4,096 tokens are blocks of 256 rows.
BLOCK_ENTRIES = 1 << 20


def fused_edited_attention(
    query, key, value, attention_mask, scaling, key_modality, edit, profile=None, layer=None
):
    """The rule's attention output (B, H, Q, D) without an attention matrix: the rule's own
    fused application (rules.Rule.fused: for most rules modality_attention with the rule's
    merge); edit None: plain attention, by modality (for a profile). With a `profile`
    (profile.CallProfile), each block's per-modality shares of attention after the rule,
    and the first real key's (FirstKey), are recorded for `layer`."""
    if edit is not None:
        return edit.fused(query, key, value, attention_mask, scaling, key_modality, profile, layer)
    return modality_attention(
        query, key, value, attention_mask, scaling, key_modality, None, profile, layer
    )


@dataclass
class Block:
    """A block of query rows: their queries (B, H, n, D), the sequence position of the
    first, the keys they may see, the scaling, which rows are real (B, 1, n, 1), and every
    modality's span of keys (for a rule that attends to a span again, e.g. uniformly)."""

    query: torch.Tensor
    first: int
    visible: "LazyVisible"
    scaling: float
    query_is_real: torch.Tensor
    spans: dict


def modality_attention(
    query, key, value, attention_mask, scaling, key_modality, rule, profile=None, layer=None
):
    """Attention as each modality's (o_X, LSE_X), merged per block of query rows by
    `rule.merge` (rule None: plain attention, sum_X A_X o_X). Under plain causal masking
    the rows before rule.first_changed_position take one plain SDPA call (not where a
    profile records every row's shares). Without a profile the rule's rows may take
    another path (choose_path): all of them materialised where there are few (no span
    is needed then: rows the rule cannot change come out of its eager edit unchanged),
    or those it can change in one masked SDPA call."""
    q_len, k_len = query.shape[2], key.shape[2]
    if profile is None and choose_path(rule, query, key, q_len, key_modality) == "rows":
        kernels.note_path("rows")
        return rows_attention(query, key, value, attention_mask, scaling, key_modality, rule, 0)
    out = torch.empty_like(query)
    n_rep = query.shape[1] // key.shape[1]
    causal_only = masks_only_causally(attention_mask, key_modality, q_len, k_len)
    spans = {
        name: ModalitySpan(key, value, n_rep, key_modality, code, causal_only)
        for name, code in MODALITIES.items()
    }
    query_is_real = key_modality[:, k_len - q_len :] != PAD
    first_key = None
    if profile is not None:
        first_key = FirstKey(key, value, n_rep, key_modality, causal_only, profile)
    unchanged = 0
    if profile is None and causal_only and rule is not None:
        unchanged = min(max(0, rule.first_changed_position(spans) - (k_len - q_len)), q_len)
        out[:, :, :unchanged] = plain_attention(
            query, key, value, attention_mask, scaling, unchanged
        )
    changed = q_len - unchanged
    path = "spans" if profile is not None else choose_path(rule, query, key, changed, key_modality)
    if path == "bias":
        kernels.note_path(path)
        out[:, :, unchanged:] = biased_attention(
            query, key, value, attention_mask, scaling, key_modality, rule, unchanged, spans
        )
        return out
    block_rows = max(1, BLOCK_ENTRIES // k_len)
    for start in range(unchanged, q_len, block_rows):
        rows = slice(start, min(start + block_rows, q_len))
        first = k_len - q_len + start  # sequence position of the block's first query
        visible = LazyVisible(attention_mask, rows, q_len, k_len, query.device)
        block = Block(
            query[:, :, rows], first, visible, scaling, query_is_real[:, None, rows, None], spans
        )
        parts = {
            name: span.attend(block.query, first, visible, scaling) for name, span in spans.items()
        }
        merged, shares = plain_merge(parts) if rule is None else rule.merge(parts, block)
        out[:, :, rows] = merged.to(query.dtype)
        if profile is not None:
            shares = {name: a[..., 0] for name, (_, a) in shares.items()}
            shares[FIRST_KEY] = first_key.share(rule, parts, block)
            profile.record(layer, shares, key_modality, rows, q_len)
    return out


# The ways to compute the rows a rule can change. "spans": each modality's (o_X, LSE_X) from
# attention calls on its span of keys, merged by the rule (no weight matrix: what long
# prompts need). "rows": the rows' weights materialised, (n x K) per head: one matmul, the
# softmax, the rule's edit (its weight factors, else eager), one matmul; for a few rows
# (the question pass: 10-40 query rows against the cached prefix's keys, few heads)
# cheaper than several span calls
# and their merge. "bias": where the rule is the same as adding one number to the scores
# of one modality's keys (Rule.key_bias: -inf, hiding them, for a full proportional
# redistribution whose recipients are every other modality of the call, as system -> image
# in the image prefix pass; ln(factor) for Scale), one SDPA call with that additive mask.
# choose_path picks bias where the rule allows it, else rows by the weights it would
# materialise (ROWS_PATH_MAX_ENTRIES), else spans.
PATHS = ("spans", "rows", "bias")
# Measured crossover (scripts/bench.py --crossover --quick: one question-pass call, system
# -> text, spans vs rows interleaved, medians of 3, 2-core CPU, float32, one thread,
# 2026-12-02, the rows path with weight factors): rows took 0.46-0.77x spans' time at
# 41k-189k weights (e.g. 1 sequence x 8 heads x 8-16 rows x 650 keys: 0.47x; 1 x 32 x 8
# x 650: 0.70x; 1 x 8 x 8 x 2,950: 0.77x), 0.82-1.19x at 333k-378k, 0.83-1.74x at 666k,
# and up to 2.8x beyond. Its softmax and two matmuls over every (row, key) cost more than
# the span calls' fixed costs from a few hundred thousand weights on. The threshold stays
# at 2^17 all the same: at 2^18 the small device check's bf16 decision check
# (scripts/device_check.py --small) flipped one of its two decisive items under image ->
# text (a call that moved from bf16 span kernels to the float32 rows path; a borderline
# item, but the check is a gate).
# A "delta" path (one masked kernel call over every key for plain attention's output and
# LSE, plus a proportional redistribution's correction from its source and recipient keys
# materialised) was measured on the same shapes, 2026-12-02, quiet machine: 0.84-2.15x
# spans' time, never below rows where rows is chosen; not kept.
ROWS_PATH_MAX_ENTRIES = 1 << 17
# The rows path materialises the weights of at most this many (sequence, head, row, key)
# entries at a time (64 MiB in float32), taking the rows in blocks beyond it.
ROWS_BLOCK_ENTRIES = 1 << 24
_forced_path: str | None = None  # set by forced_path (tests run every path on every rule)


@contextmanager
def forced_path(path: str | None) -> Iterator[None]:
    """Make every fused call with a rule take `path` (one of PATHS; None: by shape) while
    the block runs: how the exactness tests run each path against the reference. A rule
    without an eager edit (eager_weights / eager_scores) has no rows path and keeps spans."""
    global _forced_path
    if path is not None and path not in PATHS:
        raise ValueError(f"path {path!r} is unknown; allowed: {', '.join(PATHS)}")
    before, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = before


def choose_path(rule, query, key, changed_rows: int, key_modality=None) -> str:
    """The path for a call whose rule can change `changed_rows` of the query rows (PATHS):
    bias where the rule is the same as a bias on one modality's keys in this call
    (key_modality (B, K) given), else rows where their weights, sequences x heads x rows x
    keys, are at most ROWS_PATH_MAX_ENTRIES, else spans; or the forced path, where the rule
    allows it (a forced bias path the rule does not allow here takes the choice by shape).
    A rule without a (B, H, Q, K) edit of its own (a plug-in defining merge only:
    Rule.edits_weights) always takes spans; so does plain attention (no rule)."""
    if rule is None or not rule.edits_weights():
        return "spans"
    biased = key_modality is not None and rule.key_bias(key_modality) is not None
    if _forced_path is not None and (_forced_path != "bias" or biased):
        return _forced_path
    if biased:
        return "bias"
    batch, heads = query.shape[:2]
    entries = batch * heads * changed_rows * key.shape[2]
    return "rows" if entries <= ROWS_PATH_MAX_ENTRIES else "spans"


@dataclass(frozen=True)
class KeyBias:
    """A rule that is exactly one number added to the scores of one modality's keys
    (Rule.key_bias): the modality id, the bias (-inf: its keys hidden) and whether rows
    whose query is padding are edited too (as the rule's eager edit does)."""

    modality: int
    bias: float
    padding_rows: bool


def biased_attention(
    query, key, value, attention_mask, scaling, key_modality, rule, start: int, spans=None
):
    """The rule's output (B, H, Q - start, D) for the query rows from `start` on where it
    is one bias on one modality's keys (Rule.key_bias): one SDPA call per block of rows,
    the mask the model's visible keys with the bias added to that modality's (hidden where
    it is -inf). A row the rule leaves as it is (it sees no key of the modality or no other
    key, or is padding where the rule leaves padding) gets plain attention, from a second
    call only where some row of the block needs it. With `spans` (ModalitySpan by name), a
    square call under plain causal masking whose hidden keys are the first ones of every
    sequence (system -> image in an unpadded prefix pass) is causal attention over the keys
    after them: no mask at all. In bf16 or fp16 a finite bias is rounded to that dtype
    (ln 2: 2^-9 of it, far below the scores' own rounding)."""
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    bias = rule.key_bias(key_modality)
    hidden = bias.bias == -math.inf
    span = next((s for n, s in (spans or {}).items() if MODALITIES[n] == bias.modality), None)
    first_keys = span is not None and span.present and span.clean and span.lo == 0
    if hidden and first_keys and start == span.hi and q_len == k_len:
        # Row p >= hi sees keys hi..p (the hidden span's end on, causally): none of them.
        rest = slice(start, None)
        return torch.nn.functional.scaled_dot_product_attention(
            query[:, :, rest], key[:, :, rest], value[:, :, rest],
            is_causal=True, scale=scaling, enable_gqa=True,
        )  # fmt: skip
    is_x = (key_modality == bias.modality)[:, None, None, :]
    edited = key_modality[:, k_len - q_len :] != PAD
    if bias.padding_rows:
        edited = torch.ones_like(edited)
    out = torch.empty(batch, heads, q_len - start, dim, dtype=query.dtype, device=query.device)
    block_rows = max(1, BLOCK_ENTRIES // k_len)
    for first in range(start, q_len, block_rows):
        rows = slice(first, min(first + block_rows, q_len))
        visible = LazyVisible(attention_mask, rows, q_len, k_len, query.device).get()
        others = visible & ~is_x  # (B, 1, n, K)
        change = others.any(-1) & (visible & is_x).any(-1) & edited[:, None, rows]
        q = query[:, :, rows]
        if hidden:
            o = sdpa(q, key, value, others, scaling)
        else:
            mask = torch.zeros(others.shape, dtype=query.dtype, device=query.device)
            mask = mask.masked_fill(is_x, bias.bias).masked_fill(~visible, -math.inf)
            o = sdpa(q, key, value, mask, scaling)
        if not bool(change.all()):
            o = torch.where(change[..., None], o, sdpa(q, key, value, visible, scaling))
        out[:, :, rows.start - start : rows.stop - start] = o
    return out


def sdpa(query, key, value, mask, scaling):
    """SDPA of the query rows over every key under a boolean or additive mask (B|1, 1, n,
    K)."""
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True
    )


def rows_attention(query, key, value, attention_mask, scaling, key_modality, rule, start: int):
    """The rule's output (B, H, Q - start, D) for the query rows from `start` on, from their
    weights materialised in float32: scores (grouped-query heads folded into the rows, so
    K and V are never repeated), the rule's eager_scores, the mask (as an additive bias:
    on CPU a broadcast masked_fill costs several times an addition), the softmax (a row
    that sees no key gets zeros), the rule's edit (edited_weights), the values: exactly
    intervention.eager_edited_attention on those rows. Rows are taken in blocks of at
    most ROWS_BLOCK_ENTRIES weights."""
    batch, heads, q_len, dim = query.shape
    k_len, kv_heads = key.shape[2], key.shape[1]
    n_rep = heads // kv_heads
    key_t, value_f = key.float().transpose(2, 3), value.float()
    query_is_real = key_modality[:, k_len - q_len :] != PAD
    ranges = KeyRange.of_modalities(key_modality)
    out = torch.empty(batch, heads, q_len - start, dim, dtype=query.dtype, device=query.device)
    block_rows = max(1, ROWS_BLOCK_ENTRIES // (batch * heads * k_len))
    for first in range(start, q_len, block_rows):
        rows = slice(first, min(first + block_rows, q_len))
        n = rows.stop - rows.start
        folded = query[:, :, rows].reshape(batch, kv_heads, n_rep * n, dim)  # row r * n + i
        scores = torch.matmul(folded.float(), key_t).view(batch, heads, n, k_len) * scaling
        scores = rule.eager_scores(scores, key_modality)
        visible = LazyVisible(attention_mask, rows, q_len, k_len, query.device).get()
        hidden = torch.zeros(visible.shape, dtype=scores.dtype, device=query.device)
        weights = torch.softmax(scores + hidden.masked_fill_(~visible, -math.inf), dim=-1)
        if not bool(visible.any(-1).all()):
            weights = weights.nan_to_num_(0.0)
        real = query_is_real[:, rows]
        weights = edited_weights(rule, weights, visible, key_modality, real, ranges)
        folded = weights.view(batch, kv_heads, n_rep * n, k_len)
        o = torch.matmul(folded, value_f).view(batch, heads, n, dim)
        out[:, :, rows.start - start : rows.stop - start] = o.to(query.dtype)
    return out


def edited_weights(rule, weights, visible, key_modality, query_is_real, ranges: dict):
    """The rule on a block's weights (B, H, n, K), in place where the rule has weight
    factors (Rule.weight_factors: each modality's mass summed over its range of keys, and
    its keys' weights multiplied by its factor), else by its eager_weights. ranges:
    KeyRange by modality; query_is_real (B, n)."""
    shares = {name: keys.mass(weights) for name, keys in ranges.items()}
    factors = rule.weight_factors(shares, query_is_real[:, None, :, None])
    if factors is None:
        return rule.eager_weights(weights, visible, key_modality, query_is_real)
    for name, factor in factors.items():
        ranges[name].scale_(weights, factor)
    return weights


@dataclass
class KeyRange:
    """The range of key positions [lo, hi) that holds every key of one modality in every
    sequence of the batch (empty where it has none), and which keys of it are that
    modality's, (B, 1, 1, hi - lo), or None where all are (no padding or other modality
    inside): then a sum or product over the modality's keys is one over a slice."""

    keys: slice
    is_x: torch.Tensor | None

    @staticmethod
    def of_modalities(key_modality) -> dict:
        """KeyRange by modality name for keys with these modality ids (B, K)."""
        ranges = {}
        for name, code in MODALITIES.items():
            keys, inside = key_range(key_modality, code)
            whole = inside is None or bool(inside.all())
            ranges[name] = KeyRange(keys, None if whole else inside[:, None, None])
        return ranges

    def mass(self, weights) -> torch.Tensor:
        """(B, H, n, 1) the weights' sum over the modality's keys."""
        part = weights[..., self.keys]
        return (part if self.is_x is None else part * self.is_x).sum(-1, keepdim=True)

    def scale_(self, weights, factor) -> None:
        """The modality's keys' weights (B, H, n, K) times factor (B, H, n, 1), in place."""
        part = weights[..., self.keys]
        if self.is_x is None:
            part.mul_(factor)
        else:
            part.copy_(torch.where(self.is_x, part * factor, part))


def key_range(key_modality, code: int) -> tuple[slice, torch.Tensor | None]:
    """The range [lo, hi) of key positions that holds every key of modality `code` over
    the batch (B, K), and which keys of it are that modality's (B, hi - lo); an empty
    range and None where the modality has no key."""
    is_x = key_modality == code
    columns = is_x.any(0).nonzero()
    if len(columns) == 0:
        return slice(0, 0), None
    keys = slice(int(columns[0]), int(columns[-1]) + 1)
    return keys, is_x[:, keys]


class FirstKey:
    """The share of attention, after the rule, on each sequence's first real key (BOS, the
    attention sink; profile.first_key (B, K) marks it) for a profile, without an attention
    matrix. Attention is linear in the values, so the weight a rule leaves on a key is the
    rule's output when V is that key's indicator: parts' o_X become the key's weight within
    X, exp(s - LSE_X) (s its score, 0 outside X or where the row does not see it), with
    the same LSEs, merged by the rule (a rule that attends again, e.g. uniform, does so
    over indicator values: `spans`). Exact for every rule whose merge is linear in o_X."""

    def __init__(self, key, value, n_rep: int, key_modality, causal_only: bool, profile):
        batch = torch.arange(key.shape[0], device=key.device)
        self.position = profile.first_key.int().argmax(dim=1)  # (B,)
        self.present = profile.first_key.any(dim=1)
        self.code = key_modality[batch, self.position]
        self.key = key[batch, :, self.position]  # (B, KV, D)
        indicator = profile.first_key[:, None, :, None].to(value.dtype).expand_as(value)
        self.spans = IndicatorSpans(key, indicator, n_rep, key_modality, causal_only)

    def share(self, rule, parts: dict, block: "Block") -> torch.Tensor:
        """(B, H, n) the share of each query row's attention on the first key."""
        batch, heads = block.query.shape[:2]
        key = self.key.repeat_interleave(heads // self.key.shape[1], dim=1).float()
        score = torch.einsum("bhnd,bhd->bhn", block.query.float(), key) * block.scaling
        visible = block.visible.get()[:, 0].expand(batch, -1, -1)  # (B, n, K)
        seen = visible[torch.arange(batch), :, self.position] & self.present[:, None]
        weight_parts = {
            name: (
                torch.where(
                    (seen & (self.code == code)[:, None])[:, None],
                    (score - parts[name][1]).exp(),
                    0.0,
                )[..., None],
                parts[name][1],
            )
            for name, code in MODALITIES.items()
        }
        indicator_block = replace(block, spans=self.spans)
        merge = plain_merge if rule is None else lambda p: rule.merge(p, indicator_block)
        return merge(weight_parts)[0][..., 0]


class IndicatorSpans(Mapping):
    """ModalitySpan by name over indicator values, built on first use (only a rule that
    attends to a span again needs them)."""

    def __init__(self, key, indicator, n_rep: int, key_modality, causal_only: bool):
        self.args, self.spans = (key, indicator, n_rep, key_modality, causal_only), {}

    def __getitem__(self, name: str) -> "ModalitySpan":
        if name not in self.spans:
            key, indicator, n_rep, key_modality, causal_only = self.args
            self.spans[name] = ModalitySpan(
                key, indicator.contiguous(), n_rep, key_modality, MODALITIES[name], causal_only
            )
        return self.spans[name]

    def __iter__(self):
        return iter(MODALITIES)

    def __len__(self) -> int:
        return len(MODALITIES)


def plain_merge(parts: dict) -> tuple[torch.Tensor, dict]:
    """Plain attention from parts, modality -> (o_X, LSE_X): (sum_X A_X o_X, modality ->
    (o_X, A_X))."""
    shares = masses(parts)
    return sum(a * o for o, a in shares.values()), shares


def plain_attention(query, key, value, attention_mask, scaling, rows: int):
    """Plain attention of the first `rows` query rows, which see only the first
    k_len - q_len + rows keys (transformers' mask is None only for a square causal call
    or a single query row)."""
    if rows == 0:
        return query[:, :, :0]
    q_len, k_len = query.shape[2], key.shape[2]
    seen = k_len - q_len + rows
    mask = None if attention_mask is None else attention_mask[:, :, :rows, :seen]
    return torch.nn.functional.scaled_dot_product_attention(
        query[:, :, :rows],
        key[:, :, :seen],
        value[:, :, :seen],
        attn_mask=mask,
        is_causal=mask is None and rows == seen and rows > 1,
        scale=scaling,
        enable_gqa=True,
    )


def masks_only_causally(attention_mask, key_modality, q_len: int, k_len: int) -> bool:
    """Whether the model's mask lets every real query see exactly the real keys up to its
    own position (checked block by block of query rows, to stay small at long context)."""
    if attention_mask is None:  # transformers' plain causal prefill
        return True
    real_key = key_modality != PAD
    real_query = real_key[:, k_len - q_len :]
    positions = torch.arange(k_len, device=key_modality.device)
    for start in range(0, q_len, max(1, BLOCK_ENTRIES // k_len)):
        rows = slice(start, min(start + max(1, BLOCK_ENTRIES // k_len), q_len))
        causal = positions[None, :] <= positions[k_len - q_len :][rows, None]
        expected = causal[None] & real_key[:, None, :]
        agree = (attention_mask[:, 0, rows] == expected) | ~real_query[:, rows, None]
        if not bool(agree.all()):
            return False
    return True


class LazyVisible:
    """The (B|1, 1, rows, K) boolean mask of keys a block's queries may see, built only if a
    span needs it. transformers passes None for an unpadded causal prefill."""

    def __init__(self, attention_mask, rows: slice, q_len: int, k_len: int, device):
        self.args, self.mask = (attention_mask, rows, q_len, k_len, device), None

    def get(self) -> torch.Tensor:
        if self.mask is None:
            attention_mask, rows, q_len, k_len, device = self.args
            if attention_mask is None:
                q_pos = torch.arange(k_len - q_len, k_len, device=device)[rows, None]
                self.mask = (torch.arange(k_len, device=device)[None, :] <= q_pos)[None, None]
            elif attention_mask.dtype != torch.bool:
                raise TypeError(
                    f"the fused path expects a boolean mask, got {attention_mask.dtype}"
                )
            else:
                self.mask = attention_mask[:, :, rows]
        return self.mask


def grouped_attention_with_lse(query, key, value, mask, scaling, is_causal: bool, n_rep: int):
    """attention_with_lse for grouped-query attention: `n_rep` query heads share each K/V
    head. Without a causal block the heads of a group are folded into the query rows, so K
    and V are never copied (repeat_kv would copy a whole span in every layer); a causal
    block needs each head's rows aligned with the keys, so there K and V are repeated."""
    if n_rep == 1:
        return attention_with_lse(query, key, value, mask, scaling, is_causal)
    if is_causal:
        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
        return attention_with_lse(query, key, value, mask, scaling, is_causal)
    batch, heads, n, dim = query.shape
    folded = query.reshape(batch, heads // n_rep, n_rep * n, dim)  # row r * n + i
    if mask is not None:
        mask = mask.repeat(1, 1, n_rep, 1)
    o, lse = attention_with_lse(folded, key, value, mask, scaling, False)
    return o.reshape(batch, heads, n, dim), lse.reshape(batch, heads, n)


class ModalitySpan:
    """One modality's keys: the range [lo, hi) they occupy over the batch, K and V sliced
    to it (not repeated for grouped-query attention: see grouped_attention_with_lse), and
    whether the range is clean: keys of this modality only, then at most trailing padding,
    in every row, under a mask that is causality alone (`causal_only`)."""

    def __init__(self, key, value, n_rep: int, key_modality, code: int, causal_only=True):
        keys, inside = key_range(key_modality, code)
        self.present, self.clean = inside is not None, True
        if not self.present:
            return
        self.lo, self.hi = keys.start, keys.stop
        # Clean: within the range each row is X up to some point and padding after it.
        trailing_pad = (key_modality[:, self.lo : self.hi] == PAD) & ~inside
        self.clean = causal_only and bool(
            (inside | trailing_pad).all() and (inside.int().diff(dim=1) <= 0).all()
        )
        self.is_x = inside[:, None, None, :]
        self.key = key[:, :, self.lo : self.hi]
        self.value = value[:, :, self.lo : self.hi]
        self.n_rep = n_rep

    def attention(self, query, keys: slice, mask, scaling, is_causal: bool):
        """(output, LSE) of `query` over this span's keys `keys` (a slice of the span)."""
        return grouped_attention_with_lse(
            query,
            self.key[:, :, keys],
            self.value[:, :, keys],
            mask,
            scaling,
            is_causal,
            self.n_rep,
        )

    def attend(self, query, first: int, visible: LazyVisible, scaling):
        """(o_X, A_X-ready LSE) for a block of query rows whose first row sits at sequence
        position `first`; rows that see no key of X get o = 0 and LSE = -inf."""
        n = query.shape[2]
        o_x = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
        lse_x = torch.full(query.shape[:3], -math.inf, device=query.device)
        if not self.present or self.lo >= first + n:
            return o_x, lse_x
        if self.clean:
            self.attend_causally(query, first, o_x, lse_x, scaling)
        else:
            self.attend_masked(query, first, visible.get(), o_x, lse_x, scaling)
        return o_x, lse_x

    def attend_causally(self, query, first, o_x, lse_x, scaling) -> None:
        n = query.shape[2]
        inside = slice(max(self.lo - first, 0), min(self.hi - first, n))  # rows within the span
        if inside.start < inside.stop:
            # The row at span offset `offset` + i sees the span keys before `offset` in full
            # and a square, top-left causal block from there.
            offset, width = first + inside.start - self.lo, inside.stop - inside.start
            q = query[:, :, inside]
            block = slice(offset, offset + width)
            o, lse = self.attention(q, block, None, scaling, True)
            if offset > 0:  # the block of query rows starts inside the span
                o_b, lse_b = self.attention(q, slice(0, offset), None, scaling, False)
                o, lse = combine(o, lse, o_b, lse_b)
            o_x[:, :, inside], lse_x[:, :, inside] = o.float(), lse.float()
        after = slice(max(self.hi - first, 0), n)  # rows past the span see all of it
        if after.start < after.stop:
            o, lse = self.attention(query[:, :, after], slice(None), None, scaling, False)
            o_x[:, :, after], lse_x[:, :, after] = o.float(), lse.float()

    def attend_masked(self, query, first, visible, o_x, lse_x, scaling) -> None:
        skip = min(max(0, self.lo - first), query.shape[2])  # rows before the span see none of it
        mask = visible[:, :, skip:, self.lo : self.hi] & self.is_x
        o, lse = self.attention(query[:, :, skip:], slice(None), mask, scaling, False)
        seen = mask.any(-1)  # a row that sees no key of X: kernels return 0 or NaN
        o_x[:, :, skip:] = torch.where(seen[..., None], o.float(), 0.0)
        lse_x[:, :, skip:] = torch.where(seen, lse.float(), -math.inf)


def combine(o_a, lse_a, o_b, lse_b):
    """Attention over two disjoint key sets, from each set's output and log-sum-exp."""
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    weight_a, weight_b = (lse_a - lse).exp()[..., None], (lse_b - lse).exp()[..., None]
    return weight_a * o_a.float() + weight_b * o_b.float(), lse


def masses(parts: dict) -> dict:
    """modality -> (o_X, LSE_X) becomes modality -> (o_X, A_X)."""
    lse_all = torch.stack([lse for _, lse in parts.values()]).logsumexp(0)
    finite = torch.isfinite(lse_all)
    return {
        name: (o, torch.where(finite, (lse - lse_all).exp(), 0.0)[..., None])
        for name, (o, lse) in parts.items()
    }


def attention_with_lse(query, key, value, mask, scaling, is_causal: bool):
    """Attention output (B, H, Q, D) and log-sum-exp of the scores (B, H, Q): a fused kernel
    where one is known to agree (checked on first use), else the scores of this span
    materialised in float32 (kernels.py)."""
    return kernels.attention_with_lse(query, key, value, mask, scaling, is_causal)
