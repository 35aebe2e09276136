"""Attention redistribution between modalities (DESIGN.md section 1), as an attention
function registered with transformers' AttentionInterface.

The model runs with `attn_implementation={"text_config": "sysattn", "vision_config": "sdpa"}`.
Every forward call passes two extra keyword arguments, which transformers hands through
the language model to each attention call:
  key_modality:   (B, K) modality id of every key position (see modality.py);
  attention_edit: a Redistribution, or None for the unchanged model.
Layers the edit does not select, and every layer when it is None, run plain SDPA.

Two implementations, equal to float32 rounding:
  eager: materialise the (Q, K) weights and apply the rule to them (the reference, here);
  fused: no weight matrix; per-modality attention merged by log-sum-exps (fused.py).
"""

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sysattn_exp.fused import fused_redistributed_attention
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


def modality_codes(names, device) -> torch.Tensor:
    return torch.tensor([MODALITIES[n] for n in names], device=device)


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


def visible_keys(attention_mask, q_len: int, k_len: int, device) -> torch.Tensor:
    """Boolean (B|1, 1, Q, K) mask of the keys each query may attend to. transformers passes
    None for an unpadded causal prefill; the queries are then the last Q key positions."""
    if attention_mask is None:
        q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        return (torch.arange(k_len, device=device)[None, :] <= q_pos)[None, None]
    if attention_mask.dtype != torch.bool:
        raise TypeError(f"{ATTENTION_NAME} expects a boolean mask, got {attention_mask.dtype}")
    return attention_mask


def eager_redistributed_attention(query, key, value, attention_mask, scaling, key_modality, edit):
    """Materialise the attention weights, redistribute them, and apply them to V."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    q_len, k_len = query.shape[2], key.shape[2]
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
    visible = visible_keys(attention_mask, q_len, k_len, query.device)
    # A query that sees no key (a padding row) gets all-zero weights instead of NaN.
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    query_is_real = key_modality[:, k_len - q_len :] != PAD
    weights = redistribute_weights(
        weights, key_modality, query_is_real, edit.source, edit.recipients
    )
    return torch.matmul(weights, value.float()).to(query.dtype)


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
