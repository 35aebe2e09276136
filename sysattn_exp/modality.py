"""Token positions -> modality ids (DESIGN.md section 2).

Every position of a prompt is one of: padding (0), system (1: BOS, system prompt, "USER:"),
image (2: the contiguous span of image tokens) or text (3: everything after the image).
A prompt without an image has no image span: system is every position before the first
token of the question, text is the question and "ASSISTANT:".
"""

import torch

from sysattn_exp.errors import UsageError

PAD, SYSTEM, IMAGE, TEXT = 0, 1, 2, 3
MODALITIES = {"system": SYSTEM, "image": IMAGE, "text": TEXT}


def modality_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    image_seq_length: int,
    text_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, N) modality id of every position, computed per row, so any padding side works.

    A row with an image: system before its image span, text after it. A row without image
    tokens (a question with no image) needs `text_start` (B,), the position of the first
    token of its question: system before it, text from there on.
    Refuses a row whose image tokens are not one contiguous span of `image_seq_length`.
    """
    real = attention_mask.bool()
    is_image = (input_ids == image_token_id) & real
    n_image = is_image.sum(dim=1)
    first_image = is_image.int().argmax(dim=1, keepdim=True)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    expected_span = (positions >= first_image) & (positions < first_image + image_seq_length)
    bad_rows = (n_image != image_seq_length) | (is_image != expected_span).any(dim=1)
    no_image = n_image == 0
    if text_start is not None:
        bad_rows &= ~no_image
        # Rows without an image: an empty image span where the question starts.
        first_image = torch.where(no_image[:, None], text_start.to(positions)[:, None], first_image)
    span_length = torch.where(no_image, 0, image_seq_length)[:, None]
    if bad_rows.any():
        row = int(bad_rows.nonzero()[0])
        raise UsageError(
            f"prompt row {row}: image tokens (id {image_token_id}) must form one contiguous span "
            f"of {image_seq_length}, found {int(n_image[row])} tokens; pass exactly one image "
            "per prompt and one <image> placeholder"
        )
    ids = torch.where(
        positions < first_image,
        SYSTEM,
        torch.where(positions < first_image + span_length, IMAGE, TEXT),
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
