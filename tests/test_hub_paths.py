"""Every benchmark's hub path, through the loaders and through the real command line, on
datasets with the hub's exact features at their published sizes (tests/hub_fixtures.py).
Only the boundary is replaced: `datasets.load_dataset`, and the hub metadata call is
skipped by HF_HUB_OFFLINE as it is for a user with a cached copy."""

import json
from collections import Counter
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
from benchmark_fixtures import BEAF_ORIGINAL, SHARED, needs_shared
from cli import read_metrics, run_main
from hub_fixtures import MME_IMAGES, POPE_IMAGES, fake_load_dataset, hub, naturalbench
from test_benchmark_loaders import benchmark_cfg, groups_of

from sysattn_exp.benchmarks import load_benchmark
from sysattn_exp.errors import UsageError

BEAF_HUB = "benchmark.hub_id=MM-Hallu/BEAF"


@pytest.fixture(scope="session")
def repos():
    return hub()


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory):
    """One MLflow SQLite store for every CLI run here: creating one costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlruns.db"


@pytest.fixture
def on_hub(repos, monkeypatch):
    """The hub serves `repos`; nothing else is reachable."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset(repos))
    return repos


def pair_key(r: dict) -> str:
    return f"{r['category']}_{r['subcategory']}_{r['set_id']}_{r['question_id']}"


def test_mme_hub_counts(on_hub):
    bench = load_benchmark(benchmark_cfg("benchmark=mme"))
    groups = groups_of(bench)
    assert len(bench.items) == 2374 and len(groups) == 1187
    assert all([i.label for i in g] == [True, False] for g in groups.values())
    per_category = Counter(i.meta["category"] for i in bench.items)
    assert per_category == {c: 2 * n for c, n in MME_IMAGES.items()}
    assert bench.items[0].group_id == "existence/0000.png"
    assert bench.load_image(bench.items[-1].image_id).mode == "RGB"


@needs_shared
def test_hallusionbench_hub_counts_include_no_image_questions(on_hub):
    records = json.loads((SHARED / "hallusionbench" / "HallusionBench.json").read_text())
    bench = load_benchmark(benchmark_cfg("benchmark=hallusionbench"))
    no_image = [i for i in bench.items if i.image_id is None]
    assert len(bench.items) == 1129 and len(no_image) == 178
    assert bench.load_counts["n_no_image_items"] == 178
    assert len(groups_of(bench)) == len({pair_key(r) for r in records})
    # The no-image questions join their pairs: a pair holds them and the figures' questions.
    assert {i.group_id for i in no_image} <= {i.group_id for i in bench.items if i.image_id}
    assert all(i.meta["figure_key"] is None for i in no_image)
    assert sum(i.label for i in bench.items) == sum(r["gt_answer"] == "1" for r in records)
    with_image = next(i for i in bench.items if i.image_id)
    assert bench.load_image(with_image.image_id).mode == "RGB"


def test_naturalbench_hub_counts(on_hub):
    bench = load_benchmark(benchmark_cfg("benchmark=naturalbench"))
    assert len(bench.items) == 4 * 1600 and len(groups_of(bench)) == 1600
    assert bench.load_counts["n_multiple_choice_excluded"] == 300
    labels = {i.item_id: i.label for i in bench.items}
    assert [labels[f"300/q{j}_i{k}"] for j, k in ((0, 0), (0, 1), (1, 0), (1, 1))] == [
        True,
        False,
        False,
        True,
    ]


def test_naturalbench_older_type_column(on_hub, monkeypatch):
    import datasets

    old = {"BaiqiL/NaturalBench": naturalbench(8, 2, type_column="Question Type")}
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset(old))
    bench = load_benchmark(benchmark_cfg("benchmark=naturalbench"))
    assert len(bench.items) == 4 * 6 and bench.load_counts["n_multiple_choice_excluded"] == 2


def test_winoground_hub_counts(on_hub):
    bench = load_benchmark(benchmark_cfg("benchmark=winoground"))
    assert len(bench.items) == 1600 and len(groups_of(bench)) == 400
    assert all(i.label == (i.meta["caption_index"] == i.meta["image_index"]) for i in bench.items)


@needs_shared
def test_sugarcrepe_hub_counts(on_hub):
    sizes = {f.stem: len(json.loads(f.read_text())) for f in (SHARED / "sugarcrepe").glob("*.json")}
    bench = load_benchmark(benchmark_cfg("benchmark=sugarcrepe"))
    assert len(bench.items) == 2 * 7511 and len(groups_of(bench)) == 7511
    assert Counter(i.meta["subset"] for i in bench.items) == {k: 2 * v for k, v in sizes.items()}
    first = json.loads((SHARED / "sugarcrepe" / "add_att.json").read_text())
    record = next(iter(first.values()))
    positive, negative = (i for i in bench.items if i.group_id == "add_att/0")
    assert (positive.question, positive.label) == (record["caption"], True)
    assert (negative.question, negative.label) == (record["negative_caption"], False)


def test_beaf_hub_mirror(on_hub):
    bench = load_benchmark(benchmark_cfg("benchmark=beaf", BEAF_HUB))
    groups = groups_of(bench)
    assert len(bench.items) == 9 and len(groups) == 3
    assert all(g.startswith(f"{BEAF_ORIGINAL}/") for g in groups)
    assert bench.items[3].image_id == f"{BEAF_ORIGINAL}_00.png"


def test_beaf_hub_mirror_needs_release_file_names(on_hub, monkeypatch, repos):
    import datasets

    renamed = repos["MM-Hallu/BEAF"]["train"].map(
        lambda r: (
            {"image_name": r["image_name"].replace(BEAF_ORIGINAL, "img")}
            if not r["orig_img"]
            else r
        )
    )
    monkeypatch.setattr(
        datasets, "load_dataset", fake_load_dataset({"MM-Hallu/BEAF": {"train": renamed}})
    )
    with pytest.raises(UsageError, match="'img_00.png' has no original image 'img'"):
        load_benchmark(benchmark_cfg("benchmark=beaf", BEAF_HUB))


def test_pope_hub_counts(on_hub):
    bench = load_benchmark(benchmark_cfg("benchmark=pope"))
    groups = groups_of(bench)
    # 3 splits x 3,000 questions; a group is one image's 6 questions within a split.
    assert len(bench.items) == 9000 and len({i.item_id for i in bench.items}) == 9000
    assert len(groups) == 3 * POPE_IMAGES and all(len(g) == 6 for g in groups.values())
    splits = Counter(i.meta["split"] for i in bench.items)
    assert splits == {"random": 3000, "popular": 3000, "adversarial": 3000}
    assert Counter(i.meta["split"] for i in bench.items if i.label) == {s: 1500 for s in splits}
    assert len({i.image_id for i in bench.items}) == POPE_IMAGES  # the splits share images
    # In benchmark.subsets order (random first), although the hub has adversarial first.
    assert bench.items[0].item_id == "random/1" and bench.items[-1].item_id == "adversarial/3000"
    assert bench.load_image(bench.items[-1].image_id).mode == "RGB"
    one = load_benchmark(benchmark_cfg("benchmark=pope", "benchmark.subsets=[popular]"))
    assert len(one.items) == 3000 and {i.meta["split"] for i in one.items} == {"popular"}


# name: (overrides, expected items): two groups of each benchmark through the whole CLI.
CLI_CASES = {
    "mme": ([], 4),
    # With an intervention: the no-image prompts go through it too.
    "hallusionbench": (["intervention=redistribute", "layers=q4"], None),
    "naturalbench": ([], 8),
    "winoground": ([], 8),
    "sugarcrepe": (["benchmark.subsets=[swap_obj]"], 4),
    "beaf": ([BEAF_HUB], 6),
    "pope": ([], 12),
}


FROM_SHARED = {"hallusionbench", "sugarcrepe"}  # built from the real annotation files


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=needs_shared) if n in FROM_SHARED else n for n in CLI_CASES]
)
def test_hub_path_through_cli(on_hub, tracking_uri, tmp_path, monkeypatch, name):
    overrides, expected = CLI_CASES[name]
    status = run_main(
        tmp_path,
        monkeypatch,
        "model=tiny",
        f"benchmark={name}",
        "benchmark.limit=2",
        "runtime.num_workers=0",  # no worker processes to start for a handful of images
        f"tracking.uri={tracking_uri}",
        *overrides,
    )
    assert status == 0
    (job,) = (tmp_path / "outputs" / "runs").iterdir()
    metrics = read_metrics(job)
    predictions = pd.read_parquet(job / "predictions.parquet")
    assert metrics["n_groups"] == predictions["group_id"].nunique() == 2
    if expected is not None:
        assert metrics["n_items"] == len(predictions) == expected
    mlflow.set_tracking_uri(tracking_uri)
    (run,) = mlflow.search_runs(
        experiment_names=["sysattn"],
        filter_string=f"params.`benchmark.name` = '{name}'",
        output_format="list",
    )
    assert run.data.metrics["n_items"] == len(predictions)
    if name == "hallusionbench":
        check_no_image_questions(predictions, metrics)


def check_no_image_questions(predictions: pd.DataFrame, metrics: dict) -> None:
    """The first two pairs of the image split, whole: their questions without a figure
    (from the non_image split) are scored too, with prompts that have no image."""
    records = json.loads((SHARED / "hallusionbench" / "HallusionBench.json").read_text())
    first = list(dict.fromkeys(pair_key(r) for r in records if r["visual_input"] != "0"))[:2]
    sizes = {k: sum(pair_key(r) == k for r in records) for k in first}
    assert predictions.groupby("group_id").size().to_dict() == sizes
    no_image = sum(pair_key(r) in sizes and r["visual_input"] == "0" for r in records)
    assert no_image > 0 and predictions["image_id"].isna().sum() == no_image
    assert "<image>" not in "".join(predictions.loc[predictions["image_id"].isna(), "prompt"])
    assert metrics["n_no_image_items"] == no_image
    for name in ("aAcc", "qAcc", "fAcc", "aAcc_image", "qAcc_image"):
        assert f"hallusionbench/{name}" in metrics and f"baseline_hallusionbench/{name}" in metrics


BAD_HUB_INPUT = {
    "wrong split": (
        ["benchmark=mme", "benchmark.split=validation"],
        ["lmms-lab-encoder/MME", "'validation'", 'Unknown split "validation"', "data_dir"],
    ),
    "wrong second split": (
        ["benchmark=hallusionbench", "benchmark.split=[image,nonimage]"],
        ["lmms-lab-encoder/HallusionBench split 'nonimage'", "non_image"],
    ),
    "missing column": (
        ["benchmark=winoground"],
        ["facebook/winoground split test", "no column 'caption_1'"],
    ),
}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=needs_shared)
        if "hallusionbench" in " ".join(BAD_HUB_INPUT[c][0])
        else c
        for c in BAD_HUB_INPUT
    ],
)
def test_bad_hub_input_one_line_exit_2(on_hub, repos, tmp_path, monkeypatch, capsys, case):
    import datasets

    broken = repos | {
        "facebook/winoground": {
            "test": repos["facebook/winoground"]["test"].remove_columns("caption_1")
        }
    }
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset(broken))
    overrides, expected = BAD_HUB_INPUT[case]
    status = run_main(tmp_path, monkeypatch, "model=tiny", *overrides)
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for text in expected:
        assert text in err
    assert not list(tmp_path.rglob("metrics.json"))


def test_gated_repo_reports_the_real_error_beside_the_licence(monkeypatch):
    """A gated repo that fails for another reason (here: still a loading script, which
    datasets >= 4 refuses) must say that reason, with the licence hint beside it."""
    import datasets
    from huggingface_hub import HfApi, constants

    def refuse_script(path, split=None, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported, but found winoground.py")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        HfApi, "dataset_info", lambda self, repo, **kw: SimpleNamespace(gated="manual")
    )
    monkeypatch.setattr(datasets, "load_dataset", refuse_script)
    with pytest.raises(UsageError) as raised:
        load_benchmark(benchmark_cfg("benchmark=winoground"))
    message = str(raised.value)
    assert "Dataset scripts are no longer supported, but found winoground.py" in message
    assert "accept its licence" in message and "benchmark.data_dir" in message
    assert "\n" not in message


@needs_shared
def test_hallusionbench_hub_dry_run_counts(on_hub, tmp_path, monkeypatch, capsys):
    """The full hub data through the CLI without the model: all 1,129 questions in the 455
    pairs of the release, 178 of them without an image."""
    status = run_main(
        tmp_path, monkeypatch, "model=tiny", "benchmark=hallusionbench", "runtime.dry_run=true"
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "benchmark hallusionbench: n_items=1129, n_groups=455," in out
    assert "n_no_image_items=178" in out
