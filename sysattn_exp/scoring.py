"""Batched yes/no scoring: one forward pass per batch, logits at the last position only."""

import torch

from sysattn_exp.intervention import Redistribution
from sysattn_exp.modality import modality_ids
from sysattn_exp.models import LoadedModel


def left_padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as generate() does; a plain
    forward would number left padding as positions and shift every row's RoPE phase."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp_min(0)


@torch.inference_mode()
def score_batch(
    loaded: LoadedModel,
    images: list,
    prompts: list[str],
    edit: Redistribution | None,
    yes_ids: list[int],
    no_ids: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(yes_logit, no_logit) per prompt: log-sum-exp of the yes / no word logits."""
    inputs = loaded.processor(images=images, text=prompts, padding=True, return_tensors="pt")
    inputs = inputs.to(loaded.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    key_modality = modality_ids(
        inputs["input_ids"],
        inputs["attention_mask"],
        loaded.image_token_id,
        loaded.image_seq_length,
    )
    logits = (
        loaded.model(
            **inputs,
            position_ids=left_padded_position_ids(inputs["attention_mask"]),
            logits_to_keep=1,
            use_cache=False,
            key_modality=key_modality,
            attention_edit=edit,
        )
        .logits[:, -1]
        .float()
    )
    return logits[:, yes_ids].logsumexp(dim=-1), logits[:, no_ids].logsumexp(dim=-1)
