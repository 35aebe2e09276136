"""Independent verification of issue 20 ("Inside the model") on checkpoints the
implementation's own tests do not use: a Qwen2 text model (3 layers, 8 query heads over 2 KV
heads, hidden 64) and a Llama with multi-query attention (5 query heads over 1 KV head),
with key modalities laid out by hand (left padding, a system, an "image" and a text span
per row). The references here are written from the issue and README, not from the code:
an eager attention function registered with transformers' AttentionInterface that applies
each rule, row by row, to the post-softmax weights (PAI: to the answer row's pre-softmax
image scores) of the chosen heads only."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import (
    AttentionInterface,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sysattn_exp.attention.modality import IMAGE, PAD, SYSTEM, TEXT
from sysattn_exp.errors import UsageError
from sysattn_exp.evaluation.generation import CACHE_ARG
from sysattn_exp.experiment.conditions import build_edit, intervention_rule
from sysattn_exp.models.loading import use_sysattn

pytestmark = pytest.mark.usefixtures("one_thread")

REF = "verify20_reference"
NAMES = {SYSTEM: "system", IMAGE: "image", TEXT: "text"}
STATE: dict = {}  # the reference's rule: {"rule": dict, "layers": set, "heads": set | None}


def reference_row(weights, names, rule):
    """One query row's post-softmax weights (K,) under the rule (names: modality per key,
    None for an invisible or padding key)."""
    w = weights.clone()
    if rule["name"] == "redistribute":
        src = torch.tensor([n == rule["source"] for n in names])
        rec = torch.tensor([n in rule["recipients"] for n in names])
        a_s, a_r = float(w[src].sum()), float(w[rec].sum())
        if a_s <= 0 or a_r <= 0:
            return w
        f = rule.get("fraction", 1.0)
        gain = f * a_s
        if rule.get("mode", "proportional") == "uniform":
            add = rec.double() / rec.sum() * gain
        else:
            add = weights.double() * rec / a_r * gain
        w = w.double()
        w[src] *= 1 - f
        return (w + add).to(weights.dtype)
    if rule["name"] == "scale":
        x = torch.tensor([n == rule["modality"] for n in names])
        w[x] *= rule["factor"]
        return w / w.sum()
    return w


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Eager attention in float32; the rule on the chosen heads of its layers only."""
    layer = module.layer_idx
    b, h, q, _ = query.shape
    group = h // key.shape[1]
    kv = [i // group for i in range(h)]
    k, v = key.float()[:, kv], value.float()[:, kv]
    scores = query.float() @ k.transpose(2, 3) * scaling
    if kw.get("softcap"):  # Gemma 2: logits capped before anything else sees them
        scores = torch.tanh(scores / kw["softcap"]) * kw["softcap"]
    n_keys = k.shape[2]
    modality = STATE["key_modality"][:, -n_keys:]
    if attention_mask is None:
        pos = torch.arange(n_keys - q, n_keys)[:, None]
        visible = (torch.arange(n_keys)[None] <= pos)[None, None].expand(b, 1, q, n_keys)
    else:
        visible = attention_mask.expand(b, 1, q, n_keys)
    rule = STATE.get("rule")
    edited = rule is not None and layer in STATE["layers"]
    chosen = [
        i for i in range(h) if edited and (STATE["heads"] is None or (layer, i) in STATE["heads"])
    ]
    if rule is not None and rule["name"] == "pai":
        for row in range(b):
            real = (modality[row] != PAD).nonzero()[:, 0]
            last = int(real[-1])
            # Generation: the answer row of every step (each position from the prompt's last).
            first = STATE.get("pai_from", last) - (STATE["key_modality"].shape[1] - n_keys)
            is_image = modality[row] == IMAGE
            for position in range(first, last + 1):
                qi = position - (n_keys - q)
                if qi < 0 or modality[row, position] != TEXT:
                    continue
                for i in chosen:
                    z = scores[row, i, qi]
                    scores[row, i, qi] = torch.where(is_image, z + rule["alpha"] * z.abs(), z)
    scores = scores.masked_fill(~visible, -math.inf)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if rule is not None and rule["name"] != "pai":
        for row in range(b):
            for qi in range(q):
                if modality[row, n_keys - q + qi] == PAD:
                    continue
                names = [
                    NAMES.get(int(m)) if bool(visible[row, 0, qi, j]) else None
                    for j, m in enumerate(modality[row])
                ]
                for i in chosen:
                    weights[row, i, qi] = reference_row(weights[row, i, qi], names, rule)
    if "record" in STATE:
        STATE["record"][layer] = weights.clone()
    out = weights @ v
    return out.transpose(1, 2).contiguous().to(query.dtype), None


AttentionInterface.register(REF, reference_attention)
AttentionMaskInterface.register(REF, sdpa_mask)


def qwen2_gqa():
    """3 layers, 8 query heads over 2 KV heads (4 per group), hidden 64."""
    config = Qwen2Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(2020)
    return Qwen2ForCausalLM(config).float().eval()


def llama_mqa():
    """4 layers, 5 query heads over 1 KV head (multi-query attention), hidden 40."""
    config = LlamaConfig(
        vocab_size=89, hidden_size=40, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=64,
        initializer_range=0.2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(2021)
    return LlamaForCausalLM(config).float().eval()


def gemma2_capped():
    """Gemma 2: 3 layers (sliding window of 6 keys, full, sliding), 8 query heads over 2 KV
    heads, attention logits capped at 2 (strong: random scores reach it)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        attn_logit_softcapping=2.0, final_logit_softcapping=5.0, max_position_embeddings=64,
        initializer_range=0.2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(2022)
    return Gemma2ForCausalLM(config).float().eval()


MODELS = {"qwen2_gqa": qwen2_gqa, "llama_mqa": llama_mqa, "gemma2_capped": gemma2_capped}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


def left_padded_batch(vocab: int, spans=((0, 4, 6, 5), (3, 2, 5, 5), (6, 3, 3, 3))):
    """input_ids, attention_mask, position_ids and key_modality (B, N) of rows laid out as
    (padding, system, image, text) lengths, left padded."""
    generator = torch.Generator().manual_seed(5)
    modality = torch.tensor(
        [[PAD] * p + [SYSTEM] * s + [IMAGE] * i + [TEXT] * t for p, s, i, t in spans]
    )
    ids = torch.randint(1, vocab, modality.shape, generator=generator).masked_fill(
        modality == PAD, 0
    )
    mask = (modality != PAD).long()
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}, modality


def sysattn_logits(model, inputs, modality, edit):
    use_sysattn(model)
    with torch.no_grad():
        out = model(**inputs, key_modality=modality, attention_edit=edit)
    return out.logits


def own_reference_logits(model, inputs, modality, rule, layers, heads):
    STATE.update(rule=rule, layers=set(layers), heads=heads, key_modality=modality)
    model.set_attn_implementation(REF)
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        STATE.clear()
        use_sysattn(model)


def logit_error(got, want) -> float:
    """The largest difference of two logit tensors over the logits' own scale: 1e-5 of it is
    the float32 bound. Logits of these models reach ~6 after three layers, where a
    different summation order (another CPU's instruction set or thread count) moves the
    last bits by up to ~1.6e-5 in absolute terms."""
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


def configured(section: dict, layers, n_heads):
    rule = intervention_rule(OmegaConf.create(section))
    return build_edit(rule, list(layers), n_heads)


# (config section without heads, reference rule)
RULE_CASES = {
    "proportional": (
        {"name": "redistribute", "source": "system", "recipients": ["text"]},
        {"name": "redistribute", "source": "system", "recipients": {"text"}},
    ),
    "uniform": (
        {"name": "redistribute", "source": "system", "recipients": ["image", "text"],
         "mode": "uniform"},
        {"name": "redistribute", "source": "system", "recipients": {"image", "text"},
         "mode": "uniform"},
    ),
    "fraction": (
        {"name": "redistribute", "source": "image", "recipients": ["system"], "fraction": 0.3},
        {"name": "redistribute", "source": "image", "recipients": {"system"}, "fraction": 0.3},
    ),
    "scale": (
        {"name": "scale", "modality": "image", "factor": 4.0},
        {"name": "scale", "modality": "image", "factor": 4.0},
    ),
    "pai": ({"name": "pai", "alpha": 3.0}, {"name": "pai", "alpha": 3.0}),
}  # fmt: skip


def chosen_heads(model) -> list[list[int]]:
    """Unsorted, with a duplicate; in layers 1 and 2; under GQA heads of one KV group split
    between chosen and unchosen (Qwen2: 0 and 2 of KV head 0, 6 of KV head 1; MQA: 0, 2 and
    3, beside unchosen heads of the one KV head)."""
    last = model.config.num_attention_heads - 2
    return [[2, 1], [1, last], [1, 2], [2, 1], [1, 0]]


@pytest.mark.parametrize("case", list(RULE_CASES))
def test_rule_on_chosen_heads_equals_own_reference(model, case):
    section, rule = RULE_CASES[case]
    n_heads = model.config.num_attention_heads
    layers = [1, 2]
    heads = chosen_heads(model)
    inputs, modality = left_padded_batch(model.config.vocab_size)
    real = inputs["attention_mask"].bool()
    want = own_reference_logits(model, inputs, modality, rule, layers, {tuple(h) for h in heads})
    for impl in ("fused", "eager"):
        edit = configured(section | {"impl": impl, "heads": heads}, layers, n_heads)
        got = sysattn_logits(model, inputs, modality, edit)
        error = logit_error(got[real], want[real])
        assert error <= 1e-5, (impl, error)
    # Neither the rule on every head of its layers nor the baseline.
    every = sysattn_logits(model, inputs, modality, configured(section, layers, n_heads))
    baseline = sysattn_logits(model, inputs, modality, None)
    assert float((got[real] - every[real]).abs().max()) > 1e-4
    assert float((got[real] - baseline[real]).abs().max()) > 1e-4


def test_heads_outside_the_rules_layers_or_model_are_refused(model):
    n_heads = model.config.num_attention_heads
    section = {"name": "redistribute", "source": "system", "recipients": ["text"]}
    with pytest.raises(UsageError, match=r"\[0, 1\].*layer 0 is not edited"):
        configured(section | {"heads": [[1, 0], [0, 1]]}, [1, 2], n_heads)
    with pytest.raises(UsageError, match=rf"\[1, {n_heads}\].*{n_heads} query heads"):
        configured(section | {"heads": [[1, n_heads]]}, [1, 2], n_heads)


@pytest.mark.parametrize("case", ["proportional", "pai"])
def test_every_head_listed_equals_no_heads(model, case):
    section, _ = RULE_CASES[case]
    n_heads = model.config.num_attention_heads
    every = [[layer, h] for layer in (2, 1) for h in reversed(range(n_heads))]
    inputs, modality = left_padded_batch(model.config.vocab_size)
    real = inputs["attention_mask"].bool()
    listed = sysattn_logits(
        model, inputs, modality, configured(section | {"heads": every}, [1, 2], n_heads)
    )
    plain = sysattn_logits(model, inputs, modality, configured(section, [1, 2], n_heads))
    assert logit_error(listed[real], plain[real]) <= 1e-5


def greedy_with_cache(model, inputs, modality, edit, steps):
    """Greedy decoding through sysattn with a KV cache (one query row per step), as
    scoring.mode=generate decodes."""
    from transformers import DynamicCache

    use_sysattn(model)
    cache, mask, pos = DynamicCache(), inputs["attention_mask"], inputs["position_ids"]
    ids, tokens = inputs["input_ids"], []
    for _ in range(steps):
        with torch.no_grad():
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=pos, **{CACHE_ARG: cache},
                key_modality=modality, attention_edit=edit, use_cache=True,
            )  # fmt: skip
        token = out.logits[:, -1].argmax(-1)
        tokens.append(token)
        cache, ids = getattr(out, CACHE_ARG), token[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        modality = torch.cat([modality, torch.full_like(modality[:, :1], TEXT)], dim=1)
        pos = pos[:, -1:] + 1
    return torch.stack(tokens, dim=1), out.logits[:, -1]


def greedy_reference(model, inputs, modality, rule, layers, heads, steps):
    """The same by recomputing the whole sequence each step with the reference. PAI acts
    on the answer row of each step: every text row from the prompt's last on."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    tokens = []
    answer_from = modality.shape[1] - 1
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        STATE["pai_from"] = answer_from
        logits = own_reference_logits(model, batch, modality, rule, layers, heads)
        token = logits[:, -1].argmax(-1)
        tokens.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        modality = torch.cat([modality, torch.full_like(modality[:, :1], TEXT)], dim=1)
    return torch.stack(tokens, dim=1), logits[:, -1]


@pytest.mark.parametrize("case", ["proportional", "pai"])
def test_generation_with_chosen_heads_equals_own_reference(model, case):
    section, rule = RULE_CASES[case]
    n_heads = model.config.num_attention_heads
    heads = chosen_heads(model)
    edit = configured(section | {"heads": heads}, [1, 2], n_heads)
    inputs, modality = left_padded_batch(model.config.vocab_size)
    got, got_last = greedy_with_cache(model, inputs, modality, edit, steps=4)
    want, want_last = greedy_reference(
        model, inputs, modality, rule, [1, 2], {tuple(h) for h in heads}, steps=4
    )
    assert torch.equal(got, want)
    assert logit_error(got_last, want_last) <= 1e-5


def own_head_shares(weights: dict, modality) -> dict:
    """layer -> {queries -> (H, 4) mean shares (system, image, text, bos)}: the answer row
    (last real position) of every sequence, and every real text row, averaged; bos the weight
    on the sequence's first real position (after left padding)."""
    out = {}
    for layer, w in weights.items():  # (B, H, N, N)
        answer, text_rows = [], []
        for b in range(w.shape[0]):
            real = (modality[b] != PAD).nonzero()[:, 0]
            first, last = int(real[0]), int(real[-1])
            for qi in range(w.shape[2]):
                if modality[b, qi] != TEXT:
                    continue
                row = w[b, :, qi].double()  # (H, K)
                cols = [row[:, modality[b] == code].sum(-1) for code in (SYSTEM, IMAGE, TEXT)]
                shares = torch.stack([*cols, row[:, first]], dim=-1)
                text_rows.append(shares)
                if qi == last:
                    answer.append(shares)
        out[layer] = {
            "answer": torch.stack(answer).mean(0),
            "text_rows": torch.stack(text_rows).mean(0),
        }
    return out


def tool_profile(model, inputs, modality, edit):
    from sysattn_exp.attention.profile import AttentionProfile

    use_sysattn(model)
    profile = AttentionProfile()
    with torch.no_grad():
        model(**inputs, key_modality=modality, attention_edit=edit, attention_profile=profile)
    return profile


def assert_head_table_equals(table, own, n_kv):
    n_heads = next(iter(own.values()))["answer"].shape[0]
    assert len(table) == len(own) * 2 * n_heads
    for row in table.itertuples(index=False):
        want = own[row.layer][row.queries][row.head]
        got = torch.tensor([row.system, row.image, row.text, row.bos], dtype=torch.float64)
        assert float((got - want).abs().max()) <= 1e-5, (row, want)
        assert row.kv_head == row.head // (n_heads // n_kv)


def test_head_profile_equals_eager_output_attentions(model):
    inputs, modality = left_padded_batch(model.config.vocab_size)
    profile = tool_profile(model, inputs, modality, None)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        use_sysattn(model)
    own = own_head_shares(dict(enumerate(attentions)), modality)
    heads = profile.head_table()
    assert_head_table_equals(heads, own, model.config.num_key_value_heads)
    # n_queries: 3 answer rows, every real text row
    assert set(heads[heads.queries == "answer"].n_queries) == {3}
    assert set(heads[heads.queries == "text_rows"].n_queries) == {int((modality == TEXT).sum())}
    # The per-layer table is the mean over heads.
    layers = profile.table().set_index(["layer", "queries"])
    for (layer, queries), mean in (
        heads.groupby(["layer", "queries"])[["system", "image", "text", "bos"]].mean().iterrows()
    ):
        assert (layers.loc[(layer, queries), mean.index] - mean).abs().max() <= 1e-12
    # bos with left padding is the first real token, which takes attention (layer 1 is a
    # full-attention layer in every model here; Gemma 2's sliding layers 0 and 2 cannot see it)
    assert float(own[1]["answer"][:, 3].max()) > 0


@pytest.mark.parametrize("case", ["proportional", "uniform", "scale", "pai"])
def test_head_profile_under_chosen_heads_equals_own_reference(model, case):
    section, rule = RULE_CASES[case]
    n_heads = model.config.num_attention_heads
    heads = chosen_heads(model)
    edit = configured(section | {"heads": heads}, [1, 2], n_heads)
    inputs, modality = left_padded_batch(model.config.vocab_size)
    profile = tool_profile(model, inputs, modality, edit)
    STATE["record"] = {}
    record = STATE["record"]
    own_reference_logits(model, inputs, modality, rule, [1, 2], {tuple(h) for h in heads})
    own = own_head_shares(record, modality)
    assert_head_table_equals(profile.head_table(), own, model.config.num_key_value_heads)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """key(*overrides) of a system -> text job in Q4 of the tiny model (8 layers x 4
    heads) on POPE, as tests/test_job_keys.py computes keys; and a per-head profile."""
    import pandas as pd
    from test_job_keys import compose_job, key_of

    from sysattn_exp.models.loading import load_model

    path = tmp_path_factory.mktemp("keys") / "heads.csv"
    rows = [
        {"layer": layer, "head": h, "kv_head": h // 2, "queries": "answer", "n_queries": 5,
         "system": (4 * layer + h) / 40, "image": 0.1, "text": 0.1, "bos": 0.01}
        for layer in range(8) for h in range(4)
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(path, index=False)
    base = ["intervention=redistribute", "layers=q4"]
    loaded = load_model(compose_job("", "pope", base).model)

    def key(*overrides):
        return key_of(compose_job("", "pope", [*base, *overrides]), loaded, "pope")["key"]

    return key, path


def test_job_key_of_heads_is_the_chosen_pairs_not_their_spelling(keyed):
    key, _ = keyed
    plain, listed = key(), key("intervention.heads=[[6,1],[7,0]]")
    assert listed != plain
    assert key("intervention.heads=[[7,0],[6,1],[7,0]]") == listed  # same pairs, same job
    assert key("intervention.heads=[[6,2],[7,0]]") != listed


def test_every_head_selection_keeps_the_plain_rules_key(keyed):
    """+sweep=heads' top_k: null is the rule on every head (README): the plain rule's job."""
    key, path = keyed
    every = key(f"intervention.heads={{top_k: null, by: system, profile: {path}}}")
    assert every == key()
    top2 = key(f"intervention.heads={{top_k: 2, by: system, profile: {path}}}")
    assert top2 not in (key(), key(f"intervention.heads={{top_k: 2, by: bos, profile: {path}}}"))


def test_lens_and_probes_change_the_key(keyed):
    key, _ = keyed
    keys = {key(), key("runtime.lens=true"), key("runtime.lens=true", "runtime.probes=true")}
    assert len(keys) == 3
    assert key("runtime.lens=false", "runtime.probes=false") == key()


def heads_file(path, shares: dict, extra_layer_rows=True):
    """A per-head profile: (layer, head) -> (system, bos) on 'answer' rows, and text_rows
    rows whose shares would rank otherwise (they must be ignored)."""
    import pandas as pd

    rows = []
    for (layer, head), (system, bos) in shares.items():
        for queries, scale in (("answer", 1.0), ("text_rows", -1.0)):
            rows.append(
                {"layer": layer, "head": head, "kv_head": head // 2, "queries": queries,
                 "n_queries": 3, "system": scale * system, "image": 0.0, "text": 0.0,
                 "bos": scale * bos}
            )  # fmt: skip
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def own_top(shares: dict, k: int, by: int, layers) -> list[tuple[int, int]]:
    """Highest share first; ties: lower layer, then lower head."""
    pairs = [p for p in shares if p[0] in layers]
    return sorted(sorted(pairs, key=lambda p: (-shares[p][by], p))[:k])


def test_top_k_selection_ties_by_and_layers(tmp_path):
    from sysattn_exp.attention.rules import HeadSelection
    from sysattn_exp.experiment.conditions import top_heads

    shares = {(layer, head): (round(((3 * layer + 5 * head) % 4) / 4, 2), (head % 2) / 3)
              for layer in range(8) for head in range(4)}  # fmt: skip
    path = heads_file(tmp_path / "h.csv", shares)
    for k, by, layers in [(3, "system", range(6, 8)), (5, "bos", range(8)), (8, "system", [2])]:
        if k > 4 * len(layers):
            with pytest.raises(UsageError, match=rf"top_k={k}.*1\.\.{4 * len(layers)}"):
                top_heads(HeadSelection(k, by, str(path)), list(layers))
            continue
        got = top_heads(HeadSelection(k, by, str(path)), list(layers))
        assert list(got) == own_top(shares, k, 0 if by == "system" else 1, layers)


BAD_FILES = {
    "missing": None,
    "wrong columns": "a,b\n1,2\n",
    "empty": "",
    "per-layer table": "layer,queries,n_queries,system,bos\n0,answer,3,0.5,0.1\n",
    "not a csv": bytes(range(256)) * 4,
    "only text_rows": "layer,head,queries,system,bos\n7,0,text_rows,0.5,0.1\n",
}


@pytest.mark.parametrize("case", [*BAD_FILES, "top_k above the heads"])
def test_bad_profile_or_top_k_is_one_line_exit_2(tmp_path, monkeypatch, capsys, case):
    from cli import run_main_stderr

    path = tmp_path / "profile.csv"
    top_k = 3
    if case == "top_k above the heads":
        heads_file(path, {(layer, h): (0.1 * h, 0.0) for layer in range(8) for h in range(4)})
        top_k = 9  # Q4 of the tiny model: 2 layers x 4 heads
    elif isinstance(BAD_FILES[case], bytes):
        path.write_bytes(BAD_FILES[case])
    elif BAD_FILES[case] is not None:
        path.write_text(BAD_FILES[case])
    overrides = [
        "model=tiny", "benchmark=toy", "intervention=redistribute", "layers=q4",
        "runtime.dry_run=true", f"intervention.heads={{top_k: {top_k}, profile: {path}}}",
        f"tracking.uri=file://{tmp_path}/mlruns",
    ]  # fmt: skip
    code, err = run_main_stderr(overrides, tmp_path, monkeypatch, capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert "intervention.heads" in lines[0] and str(path) in lines[0]


LENS_QUESTIONS = ["Is the sky green today?", "Does a cat have four legs?", "Is ice hot?"]
LENS_SYSTEMS = [None, "Reply with yes or no."]


def lens_family(name: str):
    """A tiny text family with another seed; Gemma 2's final soft-capping made strong
    (cap 0.7: random logits are far above it, so a lens without the cap reads otherwise)."""
    from tiny_families import BUILDERS

    from sysattn_exp.models.loading import LoadedModel, tokenizer_of

    model, processor = BUILDERS[name](11)
    if name == "gemma2":
        model.config.final_logit_softcapping = 0.7
    use_sysattn(model)
    tokenizer_of(processor).padding_side = "left"
    return LoadedModel(model.eval(), processor, torch.device("cpu"), torch.float32)


def lens_readings(loaded, edit):
    from sysattn_exp.benchmarks.base import Benchmark, Item
    from sysattn_exp.evaluation.lens import LogitLens
    from sysattn_exp.evaluation.scoring import score_items
    from sysattn_exp.models.prompts import PromptFormat

    items = [Item(f"q{i}", f"g{i}", None, q, i % 2 == 0) for i, q in enumerate(LENS_QUESTIONS)]
    bench = Benchmark("lens", items, "{question}", lambda _: None)
    prompts = [
        PromptFormat(loaded.processor, LENS_SYSTEMS[i % 2]).render(q, False)
        for i, q in enumerate(LENS_QUESTIONS)
    ]
    lens = LogitLens(loaded)
    scores = score_items(loaded, bench, prompts, edit, LENS_WORDS, 2, 0, "test", lens=lens)
    return prompts, scores, lens.table().set_index(["item", "layer"]).sort_index()


LENS_WORDS = ([9, 12], [15])


@pytest.mark.parametrize("name", ["gemma2", "qwen2"])
@torch.no_grad()
def test_lens_equals_own_readout_of_output_hidden_states(name):
    loaded = lens_family(name)
    model, tok = loaded.model, loaded.tokenizer
    prompts, scores, table = lens_readings(loaded, None)
    depth = model.config.num_hidden_layers
    cap = model.config.final_logit_softcapping if name == "gemma2" else None
    assert len(table) == len(prompts) * depth
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        if tok.bos_token_id is not None and ids[0, 0] != tok.bos_token_id:
            ids = tok(prompt, return_tensors="pt").input_ids
        model.set_attn_implementation("eager")  # transformers' own, not this tool's
        try:
            with torch.no_grad():
                out = model(input_ids=ids, output_hidden_states=True)
        finally:
            use_sysattn(model)
        for layer in range(depth):
            if layer == depth - 1:
                logits = out.logits[0, -1].double()  # the model's own head, own cap
            else:
                h = out.hidden_states[layer + 1][0, -1].double()
                norm = model.model.norm
                var = h.pow(2).mean()
                eps = getattr(norm, "eps", None) or norm.variance_epsilon
                normed = h / torch.sqrt(var + eps)
                weight = norm.weight.double()
                normed = normed * (1 + weight) if name == "gemma2" else normed * weight
                logits = normed @ model.lm_head.weight.double().T
                if cap:
                    logits = torch.tanh(logits / cap) * cap
            yes, no = logits[LENS_WORDS[0]].logsumexp(0), logits[LENS_WORDS[1]].logsumexp(0)
            p_yes = logits.softmax(-1)[LENS_WORDS[0]].sum()
            got = table.loc[(i, layer)]
            assert got["log_odds"] == pytest.approx(float(yes - no), abs=1e-4), (i, layer)
            assert got["p_yes"] == pytest.approx(float(p_yes), abs=1e-5), (i, layer)
        last = table.loc[(i, depth - 1)]
        assert last["log_odds"] == pytest.approx(float(scores.yes[i] - scores.no[i]), abs=1e-6)
        assert last["p_yes"] == pytest.approx(float(scores.p_yes[i]), abs=1e-7)


def test_lens_before_the_rules_layers_equals_the_baseline():
    from sysattn_exp.attention.rules import Redistribution

    loaded = lens_family("qwen2")
    depth = loaded.model.config.num_hidden_layers
    edit = Redistribution("system", ("text",), frozenset({depth - 2, depth - 1}))
    _, _, base = lens_readings(loaded, None)
    _, _, ruled = lens_readings(loaded, edit)
    diff = (base["log_odds"] - ruled["log_odds"]).abs().groupby(level="layer").max()
    assert float(diff.loc[: depth - 3].max()) <= 1e-6
    assert float(diff.loc[depth - 2 :].min()) > 1e-4


def probe_data(tmp_path):
    """States (L=3, N, H=6) with the label weakly decodable from layer 1 on, groups of 2,
    3 and 4 items (NaturalBench's 2 x 2 among them) with mixed labels, in a LayerStates."""
    import numpy as np

    from sysattn_exp.evaluation.probes import LayerStates

    rng = np.random.default_rng(42)
    groups, labels = [], []
    for g, size in enumerate([2, 3, 4, 2, 2, 4, 3, 2, 2, 4, 2, 3, 2, 2]):
        groups += [f"g{g:02d}"] * size
        labels += [(g + i) % 2 == 0 for i in range(size)]
    labels, groups = np.array(labels), np.array(groups)
    n = len(labels)
    x = rng.normal(size=(3, n, 6)).astype(np.float32)
    x[1:, :, 0] += 1.5 * labels
    states = LayerStates(tmp_path / "s.npy", 3, n, 6)
    states.record(list(range(n)), torch.from_numpy(x))
    return states, x, labels, groups


def test_probe_accuracy_equals_own_grouped_cross_validation(tmp_path):
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold

    from sysattn_exp.evaluation.probes import probe_accuracy

    states, x, labels, groups = probe_data(tmp_path)
    table = probe_accuracy(states, labels, groups, samples=200, seed=0)
    folds = list(StratifiedGroupKFold(5, shuffle=True, random_state=0).split(x[0], labels, groups))
    for train, test in folds:  # never a group on both sides
        assert not set(groups[train]) & set(groups[test])
    for layer in range(3):
        correct = np.zeros(len(labels), bool)
        for train, test in folds:
            mean, std = x[layer, train].mean(0), x[layer, train].std(0)
            fit = LogisticRegression(C=1.0, max_iter=1000).fit(
                (x[layer, train] - mean) / std, labels[train]
            )
            correct[test] = fit.predict((x[layer, test] - mean) / std) == labels[test]
        row = table[table["layer"] == layer].iloc[0]
        assert row["accuracy"] == pytest.approx(correct.mean(), abs=1e-12), layer
        assert row["ci_low"] <= row["accuracy"] <= row["ci_high"]
        assert (row["n_items"], row["n_groups"], row["folds"]) == (len(labels), 14, 5)
    assert table.loc[2, "accuracy"] > table.loc[0, "accuracy"]


def test_separation_equals_own_cosine_distances(tmp_path):
    import numpy as np

    from sysattn_exp.evaluation.probes import minimal_pairs, pair_kinds, separation

    states, x, labels, groups = probe_data(tmp_path)
    pred = np.random.default_rng(1).random(len(labels)) < 0.6
    own_pairs = [
        (i, j)
        for i in range(len(labels))
        for j in range(i + 1, len(labels))
        if groups[i] == groups[j] and labels[i] != labels[j]
    ]
    pairs = minimal_pairs(labels, groups)
    assert sorted(map(tuple, pairs.tolist())) == own_pairs
    kinds = pair_kinds(pairs, pred, pred == labels)
    table, _ = separation(states, pairs, kinds, None)
    for layer in range(3):
        own: dict = {}
        for i, j in own_pairs:
            kind = (
                "yes_yes" if pred[i] and pred[j]
                else "right" if pred[i] == labels[i] and pred[j] == labels[j]
                else "other"
            )  # fmt: skip
            a, b = x[layer, i].astype(float), x[layer, j].astype(float)
            own.setdefault(kind, []).append(1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        for row in table[table["layer"] == layer].itertuples():
            values = own.get(row.pair_kind, [])
            assert row.n_pairs == len(values)
            if values:
                assert row.mean_distance == pytest.approx(np.mean(values), abs=1e-12)


def test_config_records_the_selection_and_the_chosen_pairs(keyed):
    from test_job_keys import WORDS, compose_job

    from sysattn_exp.experiment import identity
    from sysattn_exp.models.loading import load_model

    _, path = keyed
    selection = f"intervention.heads={{top_k: 3, by: system, profile: {path}}}"
    cfg = compose_job("", "pope", ["intervention=redistribute", "layers=q4", selection])
    loaded = load_model(cfg.model)
    edit = configured(OmegaConf.to_container(cfg.intervention), [6, 7], 4)
    config = identity.job_config(cfg, loaded, edit, WORDS, [6, 7], "x")
    # The highest system shares of layers 6-7 ((4 layer + head) / 40): 7.3, 7.2, 7.1.
    assert config["job"]["heads"] == [[7, 1], [7, 2], [7, 3]]
    assert config["intervention"]["heads"] == {"top_k": 3, "by": "system", "profile": str(path)}
    assert "top3 system heads" in config["job"]["label"]


def test_states_folder_is_removed_when_the_job_fails(tmp_path):
    from sysattn_exp.evaluation.probes import state_stores

    with pytest.raises(RuntimeError), state_stores(tmp_path, ["baseline"], 2, 3, 4) as stores:
        stores["baseline"].record([0, 1, 2], torch.ones(2, 3, 4))
        assert len(list(tmp_path.glob(".states-*"))) == 1
        raise RuntimeError("killed mid-job")
    assert not list(tmp_path.glob(".states-*"))


def test_capped_model_without_key_modality_runs_plain_attention():
    """A forward without key_modality or edit (PAI's guidance pass without the image:
    scoring.text_only_logits) on a soft-capped model takes the eager path, which must not
    need key_modality: the logits are transformers' own eager ones."""
    model = gemma2_capped()
    inputs, _ = left_padded_batch(model.config.vocab_size)
    real = inputs["attention_mask"].bool()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model(**inputs).logits
    use_sysattn(model)
    with torch.no_grad():
        got = model(**inputs).logits
    assert logit_error(got[real], want[real]) <= 1e-5
