"""Each benchmark reads generated answers as its official evaluation code does
(scoring.parser=native), MME's rule on request for all (scoring.parser=mme) (issue 18,
section 4). The expected answers are worked out by hand from each source's rule, quoted
in the comments."""

import pandas as pd
import pytest
import yaml
from benchmark_fixtures import write_pope
from cli import run_main
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sysattn_exp.benchmarks import (
    NATIVE_PARSERS,
    answer_parser,
    beaf,
    hallusionbench,
    mme,
    naturalbench,
    pope,
)
from sysattn_exp.benchmarks.base import mme_answer
from sysattn_exp.experiment.identity import generation_condition, job_key

# POPE evaluate.py: keep the text before the first ".", drop commas, split on " "; "No",
# "not" or "no" among the words -> no, else yes.
POPE = [
    ("Yes", "yes"),
    ("No", "no"),
    ("No.", "no"),
    ("no, there is not.", "no"),
    ("There is a dog in the image.", "yes"),  # the example: MME reads it unknown
    ("There is no dog in the image.", "no"),
    ("The dog is not visible.", "no"),
    ("Yes. There is no cat.", "yes"),  # only the first sentence counts
    ("No, the image shows a cat", "no"),  # "No," -> "No" once commas are dropped
    ("NO", "yes"),  # words are matched as written: "NO" is none of them
    ("Nope", "yes"),
    ("There is nothing", "yes"),  # "nothing" is not "no"
    ("No\nthere is none", "yes"),  # split on spaces only: "No\nthere" is one word
    ("", "yes"),
]
# MME eval tool (after lmms-eval's lowercase / strip / periods removed): exactly yes/no, else
# "yes" in the first 4 characters, else "no" in them, else unknown.
MME = [
    ("Yes", "yes"),
    ("no.", "no"),
    ("  NO  ", "no"),
    ("Yes, there is a dog.", "yes"),
    ("Nope", "no"),
    ("I think yes", "unknown"),
    ("There is a dog in the image.", "unknown"),
    ("", "unknown"),
]
# NaturalBench extract_answer (yes_no): the earlier of the whole words "yes" / "no" (regex
# \b, any case); neither -> -1 (unknown).
NATURALBENCH = [
    ("Yes", "yes"),
    ("no", "no"),
    ("NO.", "no"),
    ("Yes, and no", "yes"),
    ("The answer is no, not yes", "no"),
    ("There is nothing there", "unknown"),  # "no" inside "nothing" is not a word
    ("Not really", "unknown"),
    ("yes-man", "yes"),  # "-" is a word boundary
    ("eyes open", "unknown"),
    ("", "unknown"),
]
# VLMEvalKit YOrN_Extraction (HallusionBench's deterministic stage): lowercase, VQA
# punctuation handling, split on whitespace; "yes" a word and "no" not -> yes; the reverse
# -> no; else unknown.
HALLUSIONBENCH = [
    ("Yes", "yes"),
    ("No.", "no"),
    ("Yes, the chart shows it.", "yes"),
    ("No, it does not.", "no"),
    ("Yes and no", "unknown"),
    ("The answer is yes!", "yes"),  # "!" beside no space becomes a space: "yes "
    ("(no)", "no"),
    ("yes/no", "unknown"),  # "/" beside no space becomes a space: "yes no"
    ("yes, no", "unknown"),  # "," beside a space is deleted: "yes no"
    ("There is nothing", "unknown"),
    ("", "unknown"),
]
# BEAF beaf_metric.py answer_check: "yes" in the lowercased text -> yes, else "no" in it ->
# no (substrings); neither: the official loop reuses the previous answer (unknown here).
BEAF = [
    ("Yes", "yes"),
    ("No", "no"),
    ("There is no dog.", "no"),
    ("It is not there", "no"),  # "no" inside "not"
    ("I don't know", "no"),  # "no" inside "know"
    ("Eyes are visible", "yes"),  # "yes" inside "eyes"
    ("A dog is there", "unknown"),
    ("", "unknown"),
]


@pytest.mark.parametrize(("text", "answer"), POPE)
def test_pope_parser(text, answer):
    assert pope.parse_generated(text) == answer


@pytest.mark.parametrize(("text", "answer"), MME)
def test_mme_parser(text, answer):
    assert mme.parse_generated(text) == answer == mme_answer(text)


@pytest.mark.parametrize(("text", "answer"), NATURALBENCH)
def test_naturalbench_parser(text, answer):
    assert naturalbench.parse_generated(text) == answer


@pytest.mark.parametrize(("text", "answer"), HALLUSIONBENCH)
def test_hallusionbench_parser(text, answer):
    assert hallusionbench.parse_generated(text) == answer


def test_vqa_punctuation_keeps_decimals_and_caps_period_removal_at_32():
    """process_punctuation's period pattern spares a period before a digit, and its
    re.UNICODE in the count position removes at most 32 periods."""
    assert hallusionbench.vqa_punctuation("it is 3.5.") == "it is 3.5"
    assert hallusionbench.vqa_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize(("text", "answer"), BEAF)
def test_beaf_parser(text, answer):
    assert beaf.parse_generated(text) == answer


@pytest.mark.parametrize(
    ("benchmark", "native"),
    [
        ("pope", pope.parse_generated),
        ("naturalbench", naturalbench.parse_generated),
        ("hallusionbench", hallusionbench.parse_generated),
        ("beaf", beaf.parse_generated),
        ("mme", mme_answer),
        ("winoground", mme_answer),  # no generation parser in its evaluation
        ("sugarcrepe", mme_answer),
        ("toy", mme_answer),
        ("jsonl", mme_answer),
    ],
)
def test_native_and_mme_parser_choice(benchmark, native):
    assert answer_parser(benchmark, "native") is native
    assert answer_parser(benchmark, "mme") is mme_answer
    assert NATIVE_PARSERS.get(benchmark, mme_answer) is native


def test_cli_bogus_parser_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    status = run_main(tmp_path, monkeypatch, "model=tiny", "scoring.parser=bogus")
    assert status == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "scoring.parser='bogus'" in lines[0] and "native, mme" in lines[0]
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.fixture(scope="module")
def pope_dir(tmp_path_factory):
    """POPE's question files and images, and one MLflow store for the module (creating one
    costs seconds)."""
    root = tmp_path_factory.mktemp("pope")
    write_pope(root)
    return root


def generate_pope(tmp_path, monkeypatch, pope_dir, *overrides) -> tuple[pd.DataFrame, dict]:
    status = run_main(
        tmp_path,
        monkeypatch,
        "model=tiny",
        "benchmark=pope",
        f"benchmark.data_dir={pope_dir / 'coco'}",
        f"benchmark.image_dir={pope_dir / 'val2014'}",
        "benchmark.subsets=[random]",
        "scoring.max_new_tokens=4",
        "runtime.num_workers=0",
        "runtime.cache_dir=null",
        "hydra.run.dir=job",
        f"tracking.uri=sqlite:///{pope_dir / 'mlruns.db'}",
        *overrides,
    )
    assert status == 0
    frame = pd.read_parquet(tmp_path / "job" / "predictions.parquet")
    config = yaml.safe_load((tmp_path / "job" / "config.yaml").read_text())
    return frame, config


@pytest.mark.parametrize(
    ("parser", "parse"), [("native", pope.parse_generated), ("mme", mme_answer)]
)
def test_generate_mode_parses_with_the_chosen_rule(tmp_path, monkeypatch, pope_dir, parser, parse):
    frame, _ = generate_pope(
        tmp_path, monkeypatch, pope_dir, "scoring.mode=generate", f"scoring.parser={parser}"
    )
    assert frame["answer"].tolist() == [parse(text) for text in frame["generated"]]
    assert frame["pred"].tolist() == (frame["answer"] == "yes").tolist()
    if parser == "native":  # POPE's rule has no unknown answer
        assert "unknown" not in set(frame["answer"])


def test_parser_is_in_the_job_key_in_generate_mode_only():
    """Logit-mode jobs keep the key they had before scoring.parser existed; in generate mode
    the parser changes the answers, so it changes the key."""
    keys = {}
    for mode in ("logit", "generate"):
        for parser in ("native", "mme"):
            with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
                cfg = compose(
                    "config", overrides=[f"scoring.mode={mode}", f"scoring.parser={parser}"]
                )
            config = OmegaConf.to_container(cfg, resolve=True)
            keys[mode, parser] = job_key(config, generation_condition(cfg.scoring))
            if mode == "logit":  # as a config written before scoring.parser existed
                del config["scoring"]["parser"]
                keys["logit", "before"] = job_key(config, generation_condition(cfg.scoring))
    assert keys["logit", "native"] == keys["logit", "mme"] == keys["logit", "before"]
    assert keys["generate", "native"] != keys["generate", "mme"]
