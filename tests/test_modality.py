import pytest
import torch
from conftest import make_image
from reference import row_modalities

from sysattn_exp.attention.modality import IMAGE, PAD, SYSTEM, TEXT, modality_counts, modality_ids
from sysattn_exp.models.prompts import build_prompt

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
    ids = modality_ids(inputs["input_ids"], inputs["attention_mask"], cfg.image_token_id)
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


def test_image_runs_from_first_to_last_placeholder():
    """Tiles with text markers between them (Idefics3's rows and columns) are one image span;
    a wrapper before the first placeholder is system, one after the last is text."""
    image_token = 9
    ids = torch.tensor([[1, 5, 9, 9, 6, 9, 7]])
    got = modality_ids(ids, torch.ones_like(ids), image_token)
    assert got.tolist() == [[SYSTEM, SYSTEM, IMAGE, IMAGE, IMAGE, IMAGE, TEXT]]


def test_rows_without_image_need_the_question_start():
    both = torch.tensor([[1, 9, 9, 9, 7], [1, 2, 3, 4, 7]])
    with pytest.raises(ValueError, match="text_start"):
        modality_ids(both, torch.ones_like(both), 9)
    got = modality_ids(both, torch.ones_like(both), 9, text_start=torch.tensor([0, 3]))
    assert got.tolist() == [[SYSTEM, IMAGE, IMAGE, IMAGE, TEXT], [SYSTEM] * 3 + [TEXT] * 2]
    text_only = modality_ids(both[1:], torch.ones_like(both[1:]), None, torch.tensor([1]))
    assert text_only.tolist() == [[SYSTEM] + [TEXT] * 4]


def test_padding_is_never_a_modality():
    ids = torch.tensor([[0, 0, 1, 9, 9, 4], [1, 2, 9, 9, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    got = modality_ids(ids, mask, 9)
    assert got.tolist() == [
        [PAD, PAD, SYSTEM, IMAGE, IMAGE, TEXT],
        [SYSTEM, SYSTEM, IMAGE, IMAGE, TEXT, TEXT],
    ]
