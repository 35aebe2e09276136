"""Both implementations of the redistribution (fused, the default, and eager) equal an
independent loop-based reference, and each other, to 1e-5 in float32."""

import itertools

import pytest
import torch
from conftest import make_image
from paths import IMPL_PATHS
from reference import REFERENCE_NAME, reference_setup

from sysattn_exp.attention import kernels
from sysattn_exp.attention.fused import PATHS
from sysattn_exp.attention.intervention import eager_edited_attention
from sysattn_exp.attention.rules import Redistribution, Rule, Scale
from sysattn_exp.evaluation.scoring import left_padded_position_ids
from sysattn_exp.models.loading import use_sysattn
from sysattn_exp.models.prompts import build_prompt

SYSTEM_PROMPT = "A chat between a curious user and an artificial intelligence assistant."
QUESTIONS = [
    "Is there a red circle in the image? Please answer yes or no.",
    "Is it blue?",
    "Does this figure show a yellow square next to a green triangle on the left?",
]
MODALITY_NAMES = ["system", "image", "text"]


def all_rules():
    """Every source with every non-empty set of other modalities as recipients."""
    for source in MODALITY_NAMES:
        others = [m for m in MODALITY_NAMES if m != source]
        for n in (1, 2):
            for recipients in itertools.combinations(others, n):
                yield source, recipients


def batch_inputs(processor, system_prompts):
    prompts = [build_prompt(q, s) for q, s in zip(QUESTIONS, system_prompts, strict=True)]
    images = [make_image(c) for c in ("red", "blue", "green")]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3, "want three lengths"
    return inputs


def forward_logits(model, inputs, **extra):
    with torch.no_grad():
        return model(
            **inputs, position_ids=left_padded_position_ids(inputs["attention_mask"]), **extra
        ).logits


def reference_logits(model, inputs, rule):
    reference_setup(
        inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id, rule
    )
    model.set_attn_implementation({"text_config": REFERENCE_NAME, "vision_config": "sdpa"})
    try:
        return forward_logits(model, inputs)
    finally:
        use_sysattn(model)


def sysattn_logits(model, inputs, edit):
    from sysattn_exp.attention.modality import modality_ids

    use_sysattn(model)
    key_modality = modality_ids(
        inputs["input_ids"],
        inputs["attention_mask"],
        model.config.image_token_id,
    )
    return forward_logits(model, inputs, key_modality=key_modality, attention_edit=edit)


@pytest.fixture(scope="module")
def padded_batch(gqa_llava):
    # Mixed system prompts: the system span differs per row as well as the padding.
    return batch_inputs(gqa_llava[1], [SYSTEM_PROMPT, "", SYSTEM_PROMPT])


@pytest.mark.parametrize("impl,path", IMPL_PATHS)
@pytest.mark.parametrize("source,recipients", list(all_rules()))
def test_redistribution_matches_reference(gqa_llava, padded_batch, source, recipients, impl, path):
    model, _ = gqa_llava
    layers = frozenset({3, 4, 5})
    real = padded_batch["attention_mask"].bool()
    got = sysattn_logits(model, padded_batch, Redistribution(source, recipients, layers, impl))
    rule = {"source": source, "recipients": set(recipients), "layers": layers}
    want = reference_logits(model, padded_batch, rule)
    assert torch.allclose(got[real], want[real], atol=1e-5, rtol=0), (got - want)[real].abs().max()
    baseline = sysattn_logits(model, padded_batch, None)
    assert (baseline[real] - got[real]).abs().max() > 1e-3, "the intervention changed nothing"


def test_baseline_matches_reference(gqa_llava, padded_batch):
    model, _ = gqa_llava
    real = padded_batch["attention_mask"].bool()
    got = sysattn_logits(model, padded_batch, None)
    want = reference_logits(model, padded_batch, None)
    assert torch.allclose(got[real], want[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl,path", IMPL_PATHS)
@pytest.mark.parametrize("layers", [frozenset(range(6)), frozenset({0}), frozenset({2, 3})])
def test_layer_selection_matches_reference(gqa_llava, padded_batch, layers, impl, path):
    model, _ = gqa_llava
    real = padded_batch["attention_mask"].bool()
    edit = Redistribution("system", ("image",), layers, impl)
    got = sysattn_logits(model, padded_batch, edit)
    rule = {"source": "system", "recipients": {"image"}, "layers": layers}
    want = reference_logits(model, padded_batch, rule)
    assert torch.allclose(got[real], want[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl,path", IMPL_PATHS)
def test_unpadded_single_prompt_matches_reference(gqa_llava, impl, path):
    """One unpadded row: transformers passes attention_mask=None (causal)."""
    model, processor = gqa_llava
    inputs = processor(
        images=[make_image("red")],
        text=[build_prompt(QUESTIONS[0], SYSTEM_PROMPT)],
        return_tensors="pt",
    )
    rule = {"source": "system", "recipients": {"text"}, "layers": {4, 5}}
    got = sysattn_logits(
        model, inputs, Redistribution("system", ("text",), frozenset({4, 5}), impl)
    )
    want = reference_logits(model, inputs, rule)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("source,recipients", list(all_rules()))
def test_fused_equals_eager_in_small_query_blocks(
    gqa_llava, padded_batch, monkeypatch, source, recipients, path
):
    """Blocks of a few query rows exercise the block loop (padding, spans across blocks),
    on either path (rows: blocks of 7 rows of every sequence and head)."""
    import sysattn_exp.attention.fused as fused

    model, _ = gqa_llava
    real = padded_batch["attention_mask"].bool()
    layers = frozenset(range(6))
    eager = sysattn_logits(model, padded_batch, Redistribution(source, recipients, layers, "eager"))
    monkeypatch.setattr(fused, "BLOCK_ENTRIES", 7 * padded_batch["input_ids"].shape[1])
    monkeypatch.setattr(fused, "ROWS_BLOCK_ENTRIES", 7 * padded_batch["input_ids"].numel() * 6)
    fused = sysattn_logits(model, padded_batch, Redistribution(source, recipients, layers, "fused"))
    assert torch.allclose(fused[real], eager[real], atol=1e-5, rtol=0)


def test_attention_with_lse_kernels_agree():
    """The CPU flash kernel and the portable fallback give the same output and LSE, with
    rows that see no key."""
    from sysattn_exp.attention.fused import attention_with_lse
    from sysattn_exp.attention.kernels import attention_with_lse_math

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 11, 16), torch.randn(2, 4, 11, 16)
    mask = torch.rand(2, 1, 9, 11) > 0.4
    mask[:, :, 0] = False
    out, lse = attention_with_lse(q, k, v, mask, 0.25, False)
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    out_math, lse_math = attention_with_lse_math(q, k, v, bias, 0.25)
    seen = mask.any(-1).expand(2, 4, 9)
    assert torch.allclose(out[seen], out_math[seen], atol=1e-5)
    assert torch.allclose(lse[seen], lse_math[seen], atol=1e-5)
    scores = (q @ k.transpose(-1, -2)) * 0.25
    want = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)
    assert torch.allclose(lse[seen], want[seen], atol=1e-5)


def layout(padding: str) -> torch.Tensor:
    """(3, 24) modality ids: system 4-6 tokens, image 8, text 5-9, padded as asked."""
    rows = []
    for system, text in ((4, 9), (6, 5), (5, 7)):
        row = [1] * system + [2] * 8 + [3] * text
        pad = [0] * (24 - len(row))
        rows.append(pad + row if padding == "left" else row + pad)
    return torch.tensor(rows)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("q_len", [24, 9, 1])
@pytest.mark.parametrize("block", [None, 5])
@pytest.mark.parametrize("source,recipients", list(all_rules()))
@pytest.mark.parametrize("variant", [{}, {"fraction": 0.3, "mode": "uniform"}])
@pytest.mark.parametrize("path", PATHS)
def test_fused_kernel_equals_eager(
    monkeypatch, padding, q_len, block, source, recipients, variant, path
):
    """The attention functions alone on random tensors: clean and masked spans, queries
    that start inside a span (a cache), small query blocks."""
    import sysattn_exp.attention.fused as fused
    from sysattn_exp.attention.intervention import eager_edited_attention

    if block:  # blocks of `block` query rows on either path
        monkeypatch.setattr(fused, "BLOCK_ENTRIES", block * 24)
        monkeypatch.setattr(fused, "ROWS_BLOCK_ENTRIES", block * 24 * 3 * 4)
    torch.manual_seed(1)
    key_modality = layout(padding)
    q, k, v = torch.randn(3, 4, q_len, 8), torch.randn(3, 2, 24, 8), torch.randn(3, 2, 24, 8)
    real = key_modality != 0
    causal = torch.ones(24, 24, dtype=torch.bool).tril()[24 - q_len :]
    mask = (causal[None] & real[:, None, :])[:, None]
    edit = Redistribution(source, recipients, frozenset({0}), **variant)
    want = eager_edited_attention(q, k, v, mask, 0.3, key_modality, edit)
    got = fused.fused_edited_attention(q, k, v, mask, 0.3, key_modality, edit)
    rows = real[:, 24 - q_len :]
    assert torch.allclose(got.transpose(1, 2)[rows], want.transpose(1, 2)[rows], atol=1e-5)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("q_len", [24, 9, 1])
@pytest.mark.parametrize("block", [None, 5])
@pytest.mark.parametrize("modality,factor", [("image", 2.0), ("system", 0.25), ("text", 3.0)])
@pytest.mark.parametrize("path", PATHS)
def test_scale_kernel_equals_eager(monkeypatch, padding, q_len, block, modality, factor, path):
    """Scale on every path (its bias path adds ln(factor) to the modality's scores in one
    SDPA call) equals eager on random tensors, padding and small query blocks included."""
    import sysattn_exp.attention.fused as fused

    if block:
        monkeypatch.setattr(fused, "BLOCK_ENTRIES", block * 24)
        monkeypatch.setattr(fused, "ROWS_BLOCK_ENTRIES", block * 24 * 3 * 4)
    torch.manual_seed(3)
    key_modality = layout(padding)
    q, k, v = torch.randn(3, 4, q_len, 8), torch.randn(3, 2, 24, 8), torch.randn(3, 2, 24, 8)
    real = key_modality != 0
    causal = torch.ones(24, 24, dtype=torch.bool).tril()[24 - q_len :]
    mask = (causal[None] & real[:, None, :])[:, None]
    edit = Scale(modality, factor, frozenset({0}))
    want = eager_edited_attention(q, k, v, mask, 0.3, key_modality, edit)
    with kernels.record_paths() as paths:
        got = fused.fused_edited_attention(q, k, v, mask, 0.3, key_modality, edit)
    assert ("bias" in paths) == (path == "bias")
    rows = real[:, 24 - q_len :]
    assert torch.allclose(got.transpose(1, 2)[rows], want.transpose(1, 2)[rows], atol=1e-5)


VARIANTS = [
    ({"fraction": 0.25}, {}),
    ({"fraction": 0.6, "mode": "uniform"}, {}),
    ({"mode": "uniform"}, {}),
]


@pytest.mark.parametrize("impl,path", IMPL_PATHS)
@pytest.mark.parametrize("variant", [v for v, _ in VARIANTS])
@pytest.mark.parametrize(
    "source,recipients",
    [("system", ("text",)), ("system", ("image", "text")), ("image", ("system",))],
)
def test_dose_and_uniform_match_reference(
    gqa_llava, padded_batch, source, recipients, variant, impl, path
):
    model, _ = gqa_llava
    layers = frozenset({2, 4, 5})
    real = padded_batch["attention_mask"].bool()
    edit = Redistribution(source, recipients, layers, impl, **variant)
    got = sysattn_logits(model, padded_batch, edit)
    want = reference_logits(
        model,
        padded_batch,
        {"source": source, "recipients": set(recipients), "layers": layers} | variant,
    )
    assert torch.allclose(got[real], want[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl,path", IMPL_PATHS)
@pytest.mark.parametrize("modality,factor", [("image", 2.0), ("system", 0.5), ("text", 3.0)])
def test_scale_matches_reference(gqa_llava, padded_batch, modality, factor, impl, path):
    from sysattn_exp.attention.rules import Scale

    model, _ = gqa_llava
    layers = frozenset({3, 4, 5})
    real = padded_batch["attention_mask"].bool()
    got = sysattn_logits(model, padded_batch, Scale(modality, factor, layers, impl))
    want = reference_logits(
        model, padded_batch, {"modality": modality, "factor": factor, "layers": layers}
    )
    assert torch.allclose(got[real], want[real], atol=1e-5, rtol=0)
    baseline = sysattn_logits(model, padded_batch, None)
    assert (baseline[real] - got[real]).abs().max() > 1e-3


def test_fraction_zero_is_the_baseline_and_one_is_the_full_rule(gqa_llava, padded_batch):
    model, _ = gqa_llava
    real = padded_batch["attention_mask"].bool()
    layers = frozenset(range(6))
    none = sysattn_logits(
        model, padded_batch, Redistribution("system", ("text",), layers, fraction=0.0)
    )
    assert torch.allclose(none[real], sysattn_logits(model, padded_batch, None)[real], atol=1e-5)
    full = sysattn_logits(
        model, padded_batch, Redistribution("system", ("text",), layers, fraction=1.0)
    )
    rule = {"source": "system", "recipients": {"text"}, "layers": layers}  # no fraction: all
    assert torch.allclose(full[real], reference_logits(model, padded_batch, rule)[real], atol=1e-5)


@pytest.mark.parametrize("impl,path", IMPL_PATHS)
@pytest.mark.parametrize("alpha", [0.2, 20.0])
def test_pai_matches_reference(gqa_llava, padded_batch, alpha, impl, path):
    from sysattn_exp.attention.rules import Pai

    model, _ = gqa_llava
    layers = frozenset(range(1, 6))
    real = padded_batch["attention_mask"].bool()
    got = sysattn_logits(model, padded_batch, Pai(alpha, layers, impl))
    want = reference_logits(model, padded_batch, {"alpha": alpha, "layers": layers})
    assert torch.allclose(got[real], want[real], atol=1e-5, rtol=0)
    baseline = sysattn_logits(model, padded_batch, None)
    last = padded_batch["input_ids"].shape[1] - 1  # left padding: every answer is last
    # Scores of a 0.02-scale random model are small: only a large alpha moves them visibly.
    assert (baseline[:, last] - got[:, last]).abs().max() > (1e-3 if alpha > 1 else 1e-5)
    assert torch.allclose(
        baseline[:, :last][real[:, :last]], got[:, :last][real[:, :last]], atol=1e-5
    )


@pytest.mark.parametrize(
    "rule",
    [
        None,
        {"source": "system", "recipients": {"text"}},
        {"source": "image", "recipients": {"system", "text"}, "fraction": 0.5, "mode": "uniform"},
        {"modality": "image", "factor": 2.0},
    ],
)
def test_attention_sinks_take_mass_and_give_none(rule):
    """GPT-OSS-style sinks (a learned per-head logit, s_aux, in the softmax with no value):
    the rule moves mass between keys only, and the image x2 baseline is ln 2 added to the
    image scores before the softmax over keys and sink, computed here row by row."""
    from types import SimpleNamespace

    from reference import edit_row

    from sysattn_exp.attention.intervention import sysattn_attention

    torch.manual_seed(3)
    key_modality = layout("right")
    q, k, v = torch.randn(3, 4, 24, 8), torch.randn(3, 2, 24, 8), torch.randn(3, 2, 24, 8)
    sinks = torch.randn(4)
    real = key_modality != 0
    mask = (torch.ones(24, 24, dtype=torch.bool).tril()[None] & real[:, None, :])[:, None]
    if rule is None:
        edit = None
    elif "factor" in rule:
        edit = Scale(rule["modality"], rule["factor"], frozenset({0}))
    else:
        extra = {key: rule[key] for key in ("fraction", "mode") if key in rule}
        edit = Redistribution(rule["source"], tuple(rule["recipients"]), frozenset({0}), **extra)
    module = SimpleNamespace(layer_idx=0)
    got, _ = sysattn_attention(
        module, q, k, v, mask, 0.3, attention_edit=edit, key_modality=key_modality, s_aux=sinks
    )
    names = {0: "pad", 1: "system", 2: "image", 3: "text"}
    for b in range(3):
        row_names = [names[int(m)] for m in key_modality[b]]
        for h in range(4):
            for i in range(24):
                if row_names[i] == "pad":
                    continue
                seen = [j for j in range(i + 1) if row_names[j] != "pad"]
                scores = (k[b, h // 2, seen] @ q[b, h, i]).double() * 0.3
                if rule is not None and "factor" in rule:
                    is_x = torch.tensor([row_names[j] == rule["modality"] for j in seen])
                    scores = scores + is_x * torch.log(torch.tensor(rule["factor"]))
                weights = torch.softmax(torch.cat([scores, sinks[h : h + 1].double()]), 0)[:-1]
                if rule is not None and "factor" not in rule:
                    weights = edit_row(weights, [row_names[j] for j in seen], rule)
                want = (weights[:, None] * v[b, h // 2, seen].double()).sum(0)
                assert torch.allclose(got[b, i, h].double(), want, atol=1e-5)


class WeightsUntouched(Redistribution):
    """A plug-in rule with a merge and no eager edit of its own: no rows path."""

    eager_weights = Rule.eager_weights


def test_path_by_shape_forced_and_recorded(monkeypatch):
    """A few rows' weights are materialised (rows), many take spans, by the number of
    weights (ROWS_PATH_MAX_ENTRIES); a rule that only hides its source's keys takes one
    SDPA call with a bias (-inf) on them; forced_path overrides; kernel_path records the
    path."""
    import sysattn_exp.attention.fused as fused
    from sysattn_exp.attention import kernels

    torch.manual_seed(0)
    key_modality = layout("left")  # system, image and text keys
    q, k, v = torch.randn(3, 4, 9, 8), torch.randn(3, 2, 24, 8), torch.randn(3, 2, 24, 8)
    edit = Redistribution("system", ("text",), frozenset({0}))
    assert fused.choose_path(edit, q, k, 9, key_modality) == "rows"  # 3 x 4 x 9 x 24 weights
    monkeypatch.setattr(fused, "ROWS_PATH_MAX_ENTRIES", 3 * 4 * 9 * 24 - 1)
    assert fused.choose_path(edit, q, k, 9, key_modality) == "spans"
    assert fused.choose_path(edit, q, k, 8, key_modality) == "rows"
    # Masked: all of the source's mass to every other modality present, in proportion.
    every_other = Redistribution("system", ("image", "text"), frozenset({0}))
    assert fused.choose_path(every_other, q, k, 9, key_modality) == "bias"
    no_text = torch.where(key_modality == 3, 2, key_modality)
    assert fused.choose_path(edit, q, k, 9, no_text) == "spans"  # image keys keep their mass
    assert fused.choose_path(Redistribution("system", ("image",), {0}), q, k, 9, no_text) == (
        "bias"
    )
    for variant in ({"fraction": 0.5}, {"mode": "uniform"}):
        dose = Redistribution("system", ("image", "text"), frozenset({0}), **variant)
        assert dose.key_bias(key_modality) is None
    with fused.forced_path("rows"):
        assert fused.choose_path(edit, q, k, 9, key_modality) == "rows"
        untouched = WeightsUntouched("system", ("text",), frozenset({0}))
        assert fused.choose_path(untouched, q, k, 1, key_modality) == "spans"
    with fused.forced_path("bias"):  # not this rule's: by shape
        assert fused.choose_path(edit, q, k, 9, key_modality) == "spans"
    with pytest.raises(ValueError, match="allowed: spans, rows, bias"), fused.forced_path("x"):
        pass
    causal = torch.ones(24, 24, dtype=torch.bool).tril()[24 - 9 :]
    mask = (causal[None] & (key_modality != 0)[:, None, :])[:, None]
    want = eager_edited_attention(q, k, v, mask, 0.3, key_modality, every_other)
    for path in fused.PATHS:
        with fused.forced_path(path), kernels.record_paths() as paths:
            got = fused.fused_edited_attention(q, k, v, mask, 0.3, key_modality, every_other)
        assert {"rows", "bias"} & paths == ({path} - {"spans"})
        rows = key_modality[:, 24 - 9 :] != 0
        assert torch.allclose(got.transpose(1, 2)[rows], want.transpose(1, 2)[rows], atol=1e-5)
    assert kernels.path_label({"rows", "cpu_flash", "math"}) == "cpu_flash+rows+math"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("q_len", [20, 16, 3])
def test_hidden_source_in_an_unpadded_causal_call(q_len, path):
    """System -> every other modality on a plain causal call whose system keys come first
    in every sequence (an unpadded prefix pass: the bias path's maskless causal call when
    square), and on the last rows of one (a cache), equals eager on every row."""
    import sysattn_exp.attention.fused as fused
    from sysattn_exp.attention.intervention import eager_edited_attention

    torch.manual_seed(2)
    key_modality = torch.tensor([[1] * 5 + [2] * 10 + [3] * 5] * 2)
    q, k, v = torch.randn(2, 4, q_len, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    mask = None if q_len == 20 else torch.ones(20, 20, dtype=torch.bool).tril()[20 - q_len :]
    mask = None if mask is None else mask[None, None].expand(2, 1, q_len, 20)
    edit = Redistribution("system", ("image", "text"), frozenset({0}))
    want = eager_edited_attention(q, k, v, mask, 0.3, key_modality, edit)
    got = fused.fused_edited_attention(q, k, v, mask, 0.3, key_modality, edit)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("source,recipients", list(all_rules()))
@pytest.mark.parametrize("fraction", [1.0, 0.35])
def test_weight_factors_equal_eager_weights(source, recipients, fraction):
    """The rows path's edit by weight factors (fused.edited_weights: each modality's mass
    over its range of keys, its keys' weights times the rule's factor) equals the rule's
    eager_weights on random weights whose modalities are interleaved in any order, with
    padding keys and queries, and rows that see no key or no source or no recipient."""
    from sysattn_exp.attention.fused import KeyRange, edited_weights

    torch.manual_seed(5)
    key_modality = torch.randint(0, 4, (3, 30))
    key_modality[2] = torch.where(key_modality[2] == 1, 2, key_modality[2])  # no system
    visible = (torch.rand(3, 1, 7, 30) > 0.3) & (key_modality != 0)[:, None, None]
    visible[0, 0, 0] = False  # a row that sees nothing
    visible[1, 0, 1] = key_modality[1] == 3  # a row that sees text only
    scores = torch.randn(3, 4, 7, 30).masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    query_is_real = torch.rand(3, 7) > 0.2
    edit = Redistribution(source, recipients, frozenset({0}), fraction=fraction)
    want = edit.eager_weights(weights, visible, key_modality, query_is_real)
    ranges = KeyRange.of_modalities(key_modality)
    got = edited_weights(edit, weights.clone(), visible, key_modality, query_is_real, ranges)
    assert torch.allclose(got, want, atol=1e-6)
    uniform = Redistribution(source, recipients, frozenset({0}), fraction=fraction, mode="uniform")
    want = uniform.eager_weights(weights, visible, key_modality, query_is_real)
    got = edited_weights(uniform, weights.clone(), visible, key_modality, query_is_real, ranges)
    assert torch.equal(got, want)  # not a product of factors: eager_weights itself
