"""model.weights=random: a preset's exact architecture with seeded random weights, built
from the checkpoint's config.json shipped in sysattn_exp/model_configs/ (no download).

The numbers it produces are meaningless; shapes, sequence lengths, memory and time are the
real model's. Each shipped file holds the architecture keys of the hub checkpoint's
published config.json; model_configs/SOURCES.md says which repository each mirrors and
where its numbers come from. PRESETS gives each preset's published parameter count, which
tests/test_random_weights.py checks every shipped architecture against (within 1%).

Building: the model is constructed on the `meta` device (no memory), then each parameter
and buffer is allocated empty on its target device (model.device, or the device_map's
device for that module) in the target dtype, and initialised there from `model.seed` by
transformers' own `initialize_weights` (the init of a freshly constructed model:
normal(0, initializer_range) linears and embeddings, unit norms; it also recomputes the
non-persistent buffers that allocation leaves as garbage: rotary `inv_freq`, position ids).
Buffers keep the dtype construction gave them (rotary `inv_freq` float32 under a bfloat16
model, as from_pretrained(dtype=bfloat16) has it). No full copy is ever made on the CPU.
"""

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from sysattn_exp.errors import UsageError, first_line
from sysattn_exp.models.offline_processors import build_processor

CONFIG_DIR = Path(__file__).parent / "model_configs"


@dataclass(frozen=True)
class Preset:
    repo: str  # the hub checkpoint whose config.json model_configs/<preset>.json mirrors
    params: float  # its published parameter count, in billions (the hub model page)


PRESETS = {
    "llava15_7b": Preset("llava-hf/llava-1.5-7b-hf", 7.06),
    "llava15_13b": Preset("llava-hf/llava-1.5-13b-hf", 13.4),
    "llava_next_7b": Preset("llava-hf/llava-v1.6-mistral-7b-hf", 7.57),
    "llava_next_vicuna_7b": Preset("llava-hf/llava-v1.6-vicuna-7b-hf", 7.06),
    "llava_onevision_7b": Preset("llava-hf/llava-onevision-qwen2-7b-ov-hf", 8.03),
    "qwen2_vl_7b": Preset("Qwen/Qwen2-VL-7B-Instruct", 8.29),
    "qwen25_vl_7b": Preset("Qwen/Qwen2.5-VL-7B-Instruct", 8.29),
    "qwen25_vl_72b": Preset("Qwen/Qwen2.5-VL-72B-Instruct", 73.4),
    "gemma3_4b": Preset("google/gemma-3-4b-it", 4.30),
    "gemma3_12b": Preset("google/gemma-3-12b-it", 12.2),
    "gemma3_27b": Preset("google/gemma-3-27b-it", 27.4),
    "gemma3_1b": Preset("google/gemma-3-1b-it", 1.00),
    "internvl3_8b": Preset("OpenGVLab/InternVL3-8B-hf", 7.94),
    "idefics3_8b": Preset("HuggingFaceM4/Idefics3-8B-Llama3", 8.46),
    "smolvlm2_2b": Preset("HuggingFaceTB/SmolVLM2-2.2B-Instruct", 2.25),
    "llama31_8b": Preset("meta-llama/Llama-3.1-8B-Instruct", 8.03),
    "qwen25_7b": Preset("Qwen/Qwen2.5-7B-Instruct", 7.62),
    "qwen3_8b": Preset("Qwen/Qwen3-8B", 8.19),
    "gemma2_2b": Preset("google/gemma-2-2b-it", 2.61),
}


def is_random(cfg) -> bool:
    """Whether the model config asks for random weights (model.weights); UsageError for
    random weights of a model built in code."""
    weights = cfg.get("weights", "pretrained")
    if weights == "random" and str(cfg.name_or_path).startswith("builtin:"):
        raise UsageError(
            f"model.weights=random is for the hub presets; {cfg.name_or_path} is built in code "
            "(use model.weights=pretrained, or a preset such as model=llava15_7b)"
        )
    return weights == "random"


def cache_condition(cfg) -> dict:
    """What the score cache's condition adds for a random-weight model (its scores are not
    the checkpoint's): nothing for pretrained weights, so their keys stay as they were."""
    if not is_random(cfg):
        return {}
    return {
        "random_weights": {
            "seed": cfg.seed,
            "config_overrides": to_plain(cfg.get("config_overrides") or {}),
        }
    }


def preset_of(cfg) -> str:
    """The preset whose shipped config mirrors model.name_or_path."""
    for name, preset in PRESETS.items():
        if preset.repo == cfg.name_or_path:
            return name
    known = ", ".join(p.repo for p in PRESETS.values())
    raise UsageError(
        f"model.weights=random needs a shipped config; model.name_or_path="
        f"{cfg.name_or_path!r} has none; allowed: {known} (the conf/model presets)"
    )


def merged(base: dict, overrides: Mapping) -> dict:
    """`base` with `overrides` merged in, nested dicts key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value if not isinstance(value, Mapping) else dict(value)
    return out


def shipped_config_dict(preset: str) -> dict:
    return json.loads((CONFIG_DIR / f"{preset}.json").read_text())


def build_config(preset: str, overrides: Mapping | None = None) -> PretrainedConfig:
    """The preset's shipped config, with `overrides` (model.config_overrides: nested as in
    config.json, e.g. {text_config: {num_hidden_layers: 2}}) applied. UsageError for an
    override key the config does not have."""
    overrides = to_plain(overrides or {})
    if not isinstance(overrides, dict):
        raise UsageError(f"model.config_overrides={overrides!r} must be a mapping")
    shipped = shipped_config_dict(preset)
    data = merged(shipped, overrides)
    try:
        config = CONFIG_MAPPING[data["model_type"]].from_dict(data)
    except (ValueError, TypeError, KeyError, AttributeError, StrictDataclassError) as err:
        raise UsageError(f"model.config_overrides: {first_line(err)}") from err
    check_overrides(config, overrides, "model.config_overrides", shipped)
    check_heads(config.get_text_config())
    return config


def check_heads(text_config) -> None:
    """UsageError where the query heads do not split evenly over the key/value heads (the
    attention's grouped-query layout); transformers would fail only in the first forward."""
    heads = getattr(text_config, "num_attention_heads", None)
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise UsageError(
            f"model.config_overrides: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={kv_heads}"
        )


def check_overrides(config, overrides: dict, where: str, shipped: dict) -> None:
    """UsageError for an override key that neither the shipped config.json (`shipped`, at
    this level) nor the config class defines (a config accepts any keyword and would keep a
    misspelt one without effect)."""
    for key, value in overrides.items():
        sub = getattr(config, key, None)
        if isinstance(value, dict) and isinstance(sub, PretrainedConfig):
            check_overrides(sub, value, f"{where}.{key}", shipped.get(key) or {})
        elif key not in shipped and not any(key in keys for keys in known_keys(config)):
            raise UsageError(
                f"{where}.{key} is not a key of the {type(config).__name__}; "
                "use the config.json's own key names"
            )


def known_keys(config) -> list[set]:
    """The keys a default instance of the config's class has, and of its text config's
    (a flat config.json, Qwen2-VL's, keeps the text model's keys at the top)."""
    classes = {type(config), type(config.get_text_config())}
    return [set(vars(cls())) | set(cls().to_dict()) for cls in classes]


def to_plain(value):
    """An OmegaConf or other mapping/sequence as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or type(value).__name__ == "ListConfig":
        return [to_plain(v) for v in value]
    return value


def model_class(config):
    return AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM


def build_on_meta(config, dtype: torch.dtype):
    """The architecture on the meta device: parameters in `dtype`, no memory."""
    try:
        with torch.device("meta"):
            return model_class(config).from_config(config, dtype=dtype)
    except (ValueError, TypeError, RuntimeError) as err:
        raise UsageError(f"model.config_overrides: {first_line(err)}") from err


def materialise(model, device_of: Callable[[str], torch.device]) -> None:
    """Allocate every meta parameter and buffer, empty, on `device_of(its name)` with its
    dtype. Tied parameters (one Parameter in two modules) stay one."""
    done: dict[int, torch.Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for table in (module._parameters, module._buffers):
            for key, tensor in list(table.items()):
                if tensor is None:
                    continue
                if id(tensor) not in done:
                    device = device_of(f"{module_name}.{key}" if module_name else key)
                    empty = torch.empty_like(tensor, device=device)
                    if isinstance(tensor, torch.nn.Parameter):
                        empty = torch.nn.Parameter(empty, requires_grad=tensor.requires_grad)
                    done[id(tensor)] = empty
                table[key] = done[id(tensor)]


def initialise(model, seed: int) -> None:
    """Seeded init of every parameter and buffer, where each is (transformers' own init)."""
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.initialize_weights()


def resolve_device_map(model, device_map) -> dict:
    """A device_map (auto, a device name, or {module: device}) as {module: device}, worked
    out by transformers' own from_pretrained code on the meta model."""
    from transformers.integrations.accelerate import _get_device_map, check_and_set_device_map

    device_map = to_plain(device_map)
    try:
        return _get_device_map(model, check_and_set_device_map(device_map), None, None)
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"model.device_map={device_map!r}: {first_line(err)}") from err


def build_model(
    config, dtype: torch.dtype, device: torch.device, seed: int, device_map=None, dispatch=True
):
    """The model `config` describes with seeded random weights, built on the meta device and
    materialised on `device` (or per `device_map`, and with `dispatch` given accelerate's
    hooks as from_pretrained does: modules mapped to the CPU beside a GPU are offloaded, run
    on the GPU) in `dtype`; eval mode. The weights depend on the seed and on which device
    each tensor is initialised on (each device type has its own generator)."""
    model = build_on_meta(config, dtype)
    if device_map is None:
        materialise(model, lambda name: device)
    else:
        from transformers.integrations.accelerate import expand_device_map

        device_map = resolve_device_map(model, device_map)
        if "disk" in device_map.values():
            raise UsageError("model.device_map: disk offload is not supported with random weights")
        names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
        check_covered(device_map, names)
        where = expand_device_map(device_map, names)
        materialise(model, lambda name: torch.device(where[name]))
    initialise(model, seed)
    if dispatch and device_map is not None and len(set(device_map.values())) > 1:
        from accelerate import dispatch_model

        dispatch_model(model, device_map)
        model.hf_device_map = device_map
    return model.eval()


def check_covered(device_map: dict, names: list[str]) -> None:
    """UsageError for a device_map that names no module of the model, or leaves a
    parameter or buffer without a device (from_pretrained refuses both too; transformers'
    expand_device_map would put such tensors on the CPU without a word)."""

    def under(name: str, key: str) -> bool:
        return key == "" or name == key or name.startswith(key + ".")

    unknown = [key for key in device_map if not any(under(name, key) for name in names)]
    if unknown:
        raise UsageError(
            f"model.device_map names {unknown[0]!r}, which is not a module of the model"
        )
    missing = [name for name in names if not any(under(name, key) for key in device_map)]
    if missing:
        raise UsageError(
            f"model.device_map gives no device for {missing[0]!r} ({len(missing)} tensors in "
            "all); map every module, e.g. with a '' entry for the rest"
        )


def build(cfg, dtype: torch.dtype, device: torch.device, device_map=None):
    """(model, processor) for the model config `cfg` with model.weights=random."""
    preset = preset_of(cfg)
    config = build_config(preset, cfg.get("config_overrides"))
    model = build_model(config, dtype, device, cfg.seed, device_map)
    return model, build_processor(preset, config)
