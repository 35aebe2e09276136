"""Attention redistribution between modalities (DESIGN.md section 1), as an attention
function registered with transformers' AttentionInterface.

The model runs with `attn_implementation={"text_config": "sysattn", "vision_config": "sdpa"}`.
Every forward call passes two extra keyword arguments, which transformers hands through
the language model to each attention call:
  key_modality:   (B, K) modality id of every key position (see modality.py);
  attention_edit: a Redistribution, or None for the unchanged model.
Layers the edit does not select, and every layer when it is None, run plain SDPA.

Two implementations, equal to float32 rounding:
  eager: materialise the (Q, K) weights and apply the rule to them (the reference);
  fused: no weight matrix. When the recipients are all non-source modalities the rule is
    softmax over the non-source keys: one SDPA call with the source keys masked. Otherwise,
    with o_X the attention output over the keys of modality X alone and A_X its mass,
    out' = (A_R + A_S) o_R + A_O o_O, where the masses come from per-modality log-sum-exps.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sysattn_exp.modality import MODALITIES, PAD

ATTENTION_NAME = "sysattn"


@dataclass(frozen=True)
class Redistribution:
    """Move the post-softmax mass of the `source` modality onto `recipients`, in proportion
    to the weights they already have, in the decoder layers `layers` (0-based)."""

    source: str
    recipients: tuple[str, ...]
    layers: frozenset[int]
    impl: str = "fused"  # or "eager", the reference

    def describe(self) -> str:
        return f"{self.source}->{'+'.join(self.recipients)}"


def redistribute_weights(
    weights: torch.Tensor,
    key_modality: torch.Tensor,
    query_is_real: torch.Tensor,
    source: str,
    recipients: tuple[str, ...],
) -> torch.Tensor:
    """Proportional redistribution of post-softmax weights.

    weights (B, H, Q, K); key_modality (B, K); query_is_real (B, Q).
    a'_s = 0, a'_r = a_r * (1 + A_S / A_R), others unchanged; a row with A_S == 0 or
    A_R == 0, or whose query is padding, is left as it is.
    """
    is_source = (key_modality == MODALITIES[source])[:, None, None, :]
    is_recipient = torch.isin(key_modality, modality_codes(recipients, weights.device))
    is_recipient = is_recipient[:, None, None, :]
    mass_source = (weights * is_source).sum(dim=-1, keepdim=True)
    mass_recipient = (weights * is_recipient).sum(dim=-1, keepdim=True)
    change = (mass_source > 0) & (mass_recipient > 0) & query_is_real[:, None, :, None]
    gain = torch.where(change, mass_source / mass_recipient.clamp_min(1e-30), 0.0)
    moved = torch.where(is_source, 0.0, weights * (1.0 + gain * is_recipient))
    return torch.where(change, moved, weights)


def visible_keys(attention_mask, rows: slice, q_len: int, k_len: int, device) -> torch.Tensor:
    """Boolean (B|1, 1, len(rows), K) mask of the keys that query rows `rows` may attend to.
    transformers passes None for an unpadded causal prefill; the queries are then the last
    Q key positions."""
    if attention_mask is None:
        q_pos = torch.arange(k_len - q_len, k_len, device=device)[rows, None]
        return (torch.arange(k_len, device=device)[None, :] <= q_pos)[None, None]
    if attention_mask.dtype != torch.bool:
        raise TypeError(f"{ATTENTION_NAME} expects a boolean mask, got {attention_mask.dtype}")
    return attention_mask[:, :, rows]


def eager_redistributed_attention(query, key, value, attention_mask, scaling, key_modality, edit):
    """Materialise the attention weights, redistribute them, and apply them to V."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    q_len, k_len = query.shape[2], key.shape[2]
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
    visible = visible_keys(attention_mask, slice(None), q_len, k_len, query.device)
    # A query that sees no key (a padding row) gets all-zero weights instead of NaN.
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    query_is_real = key_modality[:, k_len - q_len :] != PAD
    weights = redistribute_weights(
        weights, key_modality, query_is_real, edit.source, edit.recipients
    )
    return torch.matmul(weights, value.float()).to(query.dtype)


# The fused path works on blocks of query rows so that its masks and biases hold about
# this many (row, key) entries, not Q x K: a prompt of ~650 tokens is one block, 4,096
# tokens are blocks of 256 rows.
BLOCK_ENTRIES = 1 << 20


def fused_redistributed_attention(query, key, value, attention_mask, scaling, key_modality, edit):
    """The rule without a weight matrix, one block of query rows at a time."""
    q_len, k_len = query.shape[2], key.shape[2]
    is_source = key_modality == MODALITIES[edit.source]
    is_recipient = torch.isin(key_modality, modality_codes(edit.recipients, key_modality.device))
    is_other = (key_modality != PAD) & ~is_source & ~is_recipient
    query_is_real = key_modality[:, k_len - q_len :] != PAD
    n_rep = query.shape[1] // key.shape[1]
    all_recipients = not is_other.any()
    if not all_recipients:
        masks = (is_source, is_recipient, is_other)
        spans = [modality_span(key, value, n_rep, is_x) for is_x in masks]
    out = torch.empty_like(query)
    block_rows = max(1, BLOCK_ENTRIES // k_len)
    for start in range(0, q_len, block_rows):
        rows = slice(start, min(start + block_rows, q_len))
        visible = visible_keys(attention_mask, rows, q_len, k_len, query.device)
        sees_source = (visible & is_source[:, None, None]).any(-1, keepdim=True)
        sees_recipient = (visible & is_recipient[:, None, None]).any(-1, keepdim=True)
        change = sees_source & sees_recipient & query_is_real[:, None, rows, None]
        if all_recipients:
            # Proportional redistribution onto every other key = softmax without the source.
            mask = visible & ~(is_source[:, None, None] & change)
            attended = F.scaled_dot_product_attention(
                query[:, :, rows], key, value, attn_mask=mask, scale=scaling, enable_gqa=True
            )
            # A row that sees no key (padding) would be NaN with some kernels: make it 0.
            out[:, :, rows] = torch.where(mask.any(-1, keepdim=True), attended, 0.0)
        else:
            (o_s, a_s), (o_r, a_r), (o_o, a_o) = per_modality_attention(
                query[:, :, rows], visible, spans, scaling, k_len - q_len + start
            )
            # Changed rows give the source's mass to o_r; others keep it on o_s.
            merged = a_r * o_r + a_o * o_o + a_s * torch.where(change, o_r, o_s)
            out[:, :, rows] = merged.to(query.dtype)
    return out


def modality_codes(names, device) -> torch.Tensor:
    return torch.tensor([MODALITIES[n] for n in names], device=device)


def modality_span(key, value, n_rep: int, is_x):
    """Each modality is a contiguous span of every row: K and V (repeated for grouped-query
    attention) sliced to the span's range over the batch, with the modality's key mask."""
    columns = is_x.any(0).nonzero()
    if len(columns) == 0:
        return None
    span = slice(int(columns[0]), int(columns[-1]) + 1)
    k_x, v_x = repeat_kv(key[:, :, span], n_rep), repeat_kv(value[:, :, span], n_rep)
    return span, is_x[:, None, None, span], k_x, v_x


def per_modality_attention(query, visible, spans, scaling, first_position: int):
    """For each modality span: the attention output over its visible keys alone, and the
    share of the row's total attention mass they hold. `first_position` is the sequence
    position of the first query row: rows before a span cannot see it and are skipped."""
    shape = query.shape
    outputs, lses = [], []
    for modality in spans:
        o_x = torch.zeros(shape, dtype=torch.float32, device=query.device)
        lse_x = torch.full(shape[:3], -math.inf, device=query.device)
        skip = 0 if modality is None else min(max(0, modality[0].start - first_position), shape[2])
        if modality is not None and skip < shape[2]:
            span, is_x, k_x, v_x = modality
            mask = visible[:, :, skip:, span] & is_x
            o, lse = attention_with_lse(query[:, :, skip:], k_x, v_x, mask, scaling)
            # A row that sees no key of X: kernels return 0 or NaN and an arbitrary LSE.
            seen = mask.any(-1)
            o_x[:, :, skip:] = torch.where(seen[..., None], o.float(), 0.0)
            lse_x[:, :, skip:] = torch.where(seen, lse.float(), -math.inf)
        outputs.append(o_x)
        lses.append(lse_x)
    lse_all = torch.stack(lses).logsumexp(0)
    finite = torch.isfinite(lse_all)
    masses = [torch.where(finite, (lse - lse_all).exp(), 0.0)[..., None] for lse in lses]
    return list(zip(outputs, masses, strict=True))


def attention_with_lse(query, key, value, mask, scaling):
    """Attention output (B, H, Q, D) and log-sum-exp of the scores (B, H, Q), in O(Q + K)
    memory on CPU (flash kernel); elsewhere the scores of this span are materialised."""
    bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
    bias = bias.masked_fill(~mask, -math.inf)
    if query.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, False, attn_mask=bias, scale=scaling
        )
    return attention_with_lse_math(query, key, value, bias, scaling)


def attention_with_lse_math(query, key, value, bias, scaling):
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling + bias.float()
    lse = scores.logsumexp(-1)
    weights = (scores - lse[..., None]).exp().nan_to_num(0.0)
    return torch.matmul(weights, value.float()), lse


IMPLEMENTATIONS = {"eager": eager_redistributed_attention, "fused": fused_redistributed_attention}


def sysattn_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    attention_edit: Redistribution | None = None,
    key_modality: torch.Tensor | None = None,
    **kwargs,
):
    if attention_edit is None or module.layer_idx not in attention_edit.layers:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if key_modality is None:
        raise ValueError("an attention_edit needs key_modality (see sysattn_exp.modality)")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    implementation = IMPLEMENTATIONS[attention_edit.impl]
    out = implementation(query, key, value, attention_mask, scaling, key_modality, attention_edit)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, sysattn_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
