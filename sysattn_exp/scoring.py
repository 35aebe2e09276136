"""Batched yes/no scoring: one forward pass per batch, logits at the last position only.

Items that share an image share the forward pass over the prompt prefix (BOS, system
prompt, "USER: ", the image tokens): it runs once per image, vision tower included, and
its KV cache serves every question about that image, so only the question tokens run per
item. This is exact for every intervention: attention is causal and the rule acts per
query row, so no prefix row depends on the question. Images are decoded and preprocessed
in DataLoader workers while the model runs.
"""

import inspect
import math
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from transformers import LlavaModel

from sysattn_exp.benchmarks import Benchmark
from sysattn_exp.cache import ScoreCache, item_key
from sysattn_exp.errors import UsageError
from sysattn_exp.intervention import Edit
from sysattn_exp.modality import PAD, SYSTEM, TEXT, modality_ids
from sysattn_exp.models import LoadedModel, question_token_start

# transformers renamed the forward argument (and output) past_key_values to cache during
# 5.x; use whichever this version has, so that neither a deprecation warning nor a silently
# ignored argument results.
CACHE_ARG = (
    "cache" if "cache" in inspect.signature(LlavaModel.forward).parameters else "past_key_values"
)


def plan_batches(image_ids: list[str | None], batch_size: int) -> list[list[int]]:
    """Item indices in batches of at most `batch_size`, keeping the items of one image
    together (in order of first appearance) unless one image alone has more. Questions
    without an image (id None) come last, in batches of their own."""
    by_image: dict[str | None, list[int]] = {}
    for index, image_id in enumerate(image_ids):
        by_image.setdefault(image_id, []).append(index)
    no_image = by_image.pop(None, [])
    batches, current = [], []
    for indices in by_image.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            if len(current) + len(chunk) > batch_size:
                batches.append(current)
                current = []
            current = current + chunk
    batches += [current] if current else []
    return batches + [no_image[i : i + batch_size] for i in range(0, len(no_image), batch_size)]


@dataclass
class EncodedBatch:
    items: list[int]  # benchmark item indices, in the order of the rows below
    pixel_values: torch.Tensor | None  # (U, 3, H, W): one per prefix; None without images
    prefix_ids: torch.Tensor  # (U, P): the shared start of the prompts (see BatchEncoder)
    question_ids: torch.Tensor  # (B, Q): the rest of each prompt, right-padded
    question_mask: torch.Tensor  # (B, Q)
    image_row: torch.Tensor  # (B,): each item's row in pixel_values / prefix_ids
    # For PAI's guidance only: each prompt without its image, left-padded (B, T).
    text_only_ids: torch.Tensor | None = None
    text_only_mask: torch.Tensor | None = None


class BatchEncoder(Dataset):
    """Batch i of the plan, tokenized exactly as the processor would tokenize each whole
    prompt, then split in two: the prefix, run once and shared, and the question rows.
    With an image the split is after its last image token, and each distinct image is
    decoded and preprocessed once. Without an image (all or none of a batch's items have
    one) the split is before the first token of the question: the prefix is the system
    part (BOS, system prompt, "USER:"), the same for every question."""

    def __init__(self, benchmark: Benchmark, prompts: list[str], plan, processor, text_only=False):
        self.benchmark, self.prompts, self.plan, self.processor = (
            benchmark,
            prompts,
            plan,
            processor,
        )
        self.text_only = text_only

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> EncodedBatch | UsageError:
        # Bad data travels back as a value: re-raised by a DataLoader worker, the error's
        # one-line message would come wrapped in a traceback.
        try:
            return self.encode(i)
        except UsageError as error:
            return error

    def encode(self, i: int) -> EncodedBatch:
        by_image: dict[str | None, list[int]] = {}
        for j in self.plan[i]:
            by_image.setdefault(self.benchmark.items[j].image_id, []).append(j)
        if None in by_image and len(by_image) > 1:
            raise ValueError("a batch mixes questions with and without an image")
        pixels, rows, questions, order, image_row = [], {}, [], [], []
        for image_id, mine in by_image.items():
            if image_id is None:
                split = [self.split_at_question(self.prompts[j]) for j in mine]
            else:
                pixel_values, n_image = self.preprocess(image_id, self.prompts[mine[0]])
                split = [self.split_prompt(self.prompts[j], n_image) for j in mine]
            for j, (prefix, question) in zip(mine, split, strict=True):
                if (image_id, tuple(prefix)) not in rows:  # a new prefix row
                    rows[(image_id, tuple(prefix))] = len(rows)
                    pixels += [] if image_id is None else [pixel_values]
                image_row.append(rows[(image_id, tuple(prefix))])
                questions.append(question)
                order.append(j)
        prefixes = [list(prefix) for _, prefix in rows]
        if len({len(prefix) for prefix in prefixes}) > 1:
            raise ValueError(
                "prompt prefixes of different lengths in one batch: "
                "every item needs the same system prompt and image size"
            )
        q_len = max(len(q) for q in questions)
        # Right padding after the cached prefix: the id is never attended to, any will do.
        pad = self.processor.tokenizer.pad_token_id or 0
        text_only = self.without_images(order) if self.text_only else {}
        return EncodedBatch(
            **text_only,
            items=order,
            pixel_values=torch.stack(pixels) if pixels else None,
            prefix_ids=torch.tensor(prefixes),
            question_ids=torch.tensor([q + [pad] * (q_len - len(q)) for q in questions]),
            question_mask=torch.tensor([[1] * len(q) + [0] * (q_len - len(q)) for q in questions]),
            image_row=torch.tensor(image_row),
        )

    def preprocess(self, image_id: str, prompt: str) -> tuple[torch.Tensor, int]:
        """The image's pixel values, and how many tokens the processor expands it to."""
        image = self.benchmark.load_image(image_id)
        inputs = self.processor(images=[image], text=[prompt], return_tensors="pt")
        return inputs["pixel_values"][0], int(
            (inputs["input_ids"] == self.processor.image_token_id).sum()
        )

    def without_images(self, order: list[int]) -> dict:
        """Each prompt with its image removed, left-padded: PAI's unconditional input."""
        token = self.processor.image_token
        plain = [self.prompts[j].replace(token + "\n", "").replace(token, "") for j in order]
        encoded = self.processor.tokenizer(plain, padding=True, return_tensors="pt")
        return {"text_only_ids": encoded["input_ids"], "text_only_mask": encoded["attention_mask"]}

    def split_prompt(self, prompt: str, n_image: int) -> tuple[list[int], list[int]]:
        """Token ids of `prompt` with its image expanded to `n_image` tokens (what the
        processor does), split after the last image token."""
        token = self.processor.image_token
        ids = self.processor.tokenizer(prompt.replace(token, token * n_image)).input_ids
        last = max(i for i, t in enumerate(ids) if t == self.processor.image_token_id)
        if last == len(ids) - 1:
            raise ValueError(f"prompt {prompt!r} has no text after the image")
        return ids[: last + 1], ids[last + 1 :]

    def split_at_question(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids of a prompt without an image, split before its question."""
        ids = self.processor.tokenizer(prompt).input_ids
        start = question_token_start(self.processor.tokenizer, prompt)
        return ids[:start], ids[start:]


@torch.inference_mode()
def score_batch(
    loaded: LoadedModel, batch: EncodedBatch, edit: Edit | None, yes_ids, no_ids, profile=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(yes_logit, no_logit) per item: log-sum-exp of the yes / no word logits."""
    device, model = loaded.device, loaded.model
    prefix_ids = batch.prefix_ids.to(device)
    if batch.pixel_values is None:  # the system part of prompts without an image
        prefix_modality, pixel_values = torch.full_like(prefix_ids, SYSTEM), None
    else:
        prefix_modality = modality_ids(
            prefix_ids, torch.ones_like(prefix_ids), loaded.image_token_id, loaded.image_seq_length
        )
        pixel_values = batch.pixel_values.to(device, loaded.dtype)
    prefix = model.model(
        input_ids=prefix_ids,
        pixel_values=pixel_values,
        use_cache=True,
        key_modality=prefix_modality,
        attention_edit=edit,
        attention_profile=profile,
    )
    cache, rows = getattr(prefix, CACHE_ARG), batch.image_row.to(device)
    cache.batch_select_indices(rows)
    question_ids, question_mask = batch.question_ids.to(device), batch.question_mask.to(device)
    p_len, q_len = prefix_ids.shape[1], question_ids.shape[1]
    hidden = model.model(
        input_ids=question_ids,
        attention_mask=torch.cat([torch.ones_like(prefix_ids[rows]), question_mask], dim=1),
        position_ids=(p_len + torch.arange(q_len, device=device)).expand_as(question_ids),
        **{CACHE_ARG: cache},
        use_cache=True,
        key_modality=torch.cat(
            [prefix_modality[rows], torch.where(question_mask.bool(), TEXT, PAD)], dim=1
        ),
        attention_edit=edit,
        attention_profile=profile,
    ).last_hidden_state
    last_token = hidden[torch.arange(len(rows), device=device), question_mask.sum(1) - 1]
    logits = model.lm_head(last_token).float()
    if edit is not None and edit.kind == "pai" and edit.cfg_gamma is not None:
        logits = guided(logits, text_only_logits(loaded, batch), edit.cfg_gamma)
    return logits[:, yes_ids].logsumexp(dim=-1), logits[:, no_ids].logsumexp(dim=-1)


def text_only_logits(loaded: LoadedModel, batch: EncodedBatch) -> torch.Tensor:
    """Last-position logits of the prompts without their image, with the model unchanged."""
    ids, mask = batch.text_only_ids.to(loaded.device), batch.text_only_mask.to(loaded.device)
    return (
        loaded.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=left_padded_position_ids(mask),
            logits_to_keep=1,
        )
        .logits[:, -1]
        .float()
    )


def guided(conditional: torch.Tensor, unconditional: torch.Tensor, gamma: float) -> torch.Tensor:
    """PAI's classifier-free guidance (its CFGLogits): on log-probabilities,
    gamma (cond - uncond) + uncond, keeping only tokens within a factor 10 of the most
    likely conditional one (the others become -inf)."""
    cond, uncond = conditional.log_softmax(dim=-1), unconditional.log_softmax(dim=-1)
    cutoff = math.log(0.1) + cond.max(dim=-1, keepdim=True).values
    return (gamma * (cond - uncond) + uncond).masked_fill(cond < cutoff, -math.inf)


def left_padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as generate() does; a plain
    forward would number left padding as positions and shift every row's RoPE phase."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp_min(0)


def encode_full_prompts(loaded: LoadedModel, images: list, prompts: list[str]):
    """Processor inputs for whole prompts (left-padded, on the model's device and dtype) and
    their (B, N) modality ids. An image of None: the prompt has no image."""
    present = [image for image in images if image is not None]
    inputs = loaded.processor(
        images=present or None, text=prompts, padding=True, return_tensors="pt"
    ).to(loaded.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    tokenizer = loaded.processor.tokenizer
    starts = [
        0 if image is not None else question_token_start(tokenizer, p)
        for image, p in zip(images, prompts, strict=True)
    ]
    # Left padding shifts each row's question start by its number of pad positions.
    text_start = torch.tensor(starts, device=ids.device) + (mask == 0).sum(dim=1)
    key_modality = modality_ids(
        ids, mask, loaded.image_token_id, loaded.image_seq_length, text_start=text_start
    )
    return inputs, key_modality


@torch.inference_mode()
def score_full_prompts(
    loaded: LoadedModel,
    images: list,
    prompts: list[str],
    edit: Edit | None,
    yes_ids,
    no_ids,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scores without prefix sharing: whole prompts, left-padded, one forward.
    Kept as the plain path that prefix sharing is checked and benchmarked against."""
    inputs, key_modality = encode_full_prompts(loaded, images, prompts)
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


def keep_batch(batch):
    """DataLoader collate: a batch is already built by BatchEncoder."""
    return batch


@dataclass
class Scores:
    yes: list[float]  # per item, benchmark order
    no: list[float]
    seconds: float  # wall time of the scoring loop
    computed: int  # items scored now (the rest came from the cache)


def score_items(
    loaded: LoadedModel,
    benchmark: Benchmark,
    prompts: list[str],
    edit: Edit | None,
    words: tuple[list[int], list[int]],
    batch_size: int,
    num_workers: int,
    desc: str,
    cache: ScoreCache | None = None,
    profile=None,
) -> Scores:
    """yes and no logits of every item. With a cache, batches whose items are all in it are
    taken from it (a batch is always computed whole, so a resumed run scores every item in
    the same company as an uninterrupted one) and each new batch is saved as it is done.
    A profile (sysattn_exp.profile) records where attention goes; it needs every batch run."""
    keys = [
        item_key(benchmark.name, item.item_id, item.image_id, prompt)
        for item, prompt in zip(benchmark.items, prompts, strict=True)
    ]
    done = cache.load() if cache else {}
    plan = plan_batches([item.image_id for item in benchmark.items], batch_size)
    todo = [batch for batch in plan if not all(keys[j] in done for j in batch)]
    guidance = edit is not None and edit.kind == "pai" and edit.cfg_gamma is not None
    loader = DataLoader(
        BatchEncoder(benchmark, prompts, todo, loaded.processor, text_only=guidance),
        batch_size=None,
        collate_fn=keep_batch,
        num_workers=num_workers if todo else 0,
    )
    started = time.perf_counter()
    for batch in tqdm(loader, desc=desc, unit="batch", disable=None):
        if isinstance(batch, UsageError):
            raise batch
        yes, no = score_batch(loaded, batch, edit, *words, profile=profile)
        batch_keys = [keys[j] for j in batch.items]
        if cache:
            cache.save(batch_keys, yes.tolist(), no.tolist())
        done.update(zip(batch_keys, zip(yes.tolist(), no.tolist(), strict=True), strict=True))
    seconds = time.perf_counter() - started
    return Scores(
        yes=[done[k][0] for k in keys],
        no=[done[k][1] for k in keys],
        seconds=seconds,
        computed=sum(len(batch) for batch in todo),
    )
