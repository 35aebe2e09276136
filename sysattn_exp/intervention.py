"""The attention rules (DESIGN.md section 1) and the attention function that applies them,
registered with transformers' AttentionInterface.

The model runs with `attn_implementation={"text_config": "sysattn", "vision_config": "sdpa"}`.
Every forward call passes extra keyword arguments, which transformers hands through the
language model to each attention call:
  key_modality:      (B, K) modality id of every key position (see modality.py);
  attention_edit:    a rule (Redistribution, Scale, Pai), or None for the unchanged model;
  attention_profile: optionally, an AttentionProfile that records where attention goes.
Layers the edit does not select, and every layer when it is None, run plain SDPA (unless
a profile is being recorded).

Two implementations, equal to float32 rounding:
  eager: materialise the (Q, K) weights and apply the rule to them (the reference, here);
  fused: no weight matrix; per-modality attention merged by log-sum-exps (fused.py).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sysattn_exp.fused import fused_edited_attention
from sysattn_exp.modality import MODALITIES, PAD, TEXT, answer_rows

ATTENTION_NAME = "sysattn"


@dataclass(frozen=True)
class Redistribution:
    """Move `fraction` of the post-softmax mass of the `source` modality onto `recipients`
    in the decoder layers `layers` (0-based): in proportion to the weights they already
    have (mode proportional, the paper's) or equally over their visible keys (uniform)."""

    source: str
    recipients: tuple[str, ...]
    layers: frozenset[int]
    impl: str = "fused"  # or "eager", the reference
    fraction: float = 1.0
    mode: str = "proportional"
    kind: ClassVar[str] = "redistribute"

    def describe(self) -> str:
        dose = "" if self.fraction == 1 else f" f={self.fraction:g}"
        mode = "" if self.mode == "proportional" else f" {self.mode}"
        return f"{self.source}->{'+'.join(self.recipients)}{dose}{mode}"


@dataclass(frozen=True)
class Scale:
    """Multiply the post-softmax mass of `modality` by `factor` and renormalise each row
    (the paper's "Image x2.0" baseline): the same as adding ln(factor) to its scores."""

    modality: str
    factor: float
    layers: frozenset[int]
    impl: str = "fused"
    kind: ClassVar[str] = "scale"

    def describe(self) -> str:
        return f"{self.modality}x{self.factor:g}"


@dataclass(frozen=True)
class Pai:
    """PAI (Liu et al., ECCV 2024): on the answer position's query row only, the pre-softmax
    image scores z become z + alpha |z|; optionally (cfg_gamma) the answer's log-probs are
    then refined by classifier-free guidance against the prompt without the image."""

    alpha: float
    layers: frozenset[int]
    impl: str = "fused"
    cfg_gamma: float | None = None
    kind: ClassVar[str] = "pai"

    def describe(self) -> str:
        cfg = "" if self.cfg_gamma is None else f" cfg={self.cfg_gamma:g}"
        return f"PAI a={self.alpha:g}{cfg}"


def pai_scores(scores, key_modality, alpha: float, answer: torch.Tensor) -> torch.Tensor:
    """scores (B, H, Q, K) before masking: z + alpha |z| on the image keys of the rows that
    `answer` (B, Q) marks."""
    is_image = (key_modality == MODALITIES["image"])[:, None, None, :]
    return scores + alpha * scores.abs() * (answer[:, None, :, None] & is_image)


Edit = Redistribution | Scale | Pai


def modality_codes(names, device) -> torch.Tensor:
    return torch.tensor([MODALITIES[n] for n in names], device=device)


def redistribute_weights(weights, visible, key_modality, query_is_real, edit: Redistribution):
    """The rule on post-softmax weights (B, H, Q, K); visible (B|1, 1, Q, K); key_modality
    (B, K); query_is_real (B, Q). a'_s = (1 - f) a_s; the recipients gain f A_S, as
    a_r f A_S / A_R (proportional) or f A_S / n_R over their n_R visible keys (uniform);
    others unchanged. A row with A_S == 0 or A_R == 0, or whose query is padding, is left
    as it is."""
    is_source = (key_modality == MODALITIES[edit.source])[:, None, None, :]
    is_recipient = torch.isin(key_modality, modality_codes(edit.recipients, weights.device))
    is_recipient = is_recipient[:, None, None, :]
    mass_source = (weights * is_source).sum(dim=-1, keepdim=True)
    mass_recipient = (weights * is_recipient).sum(dim=-1, keepdim=True)
    change = (mass_source > 0) & (mass_recipient > 0) & query_is_real[:, None, :, None]
    moved = edit.fraction * mass_source
    if edit.mode == "uniform":
        receiving = visible & is_recipient
        share = receiving / receiving.sum(dim=-1, keepdim=True).clamp_min(1)
    else:
        share = weights * is_recipient / mass_recipient.clamp_min(1e-30)
    edited = torch.where(is_source, (1 - edit.fraction) * weights, weights + moved * share)
    return torch.where(change, edited, weights)


def scale_weights(weights, key_modality, edit: Scale):
    """a'_x = c a_x / (1 + (c - 1) A_X), a'_y = a_y / (1 + (c - 1) A_X). With attention
    sinks the weights sum to less than 1: the sink's mass stays in the denominator."""
    is_x = (key_modality == MODALITIES[edit.modality])[:, None, None, :]
    scaled = weights * torch.where(is_x, edit.factor, 1.0)
    sink = (1 - weights.sum(dim=-1, keepdim=True)).clamp_min(0)
    return scaled / (scaled.sum(dim=-1, keepdim=True) + sink).clamp_min(1e-30)


def visible_keys(attention_mask, q_len: int, k_len: int, device) -> torch.Tensor:
    """Boolean (B|1, 1, Q, K) mask of the keys each query may attend to. transformers passes
    None for an unpadded causal prefill; the queries are then the last Q key positions."""
    if attention_mask is None:
        q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        return (torch.arange(k_len, device=device)[None, :] <= q_pos)[None, None]
    if attention_mask.dtype != torch.bool:
        raise TypeError(f"{ATTENTION_NAME} expects a boolean mask, got {attention_mask.dtype}")
    return attention_mask


def eager_edited_attention(
    query,
    key,
    value,
    attention_mask,
    scaling,
    key_modality,
    edit,
    softcap=None,
    sinks=None,
    profile=None,
    layer=None,
):
    """Materialise the attention weights, apply the rule to them, and apply them to V.
    Honours logit soft-capping (Gemma 2) and attention sinks (a learned per-head logit
    that takes mass and gives no value, GPT-OSS); with a `profile`, records the shares."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    q_len, k_len = query.shape[2], key.shape[2]
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if edit is not None and edit.kind == "pai":
        scores = pai_scores(scores, key_modality, edit.alpha, answer_rows(key_modality, q_len))
    visible = visible_keys(attention_mask, q_len, k_len, query.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink], dim=-1)
    # A query that sees no key (a padding row) gets all-zero weights instead of NaN.
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)[..., :k_len]
    query_is_real = key_modality[:, k_len - q_len :] != PAD
    if edit is not None and edit.kind == "scale":
        weights = scale_weights(weights, key_modality, edit)
    elif edit is not None and edit.kind == "redistribute":
        weights = redistribute_weights(weights, visible, key_modality, query_is_real, edit)
    if profile is not None:
        shares = {
            name: (weights * (key_modality == code)[:, None, None, :]).sum(-1)
            for name, code in MODALITIES.items()
        }
        profile.record(layer, shares, key_modality, slice(0, q_len), q_len)
    return torch.matmul(weights, value.float()).to(query.dtype)


IMPLEMENTATIONS = {"eager": eager_edited_attention, "fused": fused_edited_attention}


def can_change(edit: Edit, key_modality: torch.Tensor | None) -> bool:
    """Whether the rule can change any row of this call: a redistribution needs source and
    recipient keys, a scale its modality's keys, PAI image keys and an answer row. Where it
    cannot, plain SDPA gives the same output faster."""
    if key_modality is None:
        return True  # the error about the missing key_modality comes below
    present = set(torch.unique(key_modality).tolist())
    if edit.kind == "redistribute":
        recipients = {MODALITIES[r] for r in edit.recipients}
        return MODALITIES[edit.source] in present and bool(recipients & present)
    if edit.kind == "scale":
        return MODALITIES[edit.modality] in present
    return MODALITIES["image"] in present and TEXT in present


def sysattn_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    attention_edit: Edit | None = None,
    key_modality: torch.Tensor | None = None,
    attention_profile=None,
    **kwargs,
):
    selected = attention_edit is not None and module.layer_idx in attention_edit.layers
    edit = attention_edit if selected else None
    if key_modality is not None and key_modality.shape[1] > key.shape[2]:
        # A sliding-window layer's cache holds only the last keys of the sequence.
        key_modality = key_modality[:, -key.shape[2] :]
    if edit is not None and attention_profile is None and not can_change(edit, key_modality):
        edit = None  # e.g. the image prefix pass of a rule whose recipient is text
    # What SDPA and the fused path cannot do (soft-capped logits, sinks) takes the eager path.
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    plain_softmax = not softcap and sinks is None
    if edit is None and attention_profile is None and plain_softmax:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if key_modality is None and (edit is not None or attention_profile is not None):
        raise ValueError("an attention_edit or profile needs key_modality (sysattn_exp.modality)")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = module.layer_idx
    if not plain_softmax:
        out = eager_edited_attention(
            query, key, value, attention_mask, scaling, key_modality, edit,
            softcap, sinks, attention_profile, layer,
        )  # fmt: skip
    elif attention_profile is not None:  # the shares come from the fused path's masses
        out = fused_edited_attention(
            query, key, value, attention_mask, scaling, key_modality, edit,
            attention_profile, layer,
        )  # fmt: skip
    else:
        implementation = IMPLEMENTATIONS[edit.impl]
        out = implementation(query, key, value, attention_mask, scaling, key_modality, edit)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, sysattn_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
