"""The config schema (schema.py): every shipped config fits it, each kind of bad key or
value is one line naming the key and what is allowed, and the schema's sets of allowed
values are the ones the code implements. The CLI's exit status and output for these
errors: test_cli_bad_input.py."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sysattn_exp.benchmarks import LOADERS, pope, sugarcrepe
from sysattn_exp.errors import UsageError
from sysattn_exp.evaluation import chair
from sysattn_exp.experiment import job_yes_no
from sysattn_exp.experiment.schema import (
    BENCHMARKS,
    Dtype,
    PopeSplit,
    RankBy,
    Singularize,
    SugarCrepeSubset,
    check_config,
    check_report_config,
)
from sysattn_exp.models import loading as models

CONF = Path(__file__).parents[1] / "sysattn_exp" / "conf"


def composed(*overrides: str, name: str = "config"):
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        return compose(name, overrides=list(overrides))


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


REQUIRED = {"heads": ["intervention.heads.profile=attention_profile_heads.csv"]}
SHIPPED = (
    [[f"model={m}"] for m in options("model")]
    + [[f"benchmark={b}"] for b in options("benchmark")]
    + [[f"intervention={i}"] for i in options("intervention")]
    + [[f"layers={x}"] for x in options("layers")]
    # The conditions differ only in the intervention (open) and the layers option: one of each kind.
    + [[f"+condition={c}"] for c in ("baseline", "pai", "image-x2_all", "system-text_q4")]
    # A sweep's required values (???) given: +sweep=heads needs the per-head profile.
    + [[f"+sweep={s}", *REQUIRED.get(s, [])] for s in options("sweep")]
    + [[f"+task={t}"] for t in options("task")]
)


@pytest.mark.parametrize("overrides", SHIPPED, ids=" ".join)
def test_every_shipped_option_fits_the_schema(overrides):
    check_config(composed(*overrides))


def test_a_sweeps_required_value_left_out_is_named():
    with pytest.raises(UsageError, match="intervention.heads.profile"):
        check_config(composed("+sweep=heads"))


def test_the_check_leaves_the_composed_config_as_it_was():
    """Jobs read Hydra's config (job keys, config.yaml), not the schema's typed copy."""
    cfg = composed("model=tiny", "runtime.progress_seconds=5")
    before = OmegaConf.to_container(cfg)
    check_config(cfg)
    assert OmegaConf.to_container(cfg) == before
    assert type(cfg.runtime.progress_seconds) is int and type(cfg.scoring.mode) is str


def test_report_config_fits_its_schema():
    check_report_config(composed(name="report"))
    with pytest.raises(UsageError, match=r"report.outt is not a key of report; .*out, parent"):
        check_report_config(composed("+report.outt=x", name="report"))


BAD = {
    # unknown keys, added with + (Hydra adds them unchecked)
    "+layer=q4": "layer is not a key of the config; allowed: model, benchmark, intervention,",
    "+scoring.moode=generate": "scoring.moode is not a key of scoring; allowed: yes_words",
    "+runtime.cache_dri=x": "did you mean cache_dir?",
    "+model.batchsize=2": "model.batchsize is not a key of model; allowed: name_or_path",
    "+benchmark.path=x": "benchmark.path is not a key of benchmark; allowed: name, prompt",
    "+benchmark.prompts.native.remov=x": "allowed: template, remove; did you mean remove?",
    # wrong types (a value OmegaConf would convert is refused: the job reads it unconverted)
    "model.batch_size=two": "model.batch_size='two' must be a whole number",
    "model.batch_size='8'": "model.batch_size='8' must be a whole number",
    "runtime.dry_run=yes": "runtime.dry_run='yes' must be true or false",
    "scoring.yes_words=[1,2]": "scoring.yes_words[0]=1 must be a string",
    "scoring.max_new_tokens=null": "scoring.max_new_tokens=null must be a whole number",
    "model.chat_template_kwargs=5": "model.chat_template_kwargs=5 must be a mapping",
    "layers.start=a": "layers.start='a' must be a whole number or null",
    # values outside their set
    "scoring.mode=sample": "scoring.mode='sample' is not allowed; allowed: logit, generate",
    "scoring.parser=bogus": "scoring.parser='bogus' is not allowed; allowed: native, mme",
    "scoring.rank_by=logit": "scoring.rank_by='logit' is not allowed; allowed: p_yes, log_odds",
    "model.dtype=float8": "allowed: auto, float32, bfloat16, float16",
    "model.weights=rand": "model.weights='rand' is not allowed; allowed: pretrained, random",
    "benchmark.split=easy": "benchmark.split='easy' is not allowed; allowed: demo, test, hard",
    "benchmark.name=imagenet": "benchmark.name='imagenet' is unknown; allowed: toy, jsonl",
    # numbers out of range
    "model.batch_size=0": "model.batch_size=0 must be a number >= 1",
    "layers.quarter=5": "layers.quarter=5 must be a number from 1 to 4",
    "benchmark.limit=0": "benchmark.limit=0 must be a number >= 1",
    "scoring.max_new_tokens=0": "scoring.max_new_tokens=0 must be a number >= 1",
    "runtime.lease_seconds=0": "runtime.lease_seconds=0 must be a number >= 0.001",
    "runtime.num_workers=-1": "runtime.num_workers=-1 must be auto or a whole number >= 0",
    # a required key removed
    "~scoring.mode": "scoring.mode is required",
}
BAD_WITH = {
    ("benchmark=pope", "benchmark.subsets=[random,rand]"): (
        "benchmark.subsets[1]='rand' is not allowed; allowed: random, popular, adversarial"
    ),
    ("benchmark=sugarcrepe", "benchmark.subsets=[swap]"): (
        "benchmark.subsets[0]='swap' is not allowed; allowed: add_att, add_obj"
    ),
    ("+task=caption", "caption.singularize=pattern"): (
        "caption.singularize='pattern' is not allowed; allowed: original, lemminflect"
    ),
    ("+task=caption", "caption.limit=0"): "caption.limit=0 must be a number >= 1",
    ("+task=caption", "+caption.max_new_token=9"): "did you mean max_new_tokens?",
}


@pytest.mark.parametrize(
    "overrides,expected",
    [((key,), want) for key, want in BAD.items()] + list(BAD_WITH.items()),
    ids=lambda value: " ".join(value) if isinstance(value, tuple) else "",
)
def test_bad_key_or_value_is_one_line_naming_it(overrides, expected):
    with pytest.raises(UsageError) as error:
        check_config(composed(*overrides))
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_open_sections_take_any_keys():
    """The sections left open on purpose (schema.py's docstring)."""
    check_config(
        composed(
            "+intervention.anything=1",  # each rule checks its own section
            "++model.chat_template_kwargs={enable_thinking: false, x: {y: 1}}",
            "model.config_overrides={text_config: {num_hidden_layers: 2}}",
            "model.device_map={model.language_model: cpu}",
            "+benchmark.prompts.mine={template: '{question}?', remove: null}",
            "runtime.num_workers=3",
        )
    )
    check_config(composed("model.device_map=auto", "benchmark=hallusionbench"))
    check_config(composed("benchmark=hallusionbench", "benchmark.split=image"))


def test_allowed_values_are_the_implemented_ones():
    assert [d.value for d in Dtype] == ["auto", *models.DTYPES]
    assert [r.value for r in RankBy] == list(job_yes_no.RANKINGS)
    assert [s.value for s in Singularize] == list(chair.SINGULARIZERS)
    assert [s.value for s in PopeSplit] == pope.SPLITS
    assert [s.value for s in SugarCrepeSubset] == sugarcrepe.SUBSETS
    assert list(BENCHMARKS) == list(LOADERS)


def report_cli(tmp_path, *overrides: str) -> tuple[int, list[str]]:
    result = subprocess.run(
        [sys.executable, "-m", "sysattn_exp.report", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, [line for line in result.stderr.splitlines() if line.strip()]


def test_report_cli_refuses_a_misspelt_key_in_one_line(tmp_path):
    code, lines = report_cli(tmp_path, "+report.parnet=all")
    assert code == 2, lines
    assert lines == [
        "error: report.parnet is not a key of report; allowed: out, parent, correction, alpha; "
        "did you mean parent?"
    ]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("tracking=nope", "Could not find 'tracking/nope'"),  # Hydra's composition error
        ("report.out=null", "report.out"),  # its run directory cannot take the value
    ],
)
def test_report_cli_composition_errors_are_one_line(tmp_path, override, fragment):
    code, lines = report_cli(tmp_path, override)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
