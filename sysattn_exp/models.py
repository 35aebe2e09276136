"""Loading a model of any supported family with its processor, sysattn on its language
model's attention, and the yes/no token ids.

The family is read from the checkpoint's config (model_type): a vision-language model of
VLM_FAMILIES, or any causal LM from AutoModelForCausalLM (text only: system and text
modalities). Only the language model's attention is rerouted; vision towers keep theirs.
"""

import logging
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from sysattn_exp.errors import UsageError, first_line
from sysattn_exp.intervention import ATTENTION_NAME, guard_edits
from sysattn_exp.modality import modality_counts, modality_ids
from sysattn_exp.prompts import PromptFormat, question_token_start, text_kwargs

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
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(
            f"model.dtype={name!r} is not allowed; use auto or one of {sorted(DTYPES)}"
        )
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
    device_map = cfg.get("device_map")
    key = (cfg.name_or_path, cfg.revision, cfg.seed, str(device), str(dtype), device_map)
    if key not in _LOADED:
        log.info("loading %s on %s as %s", cfg.name_or_path, device_map or device, dtype)
        model, processor = _load(cfg, dtype, device_map)
        use_sysattn(model)
        if device_map is None:
            model.to(device=device, dtype=dtype)
        else:  # inputs go where the embeddings are
            device = model.get_input_embeddings().weight.device
        model.eval()
        tokenizer_of(processor).padding_side = "left"
        _LOADED[key] = LoadedModel(model, processor, device, dtype)
    return _LOADED[key]


def load_config(cfg):
    """The checkpoint's config, refused unless this tool handles its family."""
    if cfg.name_or_path == BUILTIN_TINY:
        from sysattn_exp.tiny import build_config

        return build_config()
    if cfg.name_or_path == BUILTIN_TOY:
        from sysattn_exp.toy_model import build_toy_config

        return build_toy_config()
    try:
        config = AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision)
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


def _load(cfg, dtype, device_map):
    if cfg.name_or_path == BUILTIN_TINY:
        from sysattn_exp.tiny import build_tiny_llava

        return build_tiny_llava(seed=cfg.seed)
    if cfg.name_or_path == BUILTIN_TOY:
        from sysattn_exp.toy_model import build_toy_llava

        return build_toy_llava()
    model_type = load_config(cfg).model_type
    model_class = (
        AutoModelForImageTextToText if model_type in VLM_FAMILIES else AutoModelForCausalLM
    )
    try:
        model = model_class.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, dtype=dtype, device_map=device_map
        )
    except OSError as err:
        raise UsageError(
            f"model.name_or_path={cfg.name_or_path!r} could not be loaded ({first_line(err)}); "
            "give a hub id you can download or a directory saved with save_pretrained"
        ) from err
    return model, load_processor(cfg, model_type)


def load_processor(cfg, model_type: str | None = None):
    """The processor (a VLM) or tokenizer (a text-only LM) alone: no model weights are read
    (a dry run needs only this)."""
    if cfg.name_or_path == BUILTIN_TINY:
        from sysattn_exp.tiny import build_processor

        return build_processor()
    if cfg.name_or_path == BUILTIN_TOY:
        from sysattn_exp.toy_model import build_toy_processor

        return build_toy_processor()
    model_type = model_type or load_config(cfg).model_type
    loader = AutoProcessor if model_type in VLM_FAMILIES else AutoTokenizer
    try:
        return loader.from_pretrained(cfg.name_or_path, revision=cfg.revision)
    except OSError as err:
        raise UsageError(
            f"model.name_or_path={cfg.name_or_path!r}: no processor ({first_line(err)})"
        ) from err


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


def first_token_ids(tokenizer, words, key: str) -> list[int]:
    """The first token id of each word, as the model would emit it after the prompt."""
    if not words:
        raise UsageError(f"{key} is empty; give at least one word, e.g. [Yes, yes]")
    if not all(isinstance(w, str) for w in words):
        raise UsageError(f"{key}={list(words)} must be strings (quote Yes/No in YAML)")
    ids = [tokenizer(w, add_special_tokens=False).input_ids[:1] for w in words]
    if not all(ids):
        raise UsageError(f"{key}={list(words)} contains a word that tokenizes to nothing")
    return sorted({i[0] for i in ids})
