"""Plain, loop-based reference attention written independently of sysattn_exp.intervention.

For every real query row of every head it computes softmax attention over the visible keys
(causal, padding excluded; within a sliding window on a layer that has one; image keys in
both directions among image queries where the family does that, Gemma 3), with logits
soft-capped where the family does that (Gemma 2), applies the redistribution rule of
DESIGN.md section 1 if the layer is selected, and takes the weighted sum of the values.
Layers the rule does not select (and all layers when there is no rule and no profile)
compute the same plain attention vectorised over rows, to keep the tests fast.
"""

import torch
from transformers import AttentionInterface

REFERENCE_NAME = "reference_eager"

# Set by `reference_setup` before each forward: the rule and each row's modality names.
STATE: dict = {}


def row_modalities(input_ids, attention_mask, image_token_id, text_starts=None):
    """Per row, a list of 'pad' / 'system' / 'image' / 'text' by position. A row without an
    image is system before text_starts[row] (the question's first position) and text after."""
    rows = []
    for b, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist(), strict=True)):
        image_positions = [i for i, t in enumerate(ids) if t == image_token_id and mask[i]]
        if image_positions:
            first, last = image_positions[0], image_positions[-1]
        else:  # an empty image span just before the question
            first, last = text_starts[b], text_starts[b] - 1
        names = []
        for i in range(len(ids)):
            if not mask[i]:
                names.append("pad")
            elif i < first:
                names.append("system")
            elif i <= last:
                names.append("image")
            else:
                names.append("text")
        rows.append(names)
    return rows


def reference_setup(
    input_ids, attention_mask, image_token_id, rule, text_starts=None, bidirectional_image=False
):
    """rule: None, or dict(kind=..., layers=set, ...) as understood by `edit_row`."""
    STATE["modalities"] = row_modalities(input_ids, attention_mask, image_token_id, text_starts)
    STATE["rule"] = rule
    STATE["bidirectional_image"] = bidirectional_image


def visible_keys(names: list[str], pos: int, window: int | None) -> list[int]:
    """Key positions the query at `pos` sees."""
    both_image = STATE.get("bidirectional_image") and names[pos] == "image"
    return [
        j
        for j in range(len(names))
        if names[j] != "pad"
        and (j <= pos or (both_image and names[j] == "image"))
        and (window is None or pos - j < window)
    ]


def edit_row(weights: torch.Tensor, names: list[str], rule: dict) -> torch.Tensor:
    """Apply the rule to one row of post-softmax weights over keys named by `names`:
    redistribution (rule has source, recipients and optionally fraction and mode) or
    scaling (modality, factor)."""
    if "factor" in rule:
        return scale_row(weights, names, rule)
    weights = weights.clone()
    fraction = rule.get("fraction", 1.0)
    uniform = rule.get("mode") == "uniform"
    source = [n == rule["source"] for n in names]
    recipient = [n in rule["recipients"] for n in names]
    mass_source = sum(float(w) for w, s in zip(weights, source, strict=True) if s)
    mass_recipient = sum(float(w) for w, r in zip(weights, recipient, strict=True) if r)
    if mass_source == 0 or mass_recipient == 0:
        return weights
    total_source = weights[torch.tensor(source)].sum()
    total_recipient = weights[torch.tensor(recipient)].sum()
    n_recipient = sum(recipient)
    original = weights.clone()
    for k in range(len(names)):
        if source[k]:
            weights[k] = (1 - fraction) * original[k]
        elif recipient[k] and uniform:
            weights[k] = original[k] + fraction * total_source / n_recipient
        elif recipient[k]:
            weights[k] = original[k] + fraction * total_source * original[k] / total_recipient
    return weights


def scale_row(weights: torch.Tensor, names: list[str], rule: dict) -> torch.Tensor:
    scaled = torch.stack(
        [
            w * rule["factor"] if n == rule["modality"] else w
            for w, n in zip(weights, names, strict=True)
        ]
    )
    return scaled / scaled.sum()


def capped(scores, softcap):
    return scores if not softcap else torch.tanh(scores / softcap) * softcap


def plain_attention(query, key, value, scaling, window, softcap):
    """The same attention without a rule, vectorised over the rows of each sequence."""
    batch, heads, q_len, dim = query.shape
    group = heads // key.shape[1]
    k_len = key.shape[2]
    out = torch.zeros(batch, q_len, heads, dim, dtype=query.dtype)
    for b in range(batch):
        names = STATE["modalities"][b]
        visible = torch.zeros(q_len, k_len, dtype=torch.bool)
        for qi in range(q_len):
            if names[k_len - q_len + qi] != "pad":
                visible[qi, visible_keys(names, k_len - q_len + qi, window)] = True
        keys = key[b].repeat_interleave(group, dim=0).double()
        values = value[b].repeat_interleave(group, dim=0).double()
        scores = capped(query[b].double() @ keys.transpose(1, 2) * scaling, softcap)
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        weights = weights.nan_to_num(0.0)
        out[b] = (weights @ values).transpose(0, 1).to(query.dtype)
    return out


def reference_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
    batch, heads, q_len, dim = query.shape
    group = heads // key.shape[1]
    k_len = key.shape[2]
    rule = STATE["rule"]
    edit_here = rule is not None and module.layer_idx in rule["layers"]
    window, softcap = kw.get("sliding_window"), kw.get("softcap")
    if not edit_here and "shares" not in STATE:
        return plain_attention(query, key, value, scaling, window, softcap), None
    out = torch.zeros(batch, q_len, heads, dim, dtype=query.dtype)
    for b in range(batch):
        names = STATE["modalities"][b]
        last_real = max(i for i, n in enumerate(names) if n != "pad")
        offset = k_len - q_len
        for h in range(heads):
            keys, values = key[b, h // group], value[b, h // group]
            for qi in range(q_len):
                pos = offset + qi
                if names[pos] == "pad":
                    continue
                visible = visible_keys(names, pos, window)
                scores = capped(keys[visible] @ query[b, h, qi] * scaling, softcap)
                # PAI: on the answer position only, image scores z -> z + alpha |z|.
                if edit_here and "alpha" in rule and pos == last_real and names[pos] == "text":
                    for n, j in enumerate(visible):
                        if names[j] == "image":
                            scores[n] = scores[n] + rule["alpha"] * scores[n].abs()
                weights = torch.softmax(scores.double(), dim=0)
                if edit_here and "alpha" not in rule:
                    weights = edit_row(weights, [names[j] for j in visible], rule)
                if pos == last_real and "shares" in STATE:  # the answer position's shares
                    by_name = {
                        m: float(
                            sum(w for w, j in zip(weights, visible, strict=True) if names[j] == m)
                        )
                        for m in ("system", "image", "text")
                    }
                    STATE["shares"].setdefault(module.layer_idx, []).append(by_name)
                out[b, qi, h] = (weights[:, None] * values[visible].double()).sum(0).to(query.dtype)
    return out, None


AttentionInterface.register(REFERENCE_NAME, reference_attention)
