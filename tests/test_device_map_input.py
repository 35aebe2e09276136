"""A device_map for random weights must name modules of the model and give every tensor a
device (as from_pretrained requires): nothing lands on the CPU by default."""

import pytest
import torch

from sysattn_exp.errors import UsageError
from sysattn_exp.models.random_weights import build_config, build_model

SMALL = {
    "text_config": {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "vision_config": {
        "num_hidden_layers": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
    },
}


@pytest.fixture(scope="module")
def config():
    return build_config("llava15_7b", SMALL)


def test_a_module_the_model_does_not_have_is_refused(config):
    with pytest.raises(UsageError, match="'foo', which is not a module"):
        build_model(config, torch.float32, torch.device("cpu"), 0, {"foo": "cpu"})


def test_a_map_that_leaves_tensors_without_a_device_is_refused(config):
    with pytest.raises(UsageError, match="gives no device for 'model.vision_tower"):
        build_model(config, torch.float32, torch.device("cpu"), 0, {"model.language_model": "cpu"})


def test_a_map_covering_every_module_builds(config):
    device_map = {"model": "cpu", "lm_head": "cpu"}
    model = build_model(config, torch.float32, torch.device("cpu"), 0, device_map)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
