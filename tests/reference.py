"""Plain, loop-based reference attention, written independently of the package's attention
layer (sysattn_exp.attention: rules.py, intervention.py, fused.py).

For every real query row of every head it computes softmax attention over the visible keys
(causal, padding excluded; within a sliding window on a layer that has one; image keys in
both directions among image queries where the family does that, Gemma 3), with logits
soft-capped where the family does that (Gemma 2), applies the redistribution rule of
docs/design.md section 1.2 if the layer (and, where the rule names heads, the head) is
selected, and takes the weighted sum of the values.
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
    scaling (modality, factor). Python floats (double precision), key by key."""
    if "factor" in rule:
        return scale_row(weights, names, rule)
    row = weights.tolist()
    fraction = rule.get("fraction", 1.0)
    uniform = rule.get("mode") == "uniform"
    source = [n == rule["source"] for n in names]
    recipient = [n in rule["recipients"] for n in names]
    total_source = sum(w for w, s in zip(row, source, strict=True) if s)
    total_recipient = sum(w for w, r in zip(row, recipient, strict=True) if r)
    if total_source == 0 or total_recipient == 0:
        return weights
    n_recipient = sum(recipient)
    edited = []
    for w, is_source, is_recipient in zip(row, source, recipient, strict=True):
        if is_source:
            edited.append((1 - fraction) * w)
        elif is_recipient and uniform:
            edited.append(w + fraction * total_source / n_recipient)
        elif is_recipient:
            edited.append(w + fraction * total_source * w / total_recipient)
        else:
            edited.append(w)
    return torch.tensor(edited, dtype=weights.dtype)


def scale_row(weights: torch.Tensor, names: list[str], rule: dict) -> torch.Tensor:
    scaled = [
        w * rule["factor"] if n == rule["modality"] else w
        for w, n in zip(weights.tolist(), names, strict=True)
    ]
    total = sum(scaled)
    return torch.tensor([w / total for w in scaled], dtype=weights.dtype)


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
        first_real = min(i for i, n in enumerate(names) if n != "pad")
        offset = k_len - q_len
        for qi in range(q_len):
            pos = offset + qi
            if names[pos] == "pad":
                continue
            visible = visible_keys(names, pos, window)
            visible_names = [names[j] for j in visible]
            index = torch.tensor(visible)
            for h in range(heads):
                # rule["heads"], if given: the (layer, head) pairs edited; others plain.
                edit_head = edit_here and (module.layer_idx, h) in rule.get(
                    "heads", {(module.layer_idx, h)}
                )
                keys, values = key[b, h // group, index], value[b, h // group, index]
                scores = capped(keys @ query[b, h, qi] * scaling, softcap)
                # PAI: on the answer position only, image scores z -> z + alpha |z|.
                if edit_head and "alpha" in rule and pos == last_real and names[pos] == "text":
                    for n, name in enumerate(visible_names):
                        if name == "image":
                            scores[n] = scores[n] + rule["alpha"] * scores[n].abs()
                weights = torch.softmax(scores.double(), dim=0)
                if edit_head and "alpha" not in rule:
                    weights = edit_row(weights, visible_names, rule)
                if pos == last_real and "shares" in STATE:  # the answer position's shares
                    row = weights.tolist()
                    by_name = {
                        m: sum(w for w, n in zip(row, visible_names, strict=True) if n == m)
                        for m in ("system", "image", "text")
                    }
                    # The first real position alone (BOS), where this row still sees it.
                    by_name["bos"] = (
                        row[visible.index(first_real)] if first_real in visible else 0.0
                    )
                    by_name["head"] = h
                    STATE["shares"].setdefault(module.layer_idx, []).append(by_name)
                out[b, qi, h] = (weights[:, None] * values.double()).sum(0).to(query.dtype)
    return out, None


AttentionInterface.register(REFERENCE_NAME, reference_attention)
