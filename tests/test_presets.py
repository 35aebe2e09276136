"""Every model preset composes with Hydra, names a checkpoint and has every key the code
reads; LLaVA-1.5 keeps its vicuna system prompt, chat-template families the template's own."""

import re
from importlib.resources import files

import pytest
from hydra import compose, initialize_config_module

PRESETS = sorted(
    p.name.removesuffix(".yaml")
    for p in files("sysattn_exp.conf").joinpath("model").iterdir()
    if p.name.endswith(".yaml")
)
KEYS = {
    "name_or_path",
    "revision",
    "seed",
    "device",
    "dtype",
    "batch_size",
    "system_prompt",
    "device_map",
    "chat_template_kwargs",
}
# The presets over ~20B parameters spread the model over the visible GPUs (README, Model
# families); every other preset loads on one device.
SPREAD = {"qwen25_vl_72b", "gemma3_27b"}
VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)


def model_config(name: str):
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        return compose("config", overrides=[f"model={name}"]).model


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_with_every_key(name):
    model = model_config(name)
    assert set(model) >= KEYS, KEYS - set(model)
    assert isinstance(model.name_or_path, str) and model.name_or_path
    assert model.batch_size >= 1
    assert model.device_map == ("auto" if name in SPREAD else None)
    assert isinstance(dict(model.chat_template_kwargs), dict)
    if not name.startswith("llava15") and name not in ("tiny", "toy", "toy_balanced"):  # vicuna
        # Chat-template families: the template's own default system prompt.
        assert model.system_prompt is None
        assert "/" in model.name_or_path  # a hub id


def test_llava15_keeps_the_vicuna_prompt_and_one_device():
    for name in ("llava15_7b", "llava15_13b", "tiny", "toy", "toy_balanced"):
        model = model_config(name)
        assert model.system_prompt == VICUNA
        assert model.device_map is None
        assert dict(model.chat_template_kwargs) == {}


def test_the_spread_presets_are_those_over_20b():
    """SPREAD is what each preset's name says of its size: over 20B parameters."""
    size = {p: re.search(r"_(\d+)b$", p) for p in PRESETS}
    assert {p for p, m in size.items() if m and int(m.group(1)) > 20} == SPREAD


def test_family_specific_settings():
    assert dict(model_config("qwen3_8b").chat_template_kwargs) == {"enable_thinking": False}
    assert model_config("qwen2_vl_7b").name_or_path == "Qwen/Qwen2-VL-7B-Instruct"
    assert model_config("llava15_7b").name_or_path == "llava-hf/llava-1.5-7b-hf"
