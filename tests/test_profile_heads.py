"""The per-head attention profile (the sink atlas): every query head's shares, and the
first position's (BOS), against transformers' own eager attention weights and against the
loop reference under each kind of rule, on a grouped-query model with left padding; the
per-layer table as the mean over heads; top_heads; and a profile job's files and MLflow run
(assert_sink_atlas_of_the_job, on the toy demo's profile job in test_first_hour)."""

import mlflow
import pandas as pd
import pytest
import reference
import torch
import yaml
from cli import read_metrics
from conftest import make_image
from figures import pixels, record_figures

from sysattn_exp.attention.profile import AttentionProfile, atlas, top_heads
from sysattn_exp.attention.rules import Pai, Redistribution, Scale
from sysattn_exp.errors import UsageError
from sysattn_exp.evaluation.scoring import encode_full_prompts
from sysattn_exp.models.loading import LoadedModel, use_sysattn
from sysattn_exp.models.prompts import build_prompt

MODALITIES = ["system", "image", "text"]
SHARES = [*MODALITIES, "bos"]
# Prompts of different lengths, so the batch is left padded differently per row.
PROMPTS = [
    ("Is there a red circle?", "A chat."),
    ("Is the circle in the middle of the picture blue or is it green?", ""),
    ("Red?", "A chat between a curious user and an artificial intelligence assistant."),
]
COLOURS = ["red", "blue", "green"]
LAYERS = frozenset({3, 4, 5})


@pytest.fixture(scope="module")
def loaded(gqa_llava):
    model, processor = gqa_llava
    use_sysattn(model)
    loaded = LoadedModel(model, processor, torch.device("cpu"), torch.float32)
    assert model.config.text_config.num_attention_heads == 6
    assert model.config.text_config.num_key_value_heads == 3  # grouped-query attention
    return loaded


@pytest.fixture(scope="module")
def batch(loaded):
    """(prompts, inputs, key_modality) of the left-padded batch."""
    prompts = [build_prompt(q, s) for q, s in PROMPTS]
    tokenizer = loaded.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        images = [make_image(c) for c in COLOURS]
        inputs, key_modality = encode_full_prompts(loaded, images, prompts)
    finally:
        tokenizer.padding_side = side
    mask = inputs["attention_mask"]
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all()  # left padding
    return prompts, inputs, key_modality


def profiled(loaded, inputs, key_modality, edit=None) -> AttentionProfile:
    profile = AttentionProfile()
    with torch.no_grad():
        loaded.model(
            **inputs, key_modality=key_modality, attention_edit=edit, attention_profile=profile
        )
    return profile


def loop_shares(attentions, names: list[list[str]]) -> pd.DataFrame:
    """Per (layer, head, queries), the mean over query rows of each share, read key by key
    from the (B, H, N, N) weights: the answer position (each row's last real position) and
    every text query; bos is the weight on the row's first real position."""
    sums, counts = {}, {}
    for layer, weights in enumerate(attentions):
        for b, row_names in enumerate(names):
            real = [i for i, n in enumerate(row_names) if n != "pad"]
            kinds = {"answer": [real[-1]], "text_rows": [i for i in real if row_names[i] == "text"]}
            for head in range(weights.shape[1]):
                for kind, queries in kinds.items():
                    for q in queries:
                        row = weights[b, head, q].tolist()
                        shares = [
                            sum(row[j] for j in real if row_names[j] == m) for m in MODALITIES
                        ]
                        key = (layer, head, kind)
                        old = sums.get(key, [0.0] * 4)
                        sums[key] = [
                            a + b for a, b in zip(old, [*shares, row[real[0]]], strict=True)
                        ]
                        counts[key] = counts.get(key, 0) + 1
    return pd.DataFrame(
        [
            {"layer": layer, "head": head, "queries": kind, "n_queries": counts[key]}
            | dict(zip(SHARES, [s / counts[key] for s in sums[key]], strict=True))
            for key in sorted(sums)
            for layer, head, kind in [key]
        ]
    )


def test_head_shares_equal_eager_attention_weights(loaded, batch):
    """No rule: every head's shares and BOS share equal those read from transformers' own
    eager attention (output_attentions), answer rows and text rows, to 1e-5."""
    prompts, inputs, key_modality = batch
    profile = profiled(loaded, inputs, key_modality)
    model = loaded.model
    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        use_sysattn(model)
    names = reference.row_modalities(
        inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id
    )
    want = loop_shares(attentions, names).set_index(["layer", "head", "queries"]).sort_index()
    got = profile.head_table().set_index(["layer", "head", "queries"]).sort_index()
    assert list(got.index) == list(want.index) and len(got) == 6 * 6 * 2
    assert (got["n_queries"] == want["n_queries"]).all()
    assert (got["kv_head"] == got.index.get_level_values("head") // 2).all()  # repeat_kv
    error = (got[SHARES] - want[SHARES]).abs().to_numpy().max()
    assert error <= 1e-5, error
    answer = got.xs("answer", level="queries")
    assert answer["bos"].gt(0).all() and (answer["bos"] <= answer["system"] + 1e-7).all()


@pytest.mark.parametrize(
    "edit,rule",
    [
        (
            Redistribution("system", ("text",), LAYERS),
            {"source": "system", "recipients": {"text"}, "layers": LAYERS},
        ),
        (  # the system span (BOS in it) receives, equally over its visible keys
            Redistribution("image", ("system", "text"), LAYERS, fraction=0.5, mode="uniform"),
            {
                "source": "image",
                "recipients": {"system", "text"},
                "layers": LAYERS,
                "fraction": 0.5,
                "mode": "uniform",
            },
        ),
        (Scale("system", 3.0, LAYERS), {"modality": "system", "factor": 3.0, "layers": LAYERS}),
        (Pai(0.5, LAYERS), {"alpha": 0.5, "layers": LAYERS}),
    ],
    ids=["system->text", "uniform", "scale", "pai"],
)
def test_head_shares_after_a_rule_equal_the_loop_reference(loaded, batch, edit, rule):
    """The answer position's per-head shares and BOS share after the rule equal the loop
    reference's weights (reference.py, key by key), to 1e-5."""
    prompts, inputs, key_modality = batch
    heads = profiled(loaded, inputs, key_modality, edit).head_table()
    model = loaded.model
    reference.STATE["shares"] = {}
    reference.reference_setup(
        inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id, rule
    )
    model.set_attn_implementation(
        {"text_config": reference.REFERENCE_NAME, "vision_config": "sdpa"}
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        use_sysattn(model)
        shares = reference.STATE.pop("shares")
    want = (
        pd.DataFrame([{"layer": layer} | row for layer, rows in shares.items() for row in rows])
        .groupby(["layer", "head"])[SHARES]
        .mean()
    )
    got = heads[heads["queries"] == "answer"].set_index(["layer", "head"]).sort_index()
    assert list(got.index) == list(want.index)
    error = (got[SHARES] - want[SHARES]).abs().to_numpy().max()
    assert error <= 1e-5, error
    if isinstance(edit, Redistribution) and edit.source == "system":
        assert (got.loc[sorted(LAYERS), ["system", "bos"]] == 0).all().all()


def test_layer_table_is_the_mean_over_heads(loaded, batch):
    prompts, inputs, key_modality = batch
    profile = profiled(loaded, inputs, key_modality, Redistribution("image", ("text",), LAYERS))
    heads, layers = profile.head_table(), profile.table()
    assert list(layers.columns) == ["layer", "queries", "n_queries", *SHARES]
    mean = heads.groupby(["layer", "queries"])[SHARES].mean()
    layers = layers.set_index(["layer", "queries"]).sort_index()
    assert list(layers.index) == list(mean.index)
    assert ((layers[SHARES] - mean[SHARES]).abs().to_numpy() <= 1e-6).all()
    by_head = heads.groupby(["layer", "queries"])["n_queries"]
    assert (by_head.nunique() == 1).all() and (by_head.first() == layers["n_queries"]).all()


def head_file(tmp_path, shares: dict[tuple[int, int], tuple[float, float]]):
    """An attention_profile_heads.csv with these answer (system, bos) shares per head, and
    text-row shares that would rank the heads the other way round."""
    rows = [
        {"layer": layer, "head": head, "kv_head": head, "queries": kind, "n_queries": 3}
        | {"system": s if kind == "answer" else 1 - s, "image": 0.0, "text": 0.0}
        | {"bos": b if kind == "answer" else 1 - b}
        for (layer, head), (s, b) in shares.items()
        for kind in ("answer", "text_rows")
    ]
    path = tmp_path / "attention_profile_heads.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_top_heads_ranks_the_answer_rows(tmp_path):
    path = head_file(
        tmp_path,
        {(0, 0): (0.9, 0.1), (0, 1): (0.5, 0.7), (1, 0): (0.5, 0.2), (1, 1): (0.95, 0.05)},
    )
    assert top_heads(path, 2) == [(1, 1), (0, 0)]
    assert top_heads(path, 3, by="system") == [(1, 1), (0, 0), (0, 1)]  # tie: lower layer
    assert top_heads(str(path), 4, by="bos") == [(0, 1), (1, 0), (0, 0), (1, 1)]
    assert all(isinstance(n, int) for pair in top_heads(path, 4) for n in pair)


def test_top_heads_refuses_bad_files_and_k(tmp_path):
    path = head_file(tmp_path, {(0, 0): (0.9, 0.1), (0, 1): (0.5, 0.7)})
    layer_table = tmp_path / "attention_profile.csv"
    pd.DataFrame(
        [{"layer": 0, "queries": "answer", "n_queries": 3, "system": 1, "image": 0, "text": 0}]
    ).to_csv(layer_table, index=False)
    no_answer = tmp_path / "text_rows_only.csv"
    frame = pd.read_csv(path)
    frame[frame["queries"] == "text_rows"].to_csv(no_answer, index=False)
    cases = [
        (layer_table, 1, "system", f"{layer_table} has no per-head profile rows"),
        (no_answer, 1, "system", f"{no_answer} has no per-head profile rows"),
        (tmp_path / "missing.csv", 1, "system", f"{tmp_path / 'missing.csv'}: cannot read"),
        (path, 3, "system", f"top_k=3 must be an integer in 1..2, the heads in {path}"),
        (path, 0, "bos", "top_k=0 must be an integer in 1..2"),
        (path, 1, "image", "top heads by='image' is unknown; allowed: system, bos"),
    ]
    for file, k, by, message in cases:
        with pytest.raises(UsageError) as error:
            top_heads(file, k, by=by)
        assert message in str(error.value) and "\n" not in str(error.value)


def test_atlas_draws_each_share_by_layer_and_head(loaded, batch, tmp_path, monkeypatch):
    prompts, inputs, key_modality = batch
    heads = profiled(loaded, inputs, key_modality).head_table()
    figures = record_figures(monkeypatch)
    atlas(heads, tmp_path / "atlas.png", "gqa: sink atlas")
    panels = figures["atlas.png"]
    assert [p["title"] for p in panels] == SHARES
    answer = heads[heads["queries"] == "answer"]
    for drawn, name in zip(panels, SHARES, strict=True):
        (image,) = drawn["images"]
        want = answer.pivot(index="layer", columns="head", values=name).to_numpy()
        assert image == pytest.approx(want, abs=1e-12)
        assert drawn["xlabel"] == "head" and drawn["yticks"] == [str(n) for n in range(6)]
    assert panels[0]["ylabel"] == "decoder layer"


def assert_sink_atlas_of_the_job(job, stdout: str, run) -> None:
    """A +task=profile job's per-head files (test_first_hour runs the toy demo's profile
    job once for its own checks and these): the per-head table, whose mean over heads is
    the per-layer table; the atlas, which is atlas() of that table and whose path is
    printed; both logged to the job's MLflow `run` with the per-layer files, and the
    per-layer bos shares as attn_share_bos."""
    heads = pd.read_csv(job / "attention_profile_heads.csv")
    layers = pd.read_csv(job / "attention_profile.csv")
    assert list(heads.columns) == [
        "layer", "head", "kv_head", "queries", "n_queries", *SHARES,
    ]  # fmt: skip
    assert len(heads) == len(layers) * heads["head"].nunique()
    mean = heads.groupby(["layer", "queries"])[SHARES].mean()
    layers = layers.set_index(["layer", "queries"]).sort_index()
    assert ((layers[SHARES] - mean[SHARES]).abs().to_numpy() <= 1e-6).all()
    n_items = read_metrics(job)["n_items"]
    assert (heads[heads["queries"] == "answer"]["n_queries"] == n_items).all()
    atlas_path = (job / "attention_profile_heads.png").resolve()
    assert f"Sink atlas (by head): {atlas_path}" in stdout
    name = yaml.safe_load((job / "config.yaml").read_text())["job"]["name"]
    again = atlas(
        heads, job.parent / "again.png", f"{name}: share of the answer's attention by head"
    )
    assert (pixels(again) == pixels(atlas_path)).all()
    assert len(top_heads(job / "attention_profile_heads.csv", 3, by="bos")) == 3
    client = mlflow.MlflowClient()
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "attention_profile.csv",
        "attention_profile.png",
        "attention_profile_heads.csv",
        "attention_profile_heads.png",
    } <= logged
    history = client.get_metric_history(run.info.run_id, "attn_share_bos")
    bos = layers.xs("answer", level="queries")["bos"]
    assert {m.step: m.value for m in history} == pytest.approx(bos.to_dict())
