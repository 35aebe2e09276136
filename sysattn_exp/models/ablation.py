"""Prompt ablations (prompt.ablation; issue 21, the study's check 2: is the system span
redundant, or does it do work?). Each removes part of the system span of docs/design.md
section 2 (attention/modality.py) from the model's input:

- no-system-prompt: the prompt rendered without a system message, as model.system_prompt=""
  renders it (prompts.PromptFormat.render): a change of the prompt's text.
- no-bos: the tokenized prompt without its first token where that token is the
  tokenizer's BOS, whoever put it there (the tokenizer's post-processor, LLaVA's
  Llama tokenizer; or the chat template's text, Gemma's, Llama 3's, Idefics3's). A prompt
  that does not start with BOS (Qwen's and InternVL's templates have none) is left as it
  is: the ablation then equals none (a no-op, said by the dry run; not an error, so that
  one sweep runs it over every family).
- no-system: every system token removed: the sequence starts at the first image token (or,
  without an image, at the question's first token): BOS, system prompt, role markers and
  wrappers before the image (<|vision_start|>, <img>, <fake_token_around_image>) all gone.

no-bos and no-system remove a leading span of the token ids (first_kept); the model reads
what is left as a shorter prompt, with positions from 0 at its first token.
"""

import re

import torch

from sysattn_exp.attention.modality import modality_counts, modality_ids
from sysattn_exp.models.loading import tokenizer_of
from sysattn_exp.models.prompts import question_token_start, text_kwargs

NONE = "none"
NO_SYSTEM_PROMPT = "no-system-prompt"
NO_BOS = "no-bos"
NO_SYSTEM = "no-system"
ABLATIONS = (NONE, NO_SYSTEM_PROMPT, NO_BOS, NO_SYSTEM)
# The report's intervention column (job.label), next to the rules' labels.
LABELS = {
    NO_SYSTEM_PROMPT: "no system prompt",
    NO_BOS: "no BOS",
    NO_SYSTEM: "no system tokens",
}


def system_prompt(ablation: str, configured: str | None) -> str | None:
    """The system prompt to render with: "" (none) under no-system-prompt, else as
    configured (model.system_prompt; None: the template's default)."""
    return "" if ablation == NO_SYSTEM_PROMPT else configured


def first_kept(
    ids: list[int], ablation: str, image_token_id: int | None, text_start: int, bos_id
) -> int:
    """The index of the first token of `ids` (one tokenized prompt, no padding) that the
    ablation keeps: ids[first_kept(...):] is the ablated prompt. `text_start`: where the
    question starts in a prompt without an image (prompts.question_token_start; unused
    with an image token in `ids`); `bos_id`: the tokenizer's BOS id (None: it has none)."""
    if ablation == NO_BOS:
        return 1 if bos_id is not None and ids and ids[0] == bos_id else 0
    if ablation == NO_SYSTEM:
        if image_token_id is not None and image_token_id in ids:
            return ids.index(image_token_id)
        return text_start
    return 0


def label(ablation: str, rule_label: str) -> str:
    """The job's label: the rule's (rules.label), the ablation's before it where one is set
    ('no system tokens', 'no BOS + system->text')."""
    if ablation == NONE:
        return rule_label
    return LABELS[ablation] if rule_label == "baseline" else f"{LABELS[ablation]} + {rule_label}"


def shown_tokens(tokens: list[str], image_token: str | None) -> str:
    """Tokens as one line, runs of the image token collapsed ('<image> x576')."""
    text = " ".join(repr(t) for t in tokens)
    if image_token is None:
        return text
    token = re.escape(repr(image_token))
    return re.sub(
        rf"{token}(?: {token})+", lambda m: f"{repr(image_token)} x{m[0].count(' ') + 1}", text
    )


def ablated_tokens(processor, image_token_id, image, prompt: str, question: str, ablation: str):
    """One prompt tokenized as scoring encodes it (its image, if any, expanded by the
    processor), then ablated: (removed token strings, kept token strings, the kept
    sequence's system / image / text counts by attention.modality's rule)."""
    tokenizer = tokenizer_of(processor)
    if image is None:
        ids = tokenizer(prompt, **text_kwargs(tokenizer, prompt)).input_ids
        text_start = question_token_start(tokenizer, prompt, question)
    else:
        ids = processor(images=[[image]], text=[prompt], **text_kwargs(tokenizer, prompt))
        ids, text_start = list(ids["input_ids"][0]), 0
    ids = [int(i) for i in ids]
    start = first_kept(ids, ablation, image_token_id, text_start, tokenizer.bos_token_id)
    kept = torch.tensor([ids[start:]])
    split = modality_ids(
        kept,
        torch.ones_like(kept),
        image_token_id if image is not None else None,
        torch.tensor([text_start - start]) if image is None else None,
    )
    strings = tokenizer.convert_ids_to_tokens(ids)
    return strings[:start], strings[start:], modality_counts(split[0])
