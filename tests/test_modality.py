import pytest
import torch
from conftest import make_image
from reference import row_modalities

from sysattn_exp.errors import UsageError
from sysattn_exp.modality import IMAGE, PAD, SYSTEM, TEXT, modality_counts, modality_ids
from sysattn_exp.models import build_prompt

NAMES = {"pad": PAD, "system": SYSTEM, "image": IMAGE, "text": TEXT}


@pytest.mark.parametrize("side", ["left", "right"])
def test_partition_per_row_under_padding(gqa_llava, side):
    model, processor = gqa_llava
    processor.tokenizer.padding_side = side
    try:
        prompts = [
            build_prompt("Is it red?", "A system prompt."),
            build_prompt("Is the big thing blue?", ""),
        ]
        inputs = processor(
            images=[make_image("red")] * 2, text=prompts, padding=True, return_tensors="pt"
        )
    finally:
        processor.tokenizer.padding_side = "left"
    cfg = model.config
    ids = modality_ids(
        inputs["input_ids"], inputs["attention_mask"], cfg.image_token_id, cfg.image_seq_length
    )
    want = [
        [NAMES[n] for n in row]
        for row in row_modalities(inputs["input_ids"], inputs["attention_mask"], cfg.image_token_id)
    ]
    assert ids.tolist() == want
    counts = [modality_counts(row) for row in ids]
    assert [c["image"] for c in counts] == [cfg.image_seq_length] * 2
    # "<s>A system prompt. USER: " is longer than "<s>USER: ".
    assert counts[0]["system"] > counts[1]["system"] >= 3
    # The first real token is BOS (system); the last is the end of "ASSISTANT:" (text).
    first_real = inputs["attention_mask"][0].nonzero()[0].item()
    assert ids[0, first_real] == SYSTEM
    last_real = inputs["attention_mask"][0].nonzero()[-1].item()
    assert ids[0, last_real] == TEXT


def test_refuses_split_or_short_image_span():
    image_token = 9
    ids = torch.tensor([[1, 5, 9, 9, 6, 9, 7]])
    mask = torch.ones_like(ids)
    with pytest.raises(UsageError, match="contiguous span of 3"):
        modality_ids(ids, mask, image_token, 3)
    with pytest.raises(UsageError, match="found 2 tokens"):
        modality_ids(
            torch.tensor([[1, 9, 9, 7]]), torch.ones(1, 4, dtype=torch.long), image_token, 3
        )
    with pytest.raises(UsageError, match="row 1"):
        both = torch.tensor([[1, 9, 9, 9, 7], [1, 2, 3, 4, 7]])
        modality_ids(both, torch.ones_like(both), image_token, 3)


def test_padding_is_never_a_modality():
    ids = torch.tensor([[0, 0, 1, 9, 9, 4], [1, 2, 9, 9, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    got = modality_ids(ids, mask, 9, 2)
    assert got.tolist() == [
        [PAD, PAD, SYSTEM, IMAGE, IMAGE, TEXT],
        [SYSTEM, SYSTEM, IMAGE, IMAGE, TEXT, TEXT],
    ]
