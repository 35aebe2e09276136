"""Loading LLaVA models and processors, building prompts, and the yes/no token ids."""

import logging
from dataclasses import dataclass

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from sysattn_exp.errors import UsageError, first_line
from sysattn_exp.intervention import ATTENTION_NAME
from sysattn_exp.modality import modality_counts, modality_ids

log = logging.getLogger(__name__)

BUILTIN_TINY = "builtin:tiny"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: LlavaForConditionalGeneration
    processor: object
    device: torch.device
    dtype: torch.dtype

    @property
    def num_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def image_seq_length(self) -> int:
        return self.model.config.image_seq_length


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


def use_sysattn(model: LlavaForConditionalGeneration) -> None:
    """Route the language model's attention through sysattn; the vision tower keeps SDPA
    (a plain string would swap CLIP's attention too, and CLIP has no layer_idx)."""
    model.set_attn_implementation({"text_config": ATTENTION_NAME, "vision_config": "sdpa"})


_LOADED: dict[tuple, LoadedModel] = {}


def load_model(cfg) -> LoadedModel:
    """Load (once per process: sweep jobs share it) the model and processor `cfg` names."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    key = (cfg.name_or_path, cfg.revision, cfg.seed, str(device), str(dtype))
    if key not in _LOADED:
        log.info("loading %s on %s as %s", cfg.name_or_path, device, dtype)
        model, processor = _load(cfg, dtype)
        use_sysattn(model)
        model.to(device=device, dtype=dtype).eval()
        processor.tokenizer.padding_side = "left"
        _LOADED[key] = LoadedModel(model, processor, device, dtype)
    return _LOADED[key]


def _load(cfg, dtype):
    if cfg.name_or_path == BUILTIN_TINY:
        from sysattn_exp.tiny import build_tiny_llava

        return build_tiny_llava(seed=cfg.seed)
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, dtype=dtype
        )
        processor = AutoProcessor.from_pretrained(cfg.name_or_path, revision=cfg.revision)
    except OSError as err:
        raise UsageError(
            f"model.name_or_path={cfg.name_or_path!r} could not be loaded ({first_line(err)}); "
            "give a hub id you can download or a directory saved with save_pretrained"
        ) from err
    return model, processor


def load_processor(cfg):
    """The processor alone (for a dry run): no model weights are read."""
    if cfg.name_or_path == BUILTIN_TINY:
        from sysattn_exp.tiny import build_processor

        return build_processor()
    try:
        return AutoProcessor.from_pretrained(cfg.name_or_path, revision=cfg.revision)
    except OSError as err:
        raise UsageError(f"model.name_or_path={cfg.name_or_path!r}: no processor ({err})") from err


def prompt_modalities(processor, image, prompt: str) -> dict[str, int]:
    """How many tokens of `prompt` (with its image, if any, expanded) are system, image and
    text."""
    inputs = processor(
        images=None if image is None else [image], text=[prompt], return_tensors="pt"
    )
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    n_image = int((ids == processor.image_token_id).sum())
    start = (
        None
        if image is not None
        else torch.tensor([question_token_start(processor.tokenizer, prompt)])
    )
    split = modality_ids(ids, mask, processor.image_token_id, n_image, text_start=start)
    return modality_counts(split[0])


USER = "USER: "


def build_prompt(question: str, system_prompt: str, with_image: bool = True) -> str:
    """LLaVA-1.5's evaluation prompt (conversation vicuna_v1); the tokenizer adds BOS. A
    question without an image is asked the same way, without the <image> line."""
    prefix = f"{system_prompt} " if system_prompt else ""
    image = "<image>\n" if with_image else ""
    return f"{prefix}{USER}{image}{question} ASSISTANT:"


def question_token_start(tokenizer, prompt: str) -> int:
    """Index of the first token of the user's question in the tokenized `prompt` (a prompt
    of build_prompt without an image): every token before it is system."""
    start = prompt.rindex(USER) + len(USER)
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    return next(i for i, (_, end) in enumerate(offsets) if end > start)


def first_token_ids(tokenizer, words, key: str) -> list[int]:
    """The first token id of each word, as the model would emit it after "ASSISTANT:"."""
    if not words:
        raise UsageError(f"{key} is empty; give at least one word, e.g. [Yes, yes]")
    if not all(isinstance(w, str) for w in words):
        raise UsageError(f"{key}={list(words)} must be strings (quote Yes/No in YAML)")
    ids = [tokenizer(w, add_special_tokens=False).input_ids[:1] for w in words]
    if not all(ids):
        raise UsageError(f"{key}={list(words)} contains a word that tokenizes to nothing")
    return sorted({i[0] for i in ids})
