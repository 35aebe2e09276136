"""The attention profile: shapes, shares that sum to 1, agreement with the loop reference's
weights (with and without an intervention), and the CLI's files and MLflow metrics."""

import mlflow
import pandas as pd
import pytest
import reference
import torch
import yaml
from cli import run_cli
from conftest import make_image
from figures import pixels, record_figures
from test_scoring import four_questions_per_image

from sysattn_exp.attention.profile import AttentionProfile, heatmap
from sysattn_exp.attention.rules import Redistribution
from sysattn_exp.evaluation.scoring import left_padded_position_ids, score_items
from sysattn_exp.models.loading import LoadedModel, use_sysattn
from sysattn_exp.models.prompts import build_prompt

MODALITIES = ["system", "image", "text"]


@pytest.fixture(scope="module")
def loaded(gqa_llava):
    model, processor = gqa_llava
    use_sysattn(model)
    return LoadedModel(model, processor, torch.device("cpu"), torch.float32)


def reference_shares(loaded, bench, prompts, rule) -> pd.DataFrame:
    """Per layer, the answer position's mean shares from the loop reference's weights."""
    model, processor = loaded.model, loaded.processor
    inputs = processor(
        images=[make_image(i.image_id) for i in bench.items],
        text=prompts,
        padding=True,
        return_tensors="pt",
    )
    reference.STATE["shares"] = {}
    reference.reference_setup(
        inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id, rule
    )
    model.set_attn_implementation(
        {"text_config": reference.REFERENCE_NAME, "vision_config": "sdpa"}
    )
    try:
        with torch.no_grad():
            model(**inputs, position_ids=left_padded_position_ids(inputs["attention_mask"]))
    finally:
        use_sysattn(model)
        shares = reference.STATE.pop("shares")
    return pd.DataFrame(
        [{"layer": layer} | pd.DataFrame(rows).mean().to_dict() for layer, rows in shares.items()]
    )


@pytest.mark.parametrize(
    "edit",
    [
        None,
        Redistribution("system", ("text",), frozenset({3, 4, 5})),
        Redistribution("image", ("system", "text"), frozenset({1}), fraction=0.5),
    ],
)
def test_profile_matches_reference_weights(loaded, edit):
    bench = four_questions_per_image()
    prompts = [
        build_prompt(i.question, "A chat between a user and an assistant.") for i in bench.items
    ]
    profile = AttentionProfile()
    score_items(loaded, bench, prompts, edit, ([10], [11]), 5, 0, "profile", profile=profile)
    table = profile.table()
    assert sorted(table["layer"].unique()) == list(range(6))
    assert set(table["queries"]) == {"answer", "text_rows"}
    assert (table[table.queries == "answer"]["n_queries"] == len(prompts)).all()
    assert torch.allclose(
        torch.tensor(table[MODALITIES].sum(axis=1).values),
        torch.ones(len(table), dtype=torch.float64),
        atol=1e-5,
    )
    rule = (
        None
        if edit is None
        else {
            "source": edit.source,
            "recipients": set(edit.recipients),
            "layers": edit.layers,
            "fraction": edit.fraction,
        }
    )
    want = reference_shares(loaded, bench, prompts, rule).set_index("layer").sort_index()
    got = table[table.queries == "answer"].set_index("layer")[MODALITIES].sort_index()
    assert torch.allclose(
        torch.tensor(got.values), torch.tensor(want[MODALITIES].values), atol=1e-5
    )
    if edit is not None and edit.fraction == 1:
        assert (got.loc[sorted(edit.layers), "system"] == 0).all()


def test_profile_after_a_baseline_through_the_cli(tmp_path, monkeypatch):
    """The natural order: a baseline, then a profile of the same model and benchmark into
    the same store. Same scores, but the profile is another job: logged, with its
    attn_share metrics (the layer as step), and its heatmap shows its table's shares."""
    common = ("model=tiny", "benchmark.limit=6")
    baseline = run_cli(*common, cwd=tmp_path)
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    result = run_cli(*common, "+task=profile", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not logged again" not in result.stderr
    job = max((tmp_path / "outputs" / "runs").iterdir())
    table = pd.read_csv(job / "attention_profile.csv")
    assert len(table) == 16
    assert f"Attention profile: {(job / 'attention_profile.png').resolve()}" in result.stdout
    answer = table[table.queries == "answer"].set_index("layer")
    # The job's plot is, pixel for pixel, heatmap() of its table: a layer x modality image
    # of the answer position's shares, each written in its cell.
    figures = record_figures(monkeypatch)
    name = yaml.safe_load((job / "config.yaml").read_text())["job"]["name"]
    title = f"{name}: share of the answer's attention"
    again = heatmap(table, tmp_path / "again.png", title)
    assert (pixels(again) == pixels(job / "attention_profile.png")).all()
    ((drawn,),) = figures.values()
    (image,) = drawn["images"]
    assert image == pytest.approx(answer[MODALITIES].to_numpy(), abs=1e-12)
    assert drawn["xticks"] == MODALITIES and drawn["yticks"] == [str(n) for n in range(8)]
    assert drawn["texts"] == [f"{v:.2f}" for v in answer[MODALITIES].to_numpy().ravel()]
    assert drawn["title"] == title and drawn["ylabel"] == "decoder layer"
    assert answer["system"].gt(0).all() and answer["n_queries"].eq(12).all()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["sysattn"], output_format="list")
    assert len(runs) == 2
    (profiled,) = [r for r in runs if "attn_share_system" in r.data.metrics]
    history = mlflow.MlflowClient().get_metric_history(profiled.info.run_id, "attn_share_system")
    assert sorted(m.step for m in history) == list(range(8))
    assert {m.step: m.value for m in history}[3] == pytest.approx(answer.loc[3, "system"])
