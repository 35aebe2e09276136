"""Answers by generation (scoring.mode=generate): greedy decoding with the intervention
active at every step, over the same batches and shared image prefixes as scoring.py.

A hand loop, not model.generate(): the attention rule needs every forward call's
key_modality (B, K), which grows by one TEXT column per step, and generate() has no way
to extend a custom keyword argument per step (it would pass the prompt's (B, P) ids to
every step, and the rule would read the wrong modality for the new keys). The loop is
short: prefix pass, question pass (scoring.prefill, which scoring runs too, so the first
step's logits are the logit mode's), then one forward per new token with the KV
cache, which holds the edited prefix.

Every decoding row is a text query, so the rules apply to it as to the question's rows.
PAI: its "answer row" is the last real position of each sequence (modality.answer_rows),
which during decoding is the new token's row. So PAI edits the last question token and
then every decoding query, as the PAI paper applies it to every generated token; the
prefix and question rows before the last are left alone.

Rows that have finished (EOS, or max_new_tokens) keep stepping with the pad token, so
the batch keeps one shape; what they produce after their end is dropped.
"""

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from sysattn_exp.attention.modality import TEXT
from sysattn_exp.attention.rules import Rule
from sysattn_exp.errors import UsageError
from sysattn_exp.evaluation.progress import Progress
from sysattn_exp.evaluation.scoring import (
    CACHE_ARG,
    BatchEncoder,
    Prefill,
    answer_reader,
    answer_scores,
    encode_full_prompts,
    keep_batch,
    plan_batches,
    prefill,
    rule_pass,
    warn_if_unscored,
)
from sysattn_exp.models.loading import LoadedModel

if TYPE_CHECKING:  # the benchmarks package needs omegaconf and pandas; scoring does not
    from sysattn_exp.benchmarks import Benchmark


def stop_ids(loaded: LoadedModel) -> set[int]:
    """Token ids that end an answer: the tokenizer's EOS and the generation config's (an
    int or a list; chat models such as Qwen2-VL list their end-of-turn token there)."""
    ids = {loaded.tokenizer.eos_token_id}
    config_ids = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    ids |= set(config_ids) if isinstance(config_ids, list) else {config_ids}
    return {i for i in ids if i is not None}


@torch.inference_mode()
def decode(
    loaded: LoadedModel, start: Prefill, edit: Rule | None, max_new_tokens: int
) -> list[list[int]]:
    """Greedy decoding from a prefilled batch (scoring.prefill): each row's new token ids,
    up to and without its first stop token, at most max_new_tokens."""
    if max_new_tokens < 1:  # the job checks scoring.max_new_tokens before the model loads
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    language_model, device = loaded.model.model, loaded.device
    stop_set = stop_ids(loaded)
    cache, logits = start.cache, start.logits
    # The tokens and stop flags live with the logits, on the output head's device (under a
    # device_map not the inputs' device); each new token goes back to the inputs' device.
    head_device = logits.device
    stops = torch.tensor(sorted(stop_set), device=head_device)
    pad = loaded.tokenizer.pad_token_id or 0
    mask, modality, position = start.attention_mask, start.key_modality, start.next_position
    rows = len(position)
    tokens = torch.empty(rows, 0, dtype=torch.long, device=head_device)
    finished = torch.zeros(rows, dtype=torch.bool, device=head_device)
    for step in range(max_new_tokens):
        token = logits.argmax(dim=-1).masked_fill(finished, pad)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        finished |= torch.isin(token, stops)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        # The new token is a real text key for every row (a finished row's pad included:
        # its outputs are dropped, and rows never see each other).
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        modality = torch.cat([modality, torch.full_like(modality[:, :1], TEXT)], dim=1)
        positions = position[:, None]
        if start.rope_axes:  # text continues all three axes alike (as after the image)
            positions = positions.expand(start.rope_axes, rows, 1)
        with answer_reader(loaded) as read:
            out = rule_pass(
                language_model,
                edit,
                None,
                modality,
                input_ids=token[:, None].to(device),
                attention_mask=mask,
                position_ids=positions,
                **{CACHE_ARG: cache},
            )
            logits = read(out.last_hidden_state)
        cache = getattr(out, CACHE_ARG)
        position = position + 1
    return [until_stop(row, stop_set) for row in tokens.tolist()]


def until_stop(ids: list[int], stops: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i]
    return ids


def texts_of(loaded: LoadedModel, ids: list[list[int]]) -> list[str]:
    return loaded.tokenizer.batch_decode(ids, skip_special_tokens=True)


@torch.inference_mode()
def generate_in_batches(
    loaded: LoadedModel,
    images,
    prompts: list[str],
    edit,
    max_new_tokens: int,
    batch_size: int,
    progress_seconds: float = 60.0,
) -> list[str]:
    """generate_full_prompts over batches of `batch_size` prompts (images: any sequence that
    can be sliced, decoded as it is)."""
    texts = []
    progress = Progress("generate", len(prompts), progress_seconds)
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        texts += generate_full_prompts(
            loaded, list(images[chunk]), prompts[chunk], edit, max_new_tokens
        )
        progress.update(len(prompts[chunk]))
    progress.close()
    return texts


def generate_full_prompts(
    loaded: LoadedModel,
    images: list,
    prompts: list[str],
    edit: Rule | None,
    max_new_tokens: int,
    questions: list[str] | None = None,
) -> list[str]:
    """Greedy answers to whole prompts (left-padded together, no prefix sharing): the
    plain path, e.g. for captions, where each prompt has its own image. An image of None:
    the prompt has none, and `questions` gives its question (where its text starts)."""
    inputs, key_modality = encode_full_prompts(loaded, images, prompts, questions)
    with answer_reader(loaded) as read:
        out = rule_pass(loaded.model.model, edit, None, key_modality, **inputs)
        logits = read(out.last_hidden_state)
    positions = inputs["position_ids"]
    last = positions.amax(dim=-1)
    rope_axes = 0
    if last.dim() == 2:
        last, rope_axes = last.amax(dim=0), positions.shape[0]
    start = Prefill(
        cache=getattr(out, CACHE_ARG),
        logits=logits,
        attention_mask=inputs["attention_mask"],
        key_modality=key_modality,
        next_position=last + 1,
        rope_axes=rope_axes,
    )
    return texts_of(loaded, decode(loaded, start, edit, max_new_tokens))


@dataclass
class Generations:
    texts: list[str]  # per item, benchmark order: the generated text, special tokens skipped
    tokens: list[list[int]]  # the generated token ids, without the stop token
    yes: list[float]  # the first step's yes_logit, no_logit and p_yes (as the logit mode's)
    no: list[float]
    p_yes: list[float]
    seconds: float  # wall time of the loop
    new_tokens: int  # tokens generated (up to and without each row's stop token)
    computed: int  # items generated (all: generation bypasses the score cache)


def generate_items(
    loaded: LoadedModel,
    benchmark: "Benchmark",
    prompts: list[str],
    edit: Rule | None,
    max_new_tokens: int,
    batch_size: int,
    num_workers: int,
    desc: str,
    words: tuple[list[int], list[int]] = ([], []),
    progress_seconds: float = 60.0,
    ablation: str = "none",
) -> Generations:
    """Greedy answers to every item, batched and prefix-shared as score_items scores them
    (images decoded in DataLoader workers; `ablation`, models.ablation, shortens each
    tokenized prompt as there). With `words` (yes and no first-token ids), the
    first step's logits also give each item's yes/no scores; without, those are NaN.
    Without a terminal, progress is logged every `progress_seconds` (cluster.Progress)."""
    if edit is not None and edit.guidance is not None:
        raise UsageError(
            f"scoring.mode=generate does not support the guidance of {edit.describe()} (a "
            "second pass over the prompt without its image); use scoring.mode=logit"
        )
    plan = plan_batches([item.image_id for item in benchmark.items], batch_size)
    loader = DataLoader(
        BatchEncoder(benchmark, prompts, plan, loaded, ablation=ablation),
        batch_size=None,
        collate_fn=keep_batch,
        num_workers=num_workers,
    )
    n = len(prompts)
    texts, tokens = [""] * n, [[] for _ in range(n)]
    yes, no, p_yes = [float("nan")] * n, [float("nan")] * n, [float("nan")] * n
    new_tokens, started = 0, time.perf_counter()
    progress = Progress(desc, n, progress_seconds)
    for index, batch in enumerate(loader):
        if isinstance(batch, UsageError):
            raise batch
        begun = prefill(loaded, batch, edit)
        if index == 0 and all(words):  # the first batch: the answer tokens' check
            warn_if_unscored(loaded.tokenizer, begun.logits, *words)
        ids = decode(loaded, begun, edit, max_new_tokens)
        new_tokens += sum(len(row) for row in ids)
        scores = answer_scores(begun.logits, *words) if all(words) else None
        for row, (j, text) in enumerate(zip(batch.items, texts_of(loaded, ids), strict=True)):
            texts[j], tokens[j] = text, ids[row]
            if scores is not None:
                yes[j], no[j], p_yes[j] = (float(s[row]) for s in scores)
        progress.update(len(batch.items))
    progress.close()
    seconds = time.perf_counter() - started
    return Generations(texts, tokens, yes, no, p_yes, seconds, new_tokens, n)
