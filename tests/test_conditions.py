import pytest
from omegaconf import OmegaConf

from sysattn_exp.attention.rules import Pai, Redistribution, Scale
from sysattn_exp.errors import UsageError
from sysattn_exp.experiment.conditions import build_edit, intervention_rule, resolve_layers


def layers(**kw):
    return OmegaConf.create({"quarter": None, "start": None, "end": None} | kw)


@pytest.mark.parametrize(
    "depth,quarter,want",
    [
        (32, 4, range(24, 32)),  # LLaVA-1.5 7B: the paper's 1-based "25-32"
        (32, 1, range(0, 8)),
        (40, 4, range(30, 40)),  # 13B
        (40, 2, range(10, 20)),
        (6, 1, range(0, 1)),  # floor((q-1)L/4) .. floor(qL/4)
        (6, 2, range(1, 3)),
        (6, 3, range(3, 4)),
        (6, 4, range(4, 6)),
    ],
)
def test_quarters_use_the_floor_formula(depth, quarter, want):
    assert resolve_layers(layers(quarter=quarter), depth) == list(want)


def test_quarters_cover_every_layer_once():
    for depth in range(4, 50):
        got = [i for q in (1, 2, 3, 4) for i in resolve_layers(layers(quarter=q), depth)]
        assert got == list(range(depth))


def test_all_and_explicit_ranges():
    assert resolve_layers(layers(), 8) == list(range(8))
    assert resolve_layers(layers(start=2, end=5), 8) == [2, 3, 4]
    assert resolve_layers(layers(start=6), 8) == [6, 7]


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"start": 0, "end": 33}, "outside the model's 32 decoder layers"),
        ({"start": -1, "end": 4}, "outside"),
        ({"start": 5, "end": 5}, "outside"),
        ({"quarter": 4, "start": 1}, "not both"),
    ],
)
def test_bad_layer_ranges(kw, message):
    with pytest.raises(UsageError, match=message):
        resolve_layers(layers(**kw), 32)


def rule(**kw):
    return intervention_rule(
        OmegaConf.create({"name": "redistribute", "source": "system", "recipients": ["text"]} | kw)
    )


def test_rules_are_canonical():
    assert intervention_rule(OmegaConf.create({"name": "none"})) is None
    base = {
        "source": "system",
        "recipients": ("text",),
        "fraction": 1.0,
        "mode": "proportional",
        "impl": "fused",
    }
    layers = frozenset({1, 2})

    def edit(rule):
        return build_edit(rule, [2, 1])

    assert edit(rule()) == Redistribution(layers=layers, **base)
    assert edit(rule(recipients=["text", "image"])) == Redistribution(
        layers=layers, **base | {"recipients": ("image", "text")}
    )
    assert edit(
        rule(source="image", recipients="text", impl="eager", fraction=0.25, mode="uniform")
    ) == Redistribution(
        layers=layers,
        **base | {"source": "image", "fraction": 0.25, "mode": "uniform", "impl": "eager"},
    )
    scale = OmegaConf.create({"name": "scale", "modality": "image", "factor": 2})
    assert edit(intervention_rule(scale)) == Scale("image", 2.0, layers, impl="fused")
    assert type(edit(intervention_rule(scale)).factor) is float  # as the job key writes it
    pai = OmegaConf.create({"name": "pai", "alpha": 1, "cfg_gamma": 2})
    assert edit(intervention_rule(pai)) == Pai(1.0, layers, "fused", 2.0)


@pytest.mark.parametrize(
    "section,key,allowed",
    [
        ({"name": "none", "source": "system"}, "source", "name"),
        (
            {"name": "redistribute", "source": "system", "recipients": ["text"], "sourse": "x"},
            "sourse",
            "name, source, recipients, impl, fraction, mode, heads",
        ),
        ({"name": "scale", "modality": "image", "factor": 2, "fraction": 1}, "fraction",
         "name, modality, factor, impl, heads"),
        ({"name": "pai", "alpha": 0.2, "gamma": 1.1}, "gamma",
         "name, alpha, impl, cfg_gamma, heads"),
    ],
)  # fmt: skip
def test_a_key_the_rule_does_not_have_is_refused(section, key, allowed):
    name = section["name"]
    with pytest.raises(UsageError) as error:
        intervention_rule(OmegaConf.create(section))
    assert str(error.value) == (
        f"intervention.{key} is not a key of the {name} rule; allowed: {allowed}"
    )


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"name": "swap"}, "intervention.name='swap' is unknown"),
        ({"source": "audio"}, "intervention.source='audio' is not a modality"),
        ({"recipients": []}, "intervention.recipients is empty"),
        ({"recipients": ["system"]}, "allowed recipients are image, text"),
        ({"recipients": ["pixels"]}, "contains 'pixels'"),
        ({"impl": "flash"}, "intervention.impl='flash' is unknown"),
        ({"fraction": 1.5}, "intervention.fraction=1.5 must be a number in \\[0, 1\\]"),
        ({"mode": "greedy"}, "intervention.mode='greedy' is unknown"),
        ({"name": "scale", "modality": "audio", "factor": 2}, "intervention.modality='audio'"),
        (
            {"name": "scale", "modality": "image", "factor": 0},
            "intervention.factor=0 must be a positive",
        ),
        ({"name": "pai", "alpha": -1}, "intervention.alpha=-1 must be a number >= 0"),
        ({"name": "pai", "alpha": 0.2, "cfg_gamma": 0.5}, "intervention.cfg_gamma=0.5 must be"),
    ],
)
def test_bad_rules(kw, message):
    """Redistribution settings over a valid redistribute section; other rules as given."""
    with pytest.raises(UsageError, match=message):
        if kw.get("name") in ("scale", "pai"):
            intervention_rule(OmegaConf.create(kw))
        else:
            rule(**kw)
