"""Loading a model of any supported family with its processor, sysattn on its language
model's attention, and the yes/no token ids.

The family is read from the checkpoint's config (model_type): a vision-language model of
VLM_FAMILIES, or any causal LM from AutoModelForCausalLM (text only: system and text
modalities). Only the language model's attention is rerouted; vision towers keep theirs.
"""

import logging
import os
from dataclasses import dataclass

import torch
import transformers
from jinja2.exceptions import TemplateError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.utils import is_num2words_available, is_torchvision_available

from sysattn_exp.attention.intervention import ATTENTION_NAME, guard_edits
from sysattn_exp.attention.modality import modality_counts, modality_ids
from sysattn_exp.errors import UsageError, first_line
from sysattn_exp.models import offline_processors, random_weights, tiny
from sysattn_exp.models.prompts import PromptFormat, question_token_start, text_kwargs

log = logging.getLogger(__name__)

# model_type -> family, for the vision-language models whose prompts, image placeholders
# and positions this tool handles (README "Model families").
VLM_FAMILIES = {
    "llava": "LLaVA-1.5",
    "llava_next": "LLaVA-NeXT",
    "llava_onevision": "LLaVA-OneVision",
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "gemma3": "Gemma 3",
    "internvl": "InternVL",
    "idefics3": "Idefics3",
    "smolvlm": "SmolVLM",
}
BUILTIN_TINY = "builtin:tiny"
BUILTIN_TOY = "builtin:toy"  # the trained toy LLaVA, weights shipped in the package
# Its balanced twin: the same architecture, trained on the uniform question mix.
BUILTIN_TOY_BALANCED = "builtin:toy_balanced"
BUILTIN_TOYS = (BUILTIN_TOY, BUILTIN_TOY_BALANCED)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel  # a *ForConditionalGeneration, or a *ForCausalLM (text only)
    processor: object  # the processor; a text-only model's tokenizer
    device: torch.device  # where inputs go (the embeddings' device under a device_map)
    dtype: torch.dtype

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def image_token_id(self) -> int | None:
        return getattr(self.model.config, "image_token_id", None)

    @property
    def tokenizer(self):
        return tokenizer_of(self.processor)

    def prompt_format(self, cfg) -> PromptFormat:
        return prompt_format(cfg, self.processor, self.model.config.model_type)


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def prompt_format(cfg, processor, model_type: str) -> PromptFormat:
    """LLaVA-1.5 keeps the paper's vicuna prompt; every other family its chat template."""
    if model_type != "llava" and not tokenizer_of(processor).chat_template:
        raise UsageError(
            f"model.name_or_path={cfg.name_or_path!r} has no chat template; "
            "use an instruction-tuned checkpoint (its tokenizer_config or chat_template.jinja)"
        )
    return PromptFormat(
        processor,
        cfg.get("system_prompt"),
        vicuna=model_type == "llava",
        template_kwargs=dict(cfg.get("chat_template_kwargs") or {}),
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"model.device={name!r} is not a device: {first_line(error)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"model.device={name} but no CUDA device is visible; use auto or cpu")
    return device


def auto_dtype(device: torch.device, capability: tuple[int, int] | None) -> tuple[torch.dtype, str]:
    """model.dtype=auto: (dtype, why). bfloat16 on CUDA devices of compute capability >= 8.0
    (Ampere and later: bf16 tensor cores, and what torch.cuda.is_bf16_supported checks);
    float16 on older ones (V100 7.0, T4 7.5), where bf16 is emulated or absent and the
    attention kernels run fp16 (kernels.py's first-use check bound, 4 bf16 units, is 32
    fp16 units: a right fp16 kernel passes with room, a wrong one is still O(1) off);
    float32 elsewhere. `capability`: the lowest (major, minor) of the devices used."""
    if device.type != "cuda":
        return torch.float32, f"{device.type} device"
    major, minor = capability
    if (major, minor) >= (8, 0):
        return torch.bfloat16, f"CUDA compute capability {major}.{minor} >= 8.0"
    return torch.float16, f"CUDA compute capability {major}.{minor} < 8.0: no native bfloat16"


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """The lowest compute capability among the GPUs a model on `device` may use: that
    device, or every visible one for plain "cuda" (a device_map may spread over them)."""
    if device.type != "cuda":
        return None
    if device.index is not None:
        return torch.cuda.get_device_capability(device)
    return min(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        dtype, why = auto_dtype(device, cuda_capability(device))
        log.info("model.dtype=auto: %s (%s)", str(dtype).removeprefix("torch."), why)
        return dtype
    return DTYPES[name]


def use_sysattn(model: PreTrainedModel) -> None:
    """Route the language model's attention through sysattn. A VLM's other sub-models (the
    vision tower) keep their own implementation: a plain string would swap theirs too.
    Every forward pass given an edit is then checked (intervention.guard_edits)."""
    guard_edits(model)
    sub_configs = getattr(model.config, "sub_configs", {}) or {}
    if "text_config" not in sub_configs:
        model.set_attn_implementation(ATTENTION_NAME)
        return
    own = {
        name: getattr(model.config, name)._attn_implementation or "sdpa"
        for name in sub_configs
        if name != "text_config" and getattr(model.config, name, None) is not None
    }
    model.set_attn_implementation({"text_config": ATTENTION_NAME} | own)


_LOADED: dict[tuple, LoadedModel] = {}


def load_model(cfg) -> LoadedModel:
    """Load (once per process: sweep jobs share it) the model and processor `cfg` names."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    device_map = device_map_of(cfg)
    if device_map is not None and cfg.name_or_path in (BUILTIN_TINY, *BUILTIN_TOYS):
        raise UsageError(
            f"model.device_map={device_map!r} does not apply to {cfg.name_or_path} (built in "
            "code on one device); use model.device"
        )
    key = (cfg.name_or_path, cfg.revision, cfg.seed, str(device), str(dtype), repr(device_map))
    key += (cfg.get("weights"), str(cfg.get("config_overrides")))  # random weights
    if key not in _LOADED:
        log.info("loading %s on %s as %s", cfg.name_or_path, device_map or device, dtype)
        # Loaded in its dtype (from_pretrained keeps the rotary frequencies in float32: a
        # later model.to(dtype) would round them to bf16, shifting every rotary angle by up
        # to 2^-9 of it: 0.78 rad at position 640 for head dim 128) and moved, never cast.
        model, processor = _load(cfg, dtype, device_map)
        use_sysattn(model)
        if device_map is None:
            model.to(device)
        else:  # inputs go where the embeddings are
            device = model.get_input_embeddings().weight.device
        model.eval()
        tokenizer_of(processor).padding_side = "left"
        _LOADED[key] = LoadedModel(model, processor, device, dtype)
    return _LOADED[key]


def device_map_of(cfg) -> str | dict | None:
    """model.device_map as from_pretrained takes it: null, a strategy name (auto,
    balanced...), or a mapping of module names to devices (e.g. the decoder's first layers
    on cuda:0, the rest on cpu)."""
    device_map = cfg.get("device_map")
    if hasattr(device_map, "items"):  # a DictConfig (or dict): module name -> device
        return {str(name): device for name, device in device_map.items()}
    return device_map


def toy_module():
    """models/toy_model.py, imported only when builtin:toy is asked for: the toy model is
    drawn from the toy benchmark's world (the benchmarks package, which needs pandas and
    omegaconf), and scripts/device_check.py loads models on GPU images without them."""
    from sysattn_exp.models import toy_model

    return toy_model


def toy_weights(name_or_path: str):
    """The shipped weights file of builtin:toy or builtin:toy_balanced (toy_model.SHIPPED)."""
    return toy_module().SHIPPED[name_or_path.removeprefix("builtin:")]


def load_config(cfg):
    """The checkpoint's config, refused unless this tool handles its family."""
    if cfg.name_or_path == BUILTIN_TINY:
        return tiny.build_config()
    if cfg.name_or_path in BUILTIN_TOYS:
        return toy_module().build_toy_config()
    if random_weights.is_random(cfg):
        preset = random_weights.preset_of(cfg)
        return random_weights.build_config(preset, cfg.get("config_overrides"))
    try:
        config = AutoConfig.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, **hub_access(cfg)
        )
    except (OSError, ValueError) as err:
        raise UsageError(
            f"model.name_or_path={cfg.name_or_path!r} could not be loaded ({first_line(err)}); "
            "give a hub id you can download or a directory saved with save_pretrained"
        ) from err
    model_type = config.model_type
    is_vlm = hasattr(config, "vision_config") or model_type in VLM_FAMILIES
    if model_type in VLM_FAMILIES or (
        not is_vlm and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        return config
    raise UsageError(
        f"model.name_or_path={cfg.name_or_path!r} is a {model_type!r} model, which is not "
        f"supported; supported: {', '.join(VLM_FAMILIES)} and text-only causal LMs"
    )


_HUB_ACCESS: dict[tuple, dict] = {}
HUB_PROBE_SECONDS = 10


def hub_access(cfg) -> dict:
    """from_pretrained's extra arguments for cfg's hub checkpoint, decided once per process
    by one quick request to the hub (transformers would otherwise spend about a minute in
    retries before failing or falling back to the cache): {} when the hub answers (even
    with an error, which from_pretrained then reports), for a local directory, or with
    HF_HUB_OFFLINE set; {"local_files_only": True} when the hub cannot be reached but the
    local cache holds the checkpoint (as HF_HUB_OFFLINE=1 would). Without network or cache:
    UsageError at once, naming what to do."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    name = cfg.name_or_path
    if constants.HF_HUB_OFFLINE or os.path.isdir(name):
        return {}
    key = (name, cfg.revision)
    if key not in _HUB_ACCESS:
        try:
            HfApi().model_info(name, revision=cfg.revision, timeout=HUB_PROBE_SECONDS)
            _HUB_ACCESS[key] = {}
        except (HfHubHTTPError, ValueError):  # the hub answered, or the id is malformed
            _HUB_ACCESS[key] = {}
        except Exception as err:  # noqa: BLE001 - no answer at all: the hub is unreachable
            cached = try_to_load_from_cache(name, "config.json", revision=cfg.revision)
            if not isinstance(cached, str):
                raise UsageError(
                    f"model.name_or_path={name!r}: cannot reach the Hugging Face hub "
                    f"({first_line(err)}) and the local cache has no copy; download it where "
                    f"there is a network (hf download {name}) or give a directory saved with "
                    "save_pretrained"
                ) from None
            log.warning(
                "cannot reach the Hugging Face hub (%s): using the copy of %s in the local "
                "cache (set HF_HUB_OFFLINE=1 to skip this check)",
                first_line(err),
                name,
            )
            _HUB_ACCESS[key] = {"local_files_only": True}
    return _HUB_ACCESS[key]


def _load(cfg, dtype, device_map):
    if cfg.name_or_path == BUILTIN_TINY:
        return tiny.build_tiny_llava(seed=cfg.seed, dtype=dtype)
    if cfg.name_or_path in BUILTIN_TOYS:
        return toy_module().build_toy_llava(toy_weights(cfg.name_or_path), dtype=dtype)
    if random_weights.is_random(cfg):
        return random_weights.build(cfg, dtype, resolve_device(cfg.device), device_map)
    model_type = load_config(cfg).model_type
    # The processor first: one that cannot be built here (a missing optional dependency)
    # stops the job before minutes of weight loading.
    processor = load_processor(cfg, model_type)
    model_class = (
        AutoModelForImageTextToText if model_type in VLM_FAMILIES else AutoModelForCausalLM
    )
    try:
        model = model_class.from_pretrained(
            cfg.name_or_path,
            revision=cfg.revision,
            dtype=dtype,
            device_map=device_map,
            **hub_access(cfg),
        )
    except OSError as err:
        raise UsageError(
            f"model.name_or_path={cfg.name_or_path!r} could not be loaded ({first_line(err)}); "
            "give a hub id you can download or a directory saved with save_pretrained"
        ) from err
    return model, processor


def load_processor(cfg, model_type: str | None = None):
    """The processor (a VLM) or tokenizer (a text-only LM) alone: no model weights are read
    (a dry run needs only this)."""
    if cfg.name_or_path == BUILTIN_TINY:
        return tiny.build_processor()
    if cfg.name_or_path in BUILTIN_TOYS:
        return toy_module().build_toy_processor()
    if random_weights.is_random(cfg):
        return offline_processors.build_processor(random_weights.preset_of(cfg), load_config(cfg))
    model_type = model_type or load_config(cfg).model_type
    loader = AutoProcessor if model_type in VLM_FAMILIES else AutoTokenizer
    try:
        return loader.from_pretrained(cfg.name_or_path, revision=cfg.revision, **hub_access(cfg))
    except (OSError, ValueError, ImportError) as err:
        missing = missing_processor_dependency(model_type)
        if missing:
            raise UsageError(f"model.name_or_path={cfg.name_or_path!r}: {missing}") from err
        raise UsageError(
            f"model.name_or_path={cfg.name_or_path!r}: no processor ({first_line(err)})"
        ) from err


# Packages a family's processor checks for itself when it is built (transformers 5.x).
PROCESSOR_PACKAGES = {"smolvlm": ("num2words", is_num2words_available)}


def missing_processor_dependency(model_type: str) -> str | None:
    """Why the family's processor cannot be built on this machine, if missing optional
    packages are the reason (all of them named at once); else None. In transformers 5 every
    video processor needs torchvision, and the processors of Qwen2-VL, Qwen2.5-VL,
    LLaVA-OneVision, InternVL and SmolVLM include one (their class lists a video_processor
    among its parts), even for images only; SmolVLM's also refuses to start without
    num2words."""
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    processor_class = getattr(transformers, name, None) if name else None
    if processor_class is None:
        return None
    missing = {}
    if "video_processor" in processor_class.get_attributes() and not is_torchvision_available():
        missing["torchvision"] = "for its video processor"
    package, available = PROCESSOR_PACKAGES.get(model_type, (None, None))
    if package and not available():
        missing[package] = "its own check"
    if not missing:
        return None
    needs = " and ".join(f"{package} ({why})" for package, why in missing.items())
    build = (
        f"; torchvision: the build matching torch {torch.__version__}"
        if "torchvision" in missing
        else ""
    )
    return (
        f"the {VLM_FAMILIES.get(model_type, model_type)} processor ({name}) needs {needs}, "
        f"not installed here: pip install {' '.join(missing)}{build}"
    )


def prompt_modalities(
    processor, image_token_id, image, prompt: str, question: str
) -> dict[str, int]:
    """How many tokens of `prompt` (with its image, if any, expanded) are system, image and
    text."""
    tokenizer = tokenizer_of(processor)
    if image is None:
        inputs = tokenizer([prompt], return_tensors="pt", **text_kwargs(tokenizer, prompt))
        start = torch.tensor([question_token_start(tokenizer, prompt, question)])
        image_token_id = None
    else:
        inputs = processor(
            images=[[image]], text=[prompt], return_tensors="pt", **text_kwargs(tokenizer, prompt)
        )
        start = None
    split = modality_ids(inputs["input_ids"], inputs["attention_mask"], image_token_id, start)
    return modality_counts(split[0])


def first_token_ids(tokenizer, words, key: str, prompt: str | None = None) -> list[int]:
    """The token ids a reply starting with one of `words` begins with, right after `prompt`
    (a rendered prompt: it ends in the chat template's generation prompt, which is the same
    for every item). Each word is read in both spellings a reply can start with, as it is
    and after a space ("Yes", " Yes"): a template that ends in "ASSISTANT:" or
    "Assistant:" is followed by " Yes" (Llama's SentencePiece "▁Yes", byte-level BPE's
    "ĠYes"), one that ends in a newline by "Yes". Each spelling is tokenised after the
    prompt and its first new token kept; a spelling whose tokens merge with the prompt's
    last ones is skipped (the model, having read the prompt's tokens, cannot emit it).
    `prompt` None: the tokenizer's own chat template's generation prompt, or, without a
    template, each word tokenised alone. Sorted, without repeats. UsageError names `key`
    if a word gives no token."""
    if not words:
        raise UsageError(f"{key} is empty; give at least one word, e.g. [Yes, yes]")
    if not all(isinstance(w, str) for w in words):
        raise UsageError(f"{key}={list(words)} must be strings (quote Yes/No in YAML)")
    if prompt is None:
        prompt = generation_prompt(tokenizer)
    prompt_ids = tokenizer(prompt or "", add_special_tokens=False).input_ids
    ids = set()
    for word in words:
        forms = spellings(word) if prompt is not None else [word]
        found = {first_new_token(tokenizer, prompt or "", prompt_ids, w) for w in forms}
        found.discard(None)
        if not found:
            raise UsageError(
                f"{key}={list(words)}: {word!r} gives no token of its own after the prompt "
                "(it tokenizes to nothing, or merges with the prompt's last token)"
            )
        ids |= found
    return sorted(ids)


def generation_prompt(tokenizer) -> str | None:
    """A one-question conversation rendered by the tokenizer's chat template, ending in its
    generation prompt; None without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    for content in ([{"type": "text", "text": "?"}], "?"):  # processors' form, plain form
        try:
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        except TemplateError:
            continue
    return None


def spellings(word: str) -> list[str]:
    """The word as given and after one space ("Yes" -> "Yes", " Yes")."""
    return list(dict.fromkeys([word, " " + word.lstrip()])) if word.strip() else [word]


def first_new_token(tokenizer, prompt: str, prompt_ids: list[int], text: str) -> int | None:
    """The first token of `text` as it is tokenised after `prompt`; None where the prompt's
    own tokens are not a prefix of the whole (a merge across the boundary) or `text` adds
    no token."""
    ids = tokenizer(prompt + text, add_special_tokens=False).input_ids
    if len(ids) <= len(prompt_ids) or ids[: len(prompt_ids)] != prompt_ids:
        return None
    return ids[len(prompt_ids)]
