"""The attention function that applies the rules (rules.py; docs/design.md, section 1.2),
registered with transformers' AttentionInterface, and the guard that checks it ran.

The model runs with `attn_implementation={"text_config": "sysattn", "vision_config": "sdpa"}`.
Every forward call passes extra keyword arguments, which transformers hands through the
language model to each attention call:
  key_modality:      (B, K) modality id of every key position (see modality.py);
  attention_edit:    a rule at its layers (rules.Rule), or None for the unchanged model;
  attention_profile: optionally, an AttentionProfile that records where attention goes
                     (bound to each call's keys: AttentionProfile.for_call).
Layers the edit does not select, and every layer when it is None, run plain SDPA (unless
a profile is being recorded).

Two implementations, equal to float32 rounding:
  eager: materialise the (Q, K) weights and apply the rule to them (the reference, here:
         the rule's eager_scores before the softmax, eager_weights after it);
  fused: no weight matrix; the rule's fused application (Rule.fused: per-modality
         attention merged by log-sum-exps, fused.py).

The guard (guard_edits). A missing `attention_edit` keyword means "no edit", so a
transformers release or a family that stopped passing keyword arguments down to attention
would turn every intervention into the baseline under the intervention's name. So every
forward pass of a guarded model that is given an edit is checked when it ends: each
decoder layer 0..n-1 of the language model must have received the edit, and exactly the
rule's layers must have selected it (a layer counts even where no row of the call can
change, e.g. the image-prefix pass of a system -> text rule); else the job stops with
EditNotApplied. The count is kept per thread (watch_edits) for the job's metrics.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sysattn_exp.attention import kernels
from sysattn_exp.attention.fused import fused_edited_attention, plain_attention
from sysattn_exp.attention.modality import FIRST_KEY, MODALITIES, PAD
from sysattn_exp.attention.rules import Rule
from sysattn_exp.errors import UsageError

ATTENTION_NAME = "sysattn"


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
    if edit is not None:
        scores = edit.eager_scores(scores, key_modality)
    visible = visible_keys(attention_mask, q_len, k_len, query.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink], dim=-1)
    # A query that sees no key (a padding row) gets all-zero weights instead of NaN.
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)[..., :k_len]
    if edit is not None:  # without one, key_modality may be None (a plain pass, e.g. guidance's)
        query_is_real = key_modality[:, k_len - q_len :] != PAD
        weights = edit.eager_weights(weights, visible, key_modality, query_is_real)
    if profile is not None:
        shares = {
            name: (weights * (key_modality == code)[:, None, None, :]).sum(-1)
            for name, code in MODALITIES.items()
        }
        shares[FIRST_KEY] = (weights * profile.first_key[:, None, None, :]).sum(-1)
        profile.record(layer, shares, key_modality, slice(0, q_len), q_len)
    return torch.matmul(weights, value.float()).to(query.dtype)


IMPLEMENTATIONS = {"eager": eager_edited_attention, "fused": fused_edited_attention}


def sysattn_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    attention_edit: Rule | None = None,
    key_modality: torch.Tensor | None = None,
    attention_profile=None,
    **kwargs,
):
    if attention_profile is not None and key_modality is not None:
        # Bound to this call's keys before a sliding window's cache is sliced.
        attention_profile = attention_profile.for_call(key_modality, key)
    selected = attention_edit is not None and module.layer_idx in attention_edit.layers
    if attention_edit is not None:
        note_layer(module.layer_idx, selected)
    edit = attention_edit if selected else None
    if edit is not None and edit.heads_in(module.layer_idx) == []:
        edit = None  # heads were chosen, none in this layer
    if key_modality is not None and key_modality.shape[1] > key.shape[2]:
        # A sliding-window layer's cache holds only the last keys of the sequence.
        key_modality = key_modality[:, -key.shape[2] :]
    checkable = edit is not None and attention_profile is None and key_modality is not None
    if checkable and not edit.can_change(key_modality):
        edit = None  # e.g. the image prefix pass of a rule whose recipient is text
    # What SDPA and the fused path cannot do (soft-capped logits, sinks) takes the eager path.
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    plain_softmax = not softcap and sinks is None
    if edit is None and attention_profile is None and plain_softmax:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if key_modality is None and (edit is not None or attention_profile is not None):
        raise ValueError(
            "an attention_edit or profile needs key_modality (sysattn_exp.attention.modality)"
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    call = Call(attention_mask, scaling, key_modality, softcap, sinks, module.layer_idx)
    heads = None if edit is None else edit.heads_in(module.layer_idx)
    if heads is None:
        out = call.attend(query, key, value, edit, attention_profile)
    else:
        out = on_heads(call, heads, query, key, value, edit, attention_profile)
    return out.transpose(1, 2).contiguous(), None


@dataclass
class Call:
    """One attention call's arguments but the heads' tensors: what every head shares."""

    attention_mask: torch.Tensor | None
    scaling: float
    key_modality: torch.Tensor
    softcap: float | None
    sinks: torch.Tensor | None  # (H,) learned per-head logits, or None
    layer: int

    def attend(self, query, key, value, edit, profile, sinks=None) -> torch.Tensor:
        """The rule's output (B, H, Q, D) for these heads (sinks: theirs, default all):
        eager where the softmax is not plain (soft-capping, sinks), else the rule's
        implementation; a profile takes the fused path, whose masses give the shares."""
        sinks = self.sinks if sinks is None else sinks
        mask, scaling, modality = self.attention_mask, self.scaling, self.key_modality
        if self.softcap or sinks is not None:
            kernels.note_path("eager")
            return eager_edited_attention(
                query, key, value, mask, scaling, modality, edit,
                self.softcap, sinks, profile, self.layer,
            )  # fmt: skip
        if profile is not None:
            return fused_edited_attention(
                query, key, value, mask, scaling, modality, edit, profile, self.layer
            )
        if edit is None:
            return plain_attention(query, key, value, mask, scaling, query.shape[2])
        if edit.impl == "eager":
            kernels.note_path("eager")
        return IMPLEMENTATIONS[edit.impl](query, key, value, mask, scaling, modality, edit)


def on_heads(call: Call, heads: list[int], query, key, value, edit, profile) -> torch.Tensor:
    """The rule on the query heads `heads` of this layer only (intervention.heads), plain
    attention on the others: every head plainly, then the chosen heads again under the
    rule, each with its own KV head (grouped-query attention: query head h reads KV head
    h // (H / H_kv), as transformers' repeat_kv). A profile gets each block's shares of
    every head, the chosen heads' after the rule (HeadShares)."""
    shares = None if profile is None else HeadShares(profile, heads)
    out = call.attend(query, key, value, None, shares)
    if not heads:
        return out
    index = torch.tensor(heads, device=query.device)
    kv = index // (query.shape[1] // key.shape[1])
    sinks = None if call.sinks is None else call.sinks[index]
    chosen = call.attend(
        query[:, index], key[:, kv], value[:, kv], edit, shares and shares.chosen, sinks
    )
    out[:, index] = chosen.to(out.dtype)
    return out


class HeadShares:
    """A profile's stand-in for a head-selective call: it keeps each block's shares of
    every head (plain attention), then records them with the chosen heads' replaced by
    their shares under the rule (`chosen`: the stand-in for that second call)."""

    def __init__(self, profile, heads: list[int]):
        self.profile, self.heads, self.plain = profile, heads, {}
        self.first_key = profile.first_key  # (B, K): the same keys in both calls
        self.chosen = _ChosenShares(self)

    def record(self, layer, shares: dict, key_modality, rows: slice, q_len: int) -> None:
        if not self.heads:
            self.profile.record(layer, shares, key_modality, rows, q_len)
        else:
            self.plain[rows.start] = {name: share.clone() for name, share in shares.items()}


class _ChosenShares:
    def __init__(self, whole: HeadShares):
        self.whole, self.first_key = whole, whole.first_key

    def record(self, layer, shares: dict, key_modality, rows: slice, q_len: int) -> None:
        merged = self.whole.plain.pop(rows.start)
        for name, share in shares.items():
            merged[name][:, self.whole.heads] = share.to(merged[name].dtype)
        self.whole.profile.record(layer, merged, key_modality, rows, q_len)


class EditNotApplied(UsageError):
    """A forward pass given an edit did not apply it in exactly the rule's layers."""


@dataclass
class EditTally:
    """The forward passes given an edit while watched (watch_edits): how many were checked,
    and in how many decoder layers each applied the edit (the same in every pass: a pass
    that differs stops the job); None until a pass ends."""

    passes: int = 0
    edited_layers: int | None = None


@dataclass
class _Pass:
    owner: torch.nn.Module  # the guarded module whose forward call opened the pass
    edit: Rule
    received: set[int] = field(default_factory=set)  # layer_idx of calls given the edit
    applied: set[int] = field(default_factory=set)  # ... that selected it


# Per thread: the pass being checked (`open`) and the active tallies. Hooks run in the
# thread that calls the model, so concurrent jobs in threads never see each other's pass.
_state = threading.local()


def guard_edits(model: torch.nn.Module) -> None:
    """Check every forward call of `model`, and of its inner model (`model.model`, which
    scoring calls directly), that is given an attention_edit while its language model runs
    sysattn (tests swap in reference implementations). Idempotent. Raises EditNotApplied
    at the end of a pass where some decoder layer did not receive the edit or the layers
    that applied it are not the rule's."""
    for module in (model, getattr(model, "model", None)):
        if isinstance(module, torch.nn.Module) and not getattr(module, "_sysattn_guard", False):
            module.register_forward_pre_hook(_open_pass, with_kwargs=True)
            module.register_forward_hook(_close_pass, with_kwargs=True, always_call=True)
            module._sysattn_guard = True


@contextmanager
def watch_edits() -> Iterator[EditTally]:
    """Count, in this thread, the checked forward passes and the layers they edited."""
    tally = EditTally()
    tallies = _tallies()
    tallies.append(tally)
    try:
        yield tally
    finally:
        tallies[:] = [t for t in tallies if t is not tally]  # by identity, not equality


def _tallies() -> list[EditTally]:
    if not hasattr(_state, "tallies"):
        _state.tallies = []
    return _state.tallies


def note_layer(layer: int, applied: bool) -> None:
    """Called by the attention function for every call that is given an edit."""
    current = getattr(_state, "open", None)
    if current is not None:
        current.received.add(layer)
        if applied:
            current.applied.add(layer)


def _text_config(module):
    return module.config.get_text_config()


def _open_pass(module, args, kwargs):
    edit = kwargs.get("attention_edit")
    if edit is None or getattr(_state, "open", None) is not None:
        return  # no edit, or an inner call of a pass already open
    if _text_config(module)._attn_implementation == ATTENTION_NAME:
        _state.open = _Pass(module, edit)


def _close_pass(module, args, kwargs, output):
    current = getattr(_state, "open", None)
    if current is None or current.owner is not module:
        return
    _state.open = None
    if output is None:  # the forward raised: its own error is the one to see
        return
    problem = pass_problem(current, _text_config(module).num_hidden_layers)
    if problem:
        raise EditNotApplied(
            f"intervention {current.edit.describe()}: {problem} in a forward pass of this "
            f"{module.config.model_type} model (transformers {transformers.__version__}), "
            "so its scores would be the baseline's or another rule's; the model does not "
            "pass attention_edit to its attention as this tool expects (sysattn_exp/"
            "intervention.py)"
        )
    for tally in _tallies():
        tally.passes += 1
        tally.edited_layers = len(current.applied)


def pass_problem(current: _Pass, num_layers: int) -> str | None:
    """What is wrong with a finished pass, or None: every decoder layer 0..n-1 received the
    edit and exactly the rule's layers applied it."""
    want = sorted(current.edit.layers)
    missing = sorted(set(range(num_layers)) - current.received)
    if current.applied != current.edit.layers:
        return f"applied in decoder layers {sorted(current.applied)}, not the resolved {want}"
    if missing or not current.received <= set(range(num_layers)):
        return (
            f"decoder layers {missing} of 0-{num_layers - 1} never received it (it came to "
            f"layers {sorted(current.received)})"
        )
    return None


AttentionInterface.register(ATTENTION_NAME, sysattn_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
