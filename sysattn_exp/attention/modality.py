"""Token positions -> modality ids (docs/design.md, section 2): one rule for every family.

Every position of a prompt is one of: padding (0), system (1), image (2) or text (3).
With an image: image is every position from the first to the last image-placeholder token
(tile separators and row markers between tiles included), system every position before
it (BOS, system prompt, role markers, wrappers such as <|vision_start|>), text every
position after it. Without an image: system is every position before the first token of
the user's question, text the question and what follows.
"""

import torch

PAD, SYSTEM, IMAGE, TEXT = 0, 1, 2, 3
MODALITIES = {"system": SYSTEM, "image": IMAGE, "text": TEXT}
FIRST_KEY = "bos"  # a profile's share on the first real position alone (the attention sink)


def modality_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int | None,
    text_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, N) modality id of every position, computed per row, so any padding side works.

    A row with image tokens: system before the first, image up to the last, text after.
    A row without (a question with no image, or a text-only model, `image_token_id` None)
    needs `text_start` (B,), the position of the first token of its question.
    """
    real = attention_mask.bool()
    is_image = real & (input_ids == image_token_id) if image_token_id is not None else real & False
    has_image = is_image.any(dim=1)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    first = is_image.int().argmax(dim=1)
    last = input_ids.shape[1] - 1 - is_image.flip(1).int().argmax(dim=1)
    if not bool(has_image.all()):
        if text_start is None:
            raise ValueError("rows without image tokens need text_start")
        # An empty image span just before the question.
        text_start = text_start.to(positions)
        first, last = (
            torch.where(has_image, first, text_start),
            torch.where(has_image, last, text_start - 1),
        )
    ids = torch.where(
        positions < first[:, None],
        SYSTEM,
        torch.where(positions <= last[:, None], IMAGE, TEXT),
    )
    return ids.masked_fill(~real, PAD)


def modality_counts(ids: torch.Tensor) -> dict[str, int]:
    """Number of tokens of each modality in one row of `modality_ids`."""
    return {name: int((ids == code).sum()) for name, code in MODALITIES.items()}


def answer_rows(key_modality: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, Q): the query row at the last real position of each row, if it is text (the
    answer position; in a prefix pass that ends with the image there is none)."""
    k_len = key_modality.shape[1]
    real = key_modality != PAD
    last = k_len - 1 - real.flip(1).int().argmax(dim=1)
    positions = torch.arange(k_len - q_len, k_len, device=key_modality.device)
    return (positions[None] == last[:, None]) & (key_modality[:, k_len - q_len :] == TEXT)


def first_real_key(key_modality: torch.Tensor) -> torch.Tensor:
    """(B, N) boolean: each row's first real (not padding) position, whatever the padding
    side: BOS where the tokenizer adds one, the attention sink of Xiao et al. 2023."""
    real = key_modality != PAD
    return real & (real.int().cumsum(dim=1) == 1)
