"""Head-selective interventions (intervention.heads): every rule on chosen (layer, head)
pairs only equals the loop reference that edits exactly those heads (tests/reference.py),
on the fused and eager paths, under grouped-query attention and left padding, to 1e-5 in
float32; its profile records the chosen heads' shares after the rule; the config's heads
are checked (one line, exit 2) and resolved from a per-head profile by top_k; the job key
changes only when heads are given."""

import json

import pandas as pd
import pytest
import reference
import torch
import yaml
from cli import run_cli, run_main_stderr
from paths import IMPL_PATHS
from test_intervention_exact import padded_batch, reference_logits, sysattn_logits  # noqa: F401

from sysattn_exp.attention.intervention import sysattn_attention
from sysattn_exp.attention.profile import AttentionProfile
from sysattn_exp.attention.rules import Pai, Redistribution, Scale
from sysattn_exp.errors import UsageError
from sysattn_exp.evaluation.scoring import left_padded_position_ids
from sysattn_exp.experiment.conditions import build_edit, intervention_rule
from sysattn_exp.experiment.tracking import DRY_RUN_FILE
from sysattn_exp.models.loading import use_sysattn

# gqa_llava: 6 layers, 6 query heads over 3 KV heads. Heads 0 and 1 share KV head 0, 4 and
# 5 KV head 2; layer 5 keeps every head plain although it is an edited layer.
HEADS = ((3, 0), (3, 5), (4, 1), (4, 2))
LAYERS = frozenset({3, 4, 5})

RULES = {
    "system->text": (
        lambda impl: Redistribution("system", ("text",), LAYERS, impl, heads=HEADS),
        {"source": "system", "recipients": {"text"}},
    ),
    "system->image+text dose": (
        lambda impl: Redistribution(
            "system", ("image", "text"), LAYERS, impl, fraction=0.6, heads=HEADS
        ),
        {"source": "system", "recipients": {"image", "text"}, "fraction": 0.6},
    ),
    "image->system uniform": (
        lambda impl: Redistribution(
            "image", ("system",), LAYERS, impl, mode="uniform", heads=HEADS
        ),
        {"source": "image", "recipients": {"system"}, "mode": "uniform"},
    ),
    "scale": (
        lambda impl: Scale("image", 3.0, LAYERS, impl, heads=HEADS),
        {"modality": "image", "factor": 3.0},
    ),
    "pai": (lambda impl: Pai(20.0, LAYERS, impl, heads=HEADS), {"alpha": 20.0}),
}


@pytest.mark.parametrize("impl,path", IMPL_PATHS)
@pytest.mark.parametrize("name", list(RULES))
def test_rule_on_chosen_heads_matches_reference(gqa_llava, padded_batch, name, impl, path):  # noqa: F811
    model, _ = gqa_llava
    make, rule = RULES[name]
    real = padded_batch["attention_mask"].bool()
    got = sysattn_logits(model, padded_batch, make(impl))
    rule = rule | {"layers": LAYERS, "heads": set(HEADS)}
    want = reference_logits(model, padded_batch, rule)
    error = (got[real] - want[real]).abs().max()
    assert error <= 1e-5, error
    # Neither the baseline nor the rule on every head of the layers.
    every = reference_logits(model, padded_batch, {k: v for k, v in rule.items() if k != "heads"})
    baseline = sysattn_logits(model, padded_batch, None)
    assert (got[real] - every[real]).abs().max() > 1e-5
    assert (got[real] - baseline[real]).abs().max() > 1e-5


def test_every_head_listed_is_the_rule_on_every_head(gqa_llava, padded_batch):  # noqa: F811
    model, _ = gqa_llava
    real = padded_batch["attention_mask"].bool()
    every = tuple((layer, head) for layer in sorted(LAYERS) for head in range(6))
    listed = Redistribution("system", ("text",), LAYERS, heads=every)
    whole = Redistribution("system", ("text",), LAYERS)
    got, want = (
        sysattn_logits(model, padded_batch, listed),
        sysattn_logits(model, padded_batch, whole),
    )
    assert (got[real] - want[real]).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "rule", [{"source": "system", "recipients": {"text"}}, {"modality": "image", "factor": 2.0}]
)
def test_chosen_heads_with_attention_sinks(rule):
    """The eager path (soft-capping, GPT-OSS sinks) edits only the chosen heads, each with
    its own sink logit: the chosen heads equal the same call on every head, the others
    the call without a rule."""
    torch.manual_seed(5)
    names = ["system"] * 5 + ["image"] * 9 + ["text"] * 6
    codes = {"system": 1, "image": 2, "text": 3}
    key_modality = torch.tensor([[codes[n] for n in names]] * 2)
    q, k, v = torch.randn(2, 4, 20, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    sinks = torch.randn(4)
    mask = torch.ones(20, 20, dtype=torch.bool).tril()[None, None].expand(2, 1, 20, 20)
    module = type("Module", (), {"layer_idx": 0})()
    if "factor" in rule:
        make = lambda heads: Scale("image", 2.0, frozenset({0}), heads=heads)  # noqa: E731
    else:
        make = lambda heads: Redistribution("system", ("text",), frozenset({0}), heads=heads)  # noqa: E731

    def call(edit):
        out, _ = sysattn_attention(
            module, q, k, v, mask, 0.3, attention_edit=edit, key_modality=key_modality, s_aux=sinks
        )
        return out  # (B, Q, H, D)

    chosen = call(make(((0, 1), (0, 2))))
    every, plain = call(make(None)), call(None)
    assert torch.allclose(chosen[:, :, [1, 2]], every[:, :, [1, 2]], atol=1e-6)
    assert torch.allclose(chosen[:, :, [0, 3]], plain[:, :, [0, 3]], atol=1e-6)
    assert (every - plain).abs().max() > 1e-3


def test_profile_records_the_chosen_heads_after_the_rule(gqa_llava, padded_batch):  # noqa: F811
    """The answer position's shares per layer, averaged over heads and rows: the chosen
    heads' after the rule, the others' plain (the reference, edit by edit)."""
    model, _ = gqa_llava
    inputs = padded_batch
    use_sysattn(model)
    from sysattn_exp.attention.modality import modality_ids

    key_modality = modality_ids(
        inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id
    )

    def profiled(edit):
        profile = AttentionProfile()
        with torch.no_grad():
            model(
                **inputs,
                position_ids=left_padded_position_ids(inputs["attention_mask"]),
                key_modality=key_modality,
                attention_edit=edit,
                attention_profile=profile,
            )
        heads = profile.head_table()
        table = profile.table()
        answer = table[table["queries"] == "answer"].set_index("layer")
        return answer, heads[heads["queries"] == "answer"].set_index(["layer", "head"])

    edit = Redistribution("system", ("image", "text"), LAYERS, fraction=0.5, heads=HEADS)
    answer, by_head = profiled(edit)
    plain, _ = profiled(None)
    reference.STATE["shares"] = {}
    try:
        rule = {"source": "system", "recipients": {"image", "text"}, "fraction": 0.5}
        reference_logits(model, inputs, rule | {"layers": LAYERS, "heads": set(HEADS)})
        shares = reference.STATE["shares"]
    finally:
        reference.STATE.pop("shares", None)
    for layer, rows in shares.items():
        for name in ("system", "image", "text"):
            want = sum(row[name] for row in rows) / len(rows)
            assert answer.loc[layer, name] == pytest.approx(want, abs=1e-5)
        for head in range(6):  # each head's shares, the first position's (bos) included
            mine = [row for row in rows if row["head"] == head]
            for name in ("system", "image", "text", "bos"):
                want = sum(row[name] for row in mine) / len(mine)
                assert by_head.loc[(layer, head), name] == pytest.approx(want, abs=1e-5)
    # Layer 3 moves half the system mass of 2 of its 6 heads: the other 4 keep theirs.
    assert 0 < answer.loc[3, "system"] < plain.loc[3, "system"]
    # Layers before the first edited one see the plain model's states.
    assert answer.loc[2, "system"] == pytest.approx(plain.loc[2, "system"], abs=1e-6)


def per_head_profile(path, rows):
    table = pd.DataFrame(rows, columns=["layer", "head", "system", "bos"])
    table["queries"] = "answer"
    text_rows = table.assign(queries="text_rows", system=1.0, bos=1.0)  # must be ignored
    pd.concat([table, text_rows]).to_csv(path, index=False)
    return path


def section(heads, name="redistribute"):
    from omegaconf import OmegaConf

    base = {"name": name, "source": "system", "recipients": ["text"]}
    if name == "scale":
        base = {"name": "scale", "modality": "image", "factor": 2.0}
    return OmegaConf.create(base | {"heads": heads})


def test_top_k_picks_the_highest_shares_in_the_edited_layers(tmp_path):
    rng = torch.Generator().manual_seed(0)
    values = torch.rand(8 * 4, generator=rng).tolist()
    rows = [(layer, head, values[4 * layer + head], 1 - values[4 * layer + head])
            for layer in range(8) for head in range(4)]  # fmt: skip
    path = per_head_profile(tmp_path / "heads.csv", rows)
    layers = [4, 5, 6, 7]
    for by in ("system", "bos"):
        rule = intervention_rule(section({"top_k": 3, "by": by, "profile": str(path)}))
        edit = build_edit(rule, layers, n_heads=4)
        score = {(at, h): (s if by == "system" else b) for at, h, s, b in rows if at in layers}
        want = sorted(sorted(score, key=score.get, reverse=True)[:3])
        assert list(edit.heads) == want
        assert edit.head_selection == f"top3 {by}"
        assert edit.describe() == f"system->text top3 {by} heads"


@pytest.mark.parametrize(
    "heads,match",
    [
        ([[5, 9]], r"has \[5, 9\], but the model has 4 query heads per layer; allowed heads 0-3"),
        ([[1, 0]], r"has \[1, 0\], but layer 1 is not edited; the edited layers are 4-7"),
        (
            {"top_k": 17, "by": "system", "profile": "P"},
            r"top_k=17 must be an integer in 1..16, the heads of layers 4-7 in ",
        ),
        (
            {"top_k": 2, "by": "system", "profile": "missing.csv"},
            r"missing.csv: cannot read a per-head profile",
        ),
        ({"top_k": 2, "by": "system", "profile": "NOHEADS"}, "has no per-head profile rows"),
    ],
)
def test_heads_outside_the_model_are_refused(tmp_path, heads, match):
    rows = [(layer, head, 0.5, 0.5) for layer in range(8) for head in range(4)]
    path = per_head_profile(tmp_path / "heads.csv", rows)
    (tmp_path / "layers.csv").write_text("layer,queries,system,image,text\n0,answer,1,0,0\n")
    files = {"P": path, "NOHEADS": tmp_path / "layers.csv"}
    if isinstance(heads, dict):
        heads = heads | {"profile": str(files.get(heads["profile"], tmp_path / heads["profile"]))}
    rule = intervention_rule(section(heads))
    with pytest.raises(UsageError, match=match):
        build_edit(rule, [4, 5, 6, 7], n_heads=4)


@pytest.mark.parametrize(
    "heads,match",
    [
        ("3", "intervention.heads='3'; allowed: null, a list"),
        ([[3]], r"has \[3\]: each entry is a \[layer, head\] pair"),
        ([[3, -1]], "pair of integers >= 0"),
        ([], "empty list"),
        ({"top_k": 0, "profile": "x.csv"}, r"top_k=0 must be an integer >= 1"),
        (
            {"top_k": 2, "by": "sink", "profile": "x.csv"},
            "by='sink' is unknown; allowed: system, bos",
        ),
        (
            {"top_k": 2, "profile": "x.csv", "k": 1},
            r"heads.k is unknown; allowed: top_k, by, profile",
        ),
        ({"top_k": 2}, "heads.profile must be the path"),
    ],
)
def test_bad_heads_config_is_one_line(heads, match):
    with pytest.raises(UsageError, match=match):
        intervention_rule(section(heads))


def test_heads_pairs_are_sorted_and_deduplicated():
    rule = intervention_rule(section([[5, 1], [4, 3], [5, 1]], name="scale"))
    edit = build_edit(rule, [4, 5], n_heads=4)
    assert edit.heads == ((4, 3), (5, 1)) and edit.heads_in(5) == [1] and edit.heads_in(4) == [3]
    assert edit.describe() == "imagex2 heads 4.3,5.1"
    assert build_edit(intervention_rule(section(None)), [4, 5], 4).heads_in(4) is None


def test_cli_heads_job_and_its_key(tmp_path, monkeypatch, capsys):
    """Through the CLI on the toy model: a head-selective job runs, writes the chosen heads
    to config.yaml and has its own job key; the same rule without heads keeps the key it
    had before heads existed (tests/test_job_keys.py); bad heads are one line, exit 2."""
    common = ["model=toy", "benchmark=toy", "intervention=redistribute", "layers=q4"]
    common += ["runtime.num_workers=0", f"tracking.uri=file://{tmp_path}/mlruns"]
    code, err = run_main_stderr(
        [*common, "intervention.heads=[[2,1]]"], tmp_path, monkeypatch, capsys
    )
    assert code == 2 and err.count("\n") == 1, err
    assert "layer 2 is not edited; the edited layers are 3-3" in err
    result = run_cli(
        *common, "intervention.heads=[[3,1],[3,3]]", "hydra.run.dir=heads", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = yaml.safe_load((tmp_path / "heads" / "config.yaml").read_text())
    assert config["job"]["heads"] == [[3, 1], [3, 3]]
    assert config["job"]["name"] == "toy system->text heads 3.1,3.3 layers 3-3"
    metrics = json.loads((tmp_path / "heads" / "metrics.json").read_text())
    assert metrics["edited_layers"] == 1
    whole = run_cli(*common, "hydra.run.dir=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    key = yaml.safe_load((tmp_path / "whole" / "config.yaml").read_text())["job"]["key"]
    assert key != config["job"]["key"]
    assert "heads" not in yaml.safe_load((tmp_path / "whole" / "config.yaml").read_text())["job"]


def test_heads_sweep_grid_in_a_dry_run(tmp_path):
    """+sweep=heads (top_k 1, 4, null = every head; x system -> text, image; x q4, all) as
    a dry run on the tiny model (8 layers of 4 heads: its Q4 has 8 heads, too few for the
    shipped K = 16 and 64, so K is overridden): every job resolves its heads from the
    profile, and a job without the profile is one line."""
    rows = [(layer, head, (7 * layer + 3 * head) % 11 / 10, 0.1) for layer in range(8)
            for head in range(4)]  # fmt: skip
    path = per_head_profile(tmp_path / "heads.csv", rows)
    result = run_cli(
        "+sweep=heads", "model=tiny", "benchmark=toy", "runtime.dry_run=true",
        f"intervention.heads.profile={path}",
        "intervention.heads.top_k=1,4,null",
        f"tracking.uri=file://{tmp_path}/mlruns", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("dry run job")]
    names = sorted(line.split(": ")[1].split(" on builtin")[0] for line in lines)
    assert len(names) == 12
    for label in ("layers 6-7", "layers 0-7"):
        for recipient in ("text", "image"):
            for k in (1, 4):
                assert f"toy system->{recipient} top{k} system heads {label}" in names
            assert f"toy system->{recipient} {label}" in names
    # Each job's heads (DRY_RUN_FILE) are the K highest system shares of its layers.
    share = {(layer, head): system for layer, head, system, _ in rows}
    (sweep_dir,) = (tmp_path / "outputs" / "multiruns").iterdir()
    for job in sweep_dir.glob("job*"):
        summary = json.loads((job / DRY_RUN_FILE).read_text())
        k = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["intervention"]["heads"][
            "top_k"
        ]
        if k is None:
            assert "heads" not in summary
            continue
        candidates = [pair for pair in share if pair[0] in summary["layers"]]
        ranked = sorted(candidates, key=lambda pair: (-share[pair], pair))
        assert summary["heads"] == [list(pair) for pair in sorted(ranked[:k])]
    missing = run_cli(
        "+sweep=heads", "model=tiny", "benchmark=toy", "runtime.dry_run=true", cwd=tmp_path
    )
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert "intervention.heads.profile" in missing.stderr
