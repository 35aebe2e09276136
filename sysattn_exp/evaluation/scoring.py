"""Batched yes/no scoring: one forward pass per batch, logits at the last position only.

Items that share a prompt prefix share the forward pass over it: with an image, the prefix
is everything up to its last image token (BOS, system prompt, role markers, the image), run
once per image, vision tower included; without one, it is the system part before the
question. Its KV cache serves every question with that prefix, so only the question tokens
run per item. This is exact for every intervention: attention is causal after the prefix
and the rule acts per query row, so no prefix row depends on the question. Prefixes of
different lengths (any-res images, different system prompts) are left-padded, and the
question rows continue each row's own positions (1-D, or Qwen2-VL's 3-D multimodal RoPE).
Images are decoded and preprocessed in DataLoader workers while the model runs.
"""

import inspect
import logging
import math
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from transformers import LlavaModel

from sysattn_exp.attention import kernels
from sysattn_exp.attention.modality import PAD, SYSTEM, TEXT, modality_ids
from sysattn_exp.attention.rules import Rule
from sysattn_exp.errors import UsageError
from sysattn_exp.evaluation.cache import ScoreCache, item_key
from sysattn_exp.evaluation.progress import Progress
from sysattn_exp.models.ablation import NONE, first_kept
from sysattn_exp.models.loading import LoadedModel, tokenizer_of
from sysattn_exp.models.prompts import question_token_start, text_kwargs

if TYPE_CHECKING:  # the benchmarks package needs omegaconf and pandas; scoring does not
    from sysattn_exp.benchmarks import Benchmark

log = logging.getLogger(__name__)

# transformers renamed the forward argument (and output) past_key_values to cache during
# 5.x; use whichever this version has, so that neither a deprecation warning nor a silently
# ignored argument results.
CACHE_ARG = (
    "cache" if "cache" in inspect.signature(LlavaModel.forward).parameters else "past_key_values"
)
# Processor outputs that are per token, not per image: rebuilt for whatever ids are run.
TOKEN_KEYS = {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"}
# Rows of the output head cast to float32 at a time: 8,192 x 8,192 x 4 bytes = 256 MiB at
# most (a 72B model's hidden size), for any vocabulary.
HEAD_CHUNK = 8192


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
    prefix_ids: torch.Tensor  # (U, P): the shared starts of the prompts, left-padded
    prefix_mask: torch.Tensor  # (U, P)
    question_ids: torch.Tensor  # (B, Q): the rest of each prompt, right-padded
    question_mask: torch.Tensor  # (B, Q)
    image_row: torch.Tensor  # (B,): each item's prefix row
    # The processor's per-image inputs for the prefix rows (pixel_values, image_sizes,
    # image_grid_thw, pixel_attention_mask...); empty without images.
    vision: dict = field(default_factory=dict)
    # For PAI's guidance only: each prompt without its image, left-padded (B, T).
    text_only_ids: torch.Tensor | None = None
    text_only_mask: torch.Tensor | None = None


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    # dtype given: rows all empty (no-system without an image) make a (U, 0) tensor
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


class BatchEncoder(Dataset):
    """Batch i of the plan, tokenized exactly as the processor tokenizes each whole prompt,
    then split in two: the prefix, run once per distinct prefix, and the question rows.
    With an image the split is after its last image token; without one (all or none of a
    batch's items have one) before the first token of the question. `plain_prompts`, for
    PAI's guidance, are the prompts rendered without their image. `ablation` (no-bos,
    no-system: models.ablation) removes a leading span of each prompt's tokens before the
    split: under no-system the prefix is the image alone, or empty without an image."""

    def __init__(
        self,
        benchmark: "Benchmark",
        prompts,
        plan,
        loaded: LoadedModel,
        plain_prompts=None,
        ablation: str = NONE,
    ):
        # Only the processor and the image token's id travel to the workers, not the model.
        self.benchmark, self.prompts, self.plan = benchmark, prompts, plan
        self.processor, self.image_token_id = loaded.processor, loaded.image_token_id
        self.tokenizer, self.plain_prompts = tokenizer_of(loaded.processor), plain_prompts
        self.ablation = ablation

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
        order = self.plan[i]
        image_ids = [self.benchmark.items[j].image_id for j in order]
        with_image = [image_id is not None for image_id in image_ids]
        if any(with_image) and not all(with_image):
            raise ValueError("a batch mixes questions with and without an image")
        images = {}
        if all(with_image):
            images = {k: self.benchmark.load_image(k) for k in dict.fromkeys(image_ids)}
            splits = self.split_at_image(order, image_ids, images)
        else:
            splits = [self.split_at_question(j) for j in order]
        rows: dict[tuple, int] = {}  # (image id, prefix ids) -> prefix row
        representative = []  # per prefix row: an item whose prompt starts with it
        for j, image_id, (prefix, _) in zip(order, image_ids, splits, strict=True):
            if (image_id, tuple(prefix)) not in rows:
                rows[(image_id, tuple(prefix))] = len(rows)
                representative.append((j, image_id))
        # Left padding before a prefix and right padding after a question are never
        # attended to, so any id will do.
        pad = self.tokenizer.pad_token_id or 0
        prefix_ids, prefix_mask = left_pad([list(prefix) for _, prefix in rows], pad)
        question_ids, question_mask = right_pad([question for _, question in splits], pad)
        keys = zip(image_ids, [tuple(prefix) for prefix, _ in splits], strict=True)
        image_row = [rows[key] for key in keys]
        return EncodedBatch(
            items=order,
            prefix_ids=prefix_ids,
            prefix_mask=prefix_mask,
            question_ids=question_ids,
            question_mask=question_mask,
            image_row=torch.tensor(image_row),
            vision=self.vision_inputs(representative, images) if images else {},
            **(self.without_images(order) if self.plain_prompts else {}),
        )

    def split_at_image(self, order, image_ids, images) -> list[tuple[list[int], list[int]]]:
        """Each prompt's token ids with its image expanded by the processor, split after
        the last image token."""
        splits = []
        for j, image_id in zip(order, image_ids, strict=True):
            prompt = self.prompts[j]
            ids = self.processor(
                images=[images[image_id]], text=[prompt], **text_kwargs(self.tokenizer, prompt)
            )["input_ids"][0]
            ids = list(ids)
            ids = ids[self.kept(ids, 0) :]
            image_positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
            if not image_positions:
                raise ValueError(f"prompt {prompt!r} has no image placeholder")
            last = image_positions[-1]
            if last == len(ids) - 1:
                raise ValueError(f"prompt {prompt!r} has no text after the image")
            splits.append((ids[: last + 1], ids[last + 1 :]))
        return splits

    def split_at_question(self, j: int) -> tuple[list[int], list[int]]:
        """Token ids of a prompt without an image, split before its question."""
        prompt = self.prompts[j]
        question = self.benchmark.question_text(self.benchmark.items[j])
        ids = self.tokenizer(prompt, **text_kwargs(self.tokenizer, prompt)).input_ids
        start = question_token_start(self.tokenizer, prompt, question)
        kept = self.kept(ids, start)
        return ids[kept:start], ids[start:]

    def kept(self, ids: list[int], text_start: int) -> int:
        """The index of the first token the ablation keeps (ablation.first_kept)."""
        bos = self.tokenizer.bos_token_id
        return first_kept(ids, self.ablation, self.image_token_id, text_start, bos)

    def vision_inputs(self, representative, images) -> dict:
        """The processor's per-image inputs for the prefix rows, batched (and padded where
        images differ in size) the family's own way."""
        prompts = [self.prompts[j] for j, _ in representative]
        inputs = self.processor(
            images=[[images[image_id]] for _, image_id in representative],  # one per prompt
            text=prompts,
            padding=True,
            return_tensors="pt",
            **text_kwargs(self.tokenizer, prompts[0]),
        )
        return {k: v for k, v in inputs.items() if k not in TOKEN_KEYS}

    def without_images(self, order: list[int]) -> dict:
        """Each prompt rendered without its image, left-padded: PAI's unconditional input."""
        plain = [self.plain_prompts[j] for j in order]
        encoded = self.tokenizer(
            plain, padding=True, return_tensors="pt", **text_kwargs(self.tokenizer, plain[0])
        )
        return {"text_only_ids": encoded["input_ids"], "text_only_mask": encoded["attention_mask"]}


def token_types(loaded: LoadedModel, input_ids: torch.Tensor) -> dict:
    """What a family's forward needs to tell image tokens apart (Gemma 3: token_type_ids,
    for the bidirectional image block; Qwen2-VL: mm_token_type_ids, for its positions)."""
    parameters = inspect.signature(loaded.model.model.forward).parameters
    is_image = (input_ids == loaded.image_token_id).long()
    return {
        name: is_image for name in ("token_type_ids", "mm_token_type_ids") if name in parameters
    }


def position_ids(loaded: LoadedModel, input_ids, attention_mask, vision: dict) -> torch.Tensor:
    """Positions of left-padded rows, counted from each row's first real token (as
    generate() does): (B, N), or Qwen2-VL's (3, B, N) multimodal RoPE positions, which
    number an image by its grid."""
    rope_index = getattr(loaded.model.model, "get_rope_index", None)
    if rope_index is not None and "image_grid_thw" in vision:
        positions, _ = rope_index(
            input_ids,
            mm_token_type_ids=(input_ids == loaded.image_token_id).int(),
            image_grid_thw=vision["image_grid_thw"],
            attention_mask=attention_mask,
        )
        return positions
    positions = left_padded_position_ids(attention_mask)
    if rope_index is not None:  # a text-only prompt: the same 1-D position on all 3 axes
        return positions.expand(3, *positions.shape)
    return positions


def following_positions(positions: torch.Tensor, rows: torch.Tensor, q_len: int) -> torch.Tensor:
    """Positions of q_len tokens after each prefix row `rows` picks: one past the prefix's
    largest position (Qwen2-VL numbers text after an image that way too)."""
    last = positions.amax(dim=-1)  # (U,) or (3, U)
    if last.dim() == 2:
        last = last.amax(dim=0)
    following = last[rows, None] + 1 + torch.arange(q_len, device=positions.device)
    return following.expand(3, *following.shape) if positions.dim() == 3 else following


def final_norm(loaded: LoadedModel) -> torch.nn.Module | None:
    """The language model's final norm, whose output is its last_hidden_state (every
    supported family names it `norm`); None for a text-only model that names it otherwise."""
    return getattr(loaded.model.get_decoder(), "norm", None)


@contextmanager
def answer_reader(loaded: LoadedModel):
    """For the language model forwards run inside: yields read(hidden, last) -> (B, V)
    float32 logits at positions `last` (B,) (None: the last) of `hidden`, the forward's
    last_hidden_state (B, N, H).

    The answer is read in float32 (answer_logits) from the final norm's input, captured by
    a hook: the residual stream before the norm, in the model's dtype. Without a final
    norm found, it is read from last_hidden_state (the norm's output, already rounded to
    the model's dtype). Indices are made on the indexed tensor's device (under a
    device_map the last layer, norm and head may sit on other devices than the inputs)."""
    norm, captured = final_norm(loaded), {}

    def keep_input(module, args, output):
        if args[0].dim() == 3:  # a forward's (B, N, H), not read's own (B, H) rows
            captured["states"] = args[0]

    handle = norm.register_forward_hook(keep_input) if norm is not None else None

    def read(hidden: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        states = captured.pop("states", hidden)
        if last is None:
            rows = states[:, -1]
        else:
            rows = states[torch.arange(len(last), device=states.device), last.to(states.device)]
        if states is not hidden:
            rows = float32_module(norm, rows)
        return answer_logits(loaded, rows)

    try:
        yield read
    finally:
        if handle is not None:
            handle.remove()


@contextmanager
def decoder_outputs(loaded: LoadedModel, on: bool):
    """For the language model forward run inside (on=True): yields the list that each
    decoder layer's output hidden states (B, N, H), the residual stream after it, are
    appended to in layer order (the logit lens's readings); on=False: None, no hooks."""
    if not on:
        yield None
        return
    outputs: list[torch.Tensor] = []

    def keep(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(keep) for layer in loaded.model.get_decoder().layers]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def float32_module(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module` (a norm: a few parameters) applied in float32 to x, on its device: its own
    code, its parameters cast for this call only."""
    parameters = {name: p.float() for name, p in module.named_parameters()}
    device = next(iter(parameters.values())).device if parameters else x.device
    return torch.func.functional_call(module, parameters, (x.to(device, torch.float32),))


def answer_logits(loaded: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, V) in float32 from the final norm's output at the answer rows
    (B, H), as the model's own head computes them (Gemma 2's final soft-capping included),
    but in float32: the head's weight cast a chunk of rows at a time (a few rows times the
    vocabulary: cheap), so that neither the logits nor the softmax over the vocabulary are
    rounded to bf16 steps (0.0625-0.125 at logits of 8-32). In float32 this is exactly
    the head's own product."""
    head = loaded.model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    x = hidden.to(weight.device, torch.float32)
    if weight.dtype == torch.float32:
        logits = F.linear(x, weight, bias)
    else:
        logits = torch.cat(
            [
                F.linear(
                    x,
                    weight[i : i + HEAD_CHUNK].float(),
                    None if bias is None else bias[i : i + HEAD_CHUNK].float(),
                )
                for i in range(0, weight.shape[0], HEAD_CHUNK)
            ],
            dim=-1,
        )
    cap = getattr(loaded.text_config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def on_device(loaded: LoadedModel, inputs: dict) -> dict:
    """Tensors to the model's device; floating ones (pixels) to its dtype."""
    return {
        k: v.to(loaded.device, loaded.dtype if v.is_floating_point() else None)
        for k, v in inputs.items()
    }


@dataclass
class Prefill:
    """A batch after its prompt passes: the answer position's logits, and what decoding
    (generation.decode) continues from."""

    cache: object  # the KV cache over prefix + question (edited where the rule applies)
    logits: torch.Tensor  # (B, V) float32 next-token logits at each row's last real position
    attention_mask: torch.Tensor  # (B, K)
    key_modality: torch.Tensor  # (B, K)
    next_position: torch.Tensor  # (B,): the position of each row's first new token
    rope_axes: int  # 0: 1-D positions; 3: Qwen2-VL's (3, B, 1) multimodal positions
    # With a lens: each decoder layer's output at the answer position, (L, B, H) in the
    # model's dtype (the last layer's is the final norm's input, as answer_reader reads).
    layer_states: torch.Tensor | None = None


def rule_pass(language_model, edit: Rule | None, profile, key_modality: torch.Tensor, **inputs):
    """One cached pass of the language model (no LM head) over `inputs` with `edit` applied
    (None: plain attention) and `profile` recording: the keyword arguments the attention
    function reads (key_modality (B, K): each key's modality, over cache + new tokens)."""
    return language_model(
        **inputs,
        use_cache=True,
        key_modality=key_modality,
        attention_edit=edit,
        attention_profile=profile,
    )


@torch.inference_mode()
def prefill(
    loaded: LoadedModel, batch: EncodedBatch, edit: Rule | None, profile=None, lens=False
) -> Prefill:
    """The prompt passes of a batch, the rule applied in both: the prefix pass, run once
    per distinct prefix, then the question pass over each item's question tokens with the
    prefix's KV cache; the logits are read (answer_reader) after each row's last real
    question token (and with `lens`, every decoder layer's output there). What scoring and
    generation both start from. An empty prefix (prompt.ablation=no-system without an
    image) has no prefix pass: the question pass starts at position 0 with no cache."""
    device, language_model = loaded.device, loaded.model.model
    prefix_ids, prefix_mask = batch.prefix_ids.to(device), batch.prefix_mask.to(device)
    vision = on_device(loaded, batch.vision)
    if vision:
        prefix_modality = modality_ids(prefix_ids, prefix_mask, loaded.image_token_id)
    else:  # the system part of prompts without an image
        prefix_modality = torch.where(prefix_mask.bool(), SYSTEM, PAD)
    question_ids, question_mask = batch.question_ids.to(device), batch.question_mask.to(device)
    rows = batch.image_row.to(device)
    cache = None
    if prefix_ids.shape[1]:
        positions = position_ids(loaded, prefix_ids, prefix_mask, vision)
        prefix = rule_pass(
            language_model,
            edit,
            profile,
            prefix_modality,
            input_ids=prefix_ids,
            attention_mask=prefix_mask,
            position_ids=positions,
            **vision,
            **(token_types(loaded, prefix_ids) if vision else {}),
        )
        cache = getattr(prefix, CACHE_ARG)
        select_cache_rows(cache, rows)
        question_positions = following_positions(positions, rows, question_ids.shape[1])
    else:  # right-padded rows from 0 (their padding is never attended to)
        question_positions = position_ids(loaded, question_ids, question_mask, {})
    attention_mask = torch.cat([prefix_mask[rows], question_mask], dim=1)
    key_modality = torch.cat(
        [prefix_modality[rows], torch.where(question_mask.bool(), TEXT, PAD)], dim=1
    )
    last = question_mask.sum(1) - 1
    with answer_reader(loaded) as read, decoder_outputs(loaded, lens) as outputs:
        output = rule_pass(
            language_model,
            edit,
            profile,
            key_modality,
            input_ids=question_ids,
            attention_mask=attention_mask,
            position_ids=question_positions,
            **{CACHE_ARG: cache},
        )
        logits = read(output.last_hidden_state, last)
    cache = getattr(output, CACHE_ARG)  # the prefix's, extended (or new without a prefix)
    states = None
    if outputs is not None:
        rows = torch.arange(len(last))
        states = torch.stack(
            [out[rows.to(out.device), last.to(out.device)].cpu() for out in outputs]
        )
    # Decoding continues after each row's last real question token.
    first = question_positions[0] if question_positions.dim() == 3 else question_positions
    return Prefill(
        cache=cache,
        logits=logits,
        attention_mask=attention_mask,
        key_modality=key_modality,
        next_position=first[:, 0] + question_mask.sum(1),
        rope_axes=question_positions.shape[0] if question_positions.dim() == 3 else 0,
        layer_states=states,
    )


@torch.inference_mode()
def score_batch(
    loaded: LoadedModel,
    batch: EncodedBatch,
    edit: Rule | None,
    yes_ids,
    no_ids,
    profile=None,
    check_answers: bool = False,
    lens=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(yes_logit, no_logit, p_yes) per item (see answer_scores), from the prompt passes
    (prefill) and, for PAI's guidance, the prompts without their image. `check_answers`:
    warn (warn_if_unscored) where the model's most likely answer token, before any
    guidance, is none of the scored ones. A `lens` (evaluation.lens.LogitLens) records
    every decoder layer's reading of the answer (before any guidance); so does anything with
    its record(items, states, yes_ids, no_ids) method (probes.LayerStates streams the states
    to disk, probes.Recorders feeds several readers)."""
    passes = prefill(loaded, batch, edit, profile, lens is not None)
    logits = passes.logits
    if lens is not None:
        lens.record(batch.items, passes.layer_states, yes_ids, no_ids)
    if check_answers:
        warn_if_unscored(loaded.tokenizer, logits, yes_ids, no_ids)
    if edit is not None and edit.guidance is not None:
        logits = guided(logits, text_only_logits(loaded, batch), edit.guidance)
    return answer_scores(logits, yes_ids, no_ids)


def select_cache_rows(cache, rows: torch.Tensor) -> None:
    """cache.batch_select_indices(rows), with each layer's index on that layer's device (a
    device_map spreads the layers, and their caches, over devices)."""
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        layer.batch_select_indices(rows.to(keys.device) if torch.is_tensor(keys) else rows)


def answer_scores(logits: torch.Tensor, yes_ids, no_ids) -> tuple[torch.Tensor, ...]:
    """From the answer position's logits (B, V): yes_logit and no_logit (log-sum-exp over
    the words' first tokens) and p_yes, the probability of the yes tokens under the softmax
    over the whole vocabulary (VQAScore's P("Yes"))."""
    p_yes = logits.softmax(dim=-1)[:, yes_ids].sum(dim=-1)
    return logits[:, yes_ids].logsumexp(dim=-1), logits[:, no_ids].logsumexp(dim=-1), p_yes


def warn_if_unscored(tokenizer, logits: torch.Tensor, yes_ids, no_ids) -> bool:
    """One warning line when, in some rows of `logits` (B, V) at the answer position, the
    most likely token is none of the scored yes/no ids: a sign that scoring.yes_words /
    no_words or the chat template do not match how the model starts its answer (the
    scores then compare tokens the model would not emit). True if it warned."""
    top = logits.argmax(dim=-1).tolist()
    scored = set(yes_ids) | set(no_ids)
    missed = Counter(token for token in top if token not in scored)
    if not missed:
        return False
    common = ", ".join(
        f"{tokenizer.convert_ids_to_tokens(token)!r} x{count}"
        for token, count in missed.most_common(3)
    )
    log.warning(
        "the most likely answer token is none of the scored yes/no tokens in %d of %d rows "
        "of the first batch (most often %s); check scoring.yes_words / no_words and the "
        "prompt (runtime.dry_run=true prints both)",
        sum(missed.values()),
        len(top),
        common,
    )
    return True


def text_only_logits(loaded: LoadedModel, batch: EncodedBatch) -> torch.Tensor:
    """Last-position logits of the prompts without their image, with the model unchanged."""
    ids, mask = batch.text_only_ids.to(loaded.device), batch.text_only_mask.to(loaded.device)
    with answer_reader(loaded) as read:
        hidden = loaded.model.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids(loaded, ids, mask, {}),
            use_cache=False,
        ).last_hidden_state
        return read(hidden)


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


def encode_full_prompts(loaded: LoadedModel, images: list, prompts: list[str], questions=None):
    """Model inputs for whole prompts (left-padded, on the model's device and dtype, with
    their position ids) and their (B, N) modality ids. An image of None: the prompt has no
    image, and `questions` must give its question (where its text starts)."""
    present = [[image] for image in images if image is not None]  # one per prompt
    tokenizer = tokenizer_of(loaded.processor)
    encode = loaded.processor if present else tokenizer
    inputs = encode(
        **({"images": present} if present else {}),
        text=prompts,
        padding=True,
        return_tensors="pt",
        **text_kwargs(tokenizer, prompts[0]),
    )
    inputs = on_device(loaded, dict(inputs))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    starts = [
        0 if image is not None else question_token_start(tokenizer, prompt, questions[i])
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True))
    ]
    # Left padding shifts each row's question start by its number of pad positions.
    text_start = torch.tensor(starts, device=ids.device) + (mask == 0).sum(dim=1)
    key_modality = modality_ids(ids, mask, loaded.image_token_id, text_start=text_start)
    vision = {k: v for k, v in inputs.items() if k not in TOKEN_KEYS}
    inputs["position_ids"] = position_ids(loaded, ids, mask, vision)
    return inputs, key_modality


@torch.inference_mode()
def score_full_prompts(
    loaded: LoadedModel,
    images: list,
    prompts: list[str],
    edit: Rule | None,
    yes_ids,
    no_ids,
    questions=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scores without prefix sharing: whole prompts, left-padded, one forward.
    Kept as the plain path that prefix sharing is checked and benchmarked against."""
    inputs, key_modality = encode_full_prompts(loaded, images, prompts, questions)
    with answer_reader(loaded) as read:
        hidden = loaded.model.model(
            **inputs, use_cache=False, key_modality=key_modality, attention_edit=edit
        ).last_hidden_state
        logits = read(hidden)
    return answer_scores(logits, yes_ids, no_ids)


def keep_batch(batch):
    """DataLoader collate: a batch is already built by BatchEncoder."""
    return batch


@dataclass
class Scores:
    yes: list[float]  # per item, benchmark order: yes_logit
    no: list[float]  # no_logit
    p_yes: list[float]  # P(yes tokens) over the whole vocabulary
    seconds: float  # wall time of the scoring loop
    computed: int  # items scored now (the rest came from the cache)
    new_tokens: int | None = None  # generate mode: tokens generated


def score_items(
    loaded: LoadedModel,
    benchmark: "Benchmark",
    prompts: list[str],
    edit: Rule | None,
    words: tuple[list[int], list[int]],
    batch_size: int,
    num_workers: int,
    desc: str,
    cache: ScoreCache | None = None,
    profile=None,
    plain_prompts: list[str] | None = None,
    progress_seconds: float = 60.0,
    lens=None,
    ablation: str = NONE,
) -> Scores:
    """yes and no logits of every item (`plain_prompts`, each prompt rendered without its
    image, are needed by PAI's guidance only). With a cache, batches whose items are all in it are
    taken from it (a batch is always computed whole, so a resumed run scores every item in
    the same company as an uninterrupted one) and each new batch is saved as it is done.
    A profile (attention.profile) records where attention goes, a lens (evaluation.lens)
    what each layer would answer; both need every batch run.
    Without a terminal, progress is logged every `progress_seconds` (progress.Progress).
    `ablation` (models.ablation: no-bos, no-system) shortens each tokenized prompt; the
    cache's condition must say so (identity.condition), as item keys see only the text."""
    keys = item_keys(benchmark, prompts, cache)
    done, computed_by = cache.read() if cache else ({}, {})
    plan = plan_batches([item.image_id for item in benchmark.items], batch_size)
    todo = [batch for batch in plan if not all(keys[j] in done for j in batch)]
    computed = sum(len(batch) for batch in todo)
    taken = set(keys) - {keys[j] for batch in todo for j in batch}
    for name in {name for key in taken for name in computed_by[key]}:
        kernels.note_path(name)  # the paths that computed the scores taken from the cache
    if cache:
        log.info(
            "%s: %d of %d items from the score cache, %d to compute",
            desc,
            len(keys) - computed,
            len(keys),
            computed,
        )
    started = time.perf_counter()
    done |= score_batches(
        loaded,
        benchmark,
        prompts,
        todo,
        keys,
        edit,
        words,
        num_workers,
        desc,
        cache,
        profile,
        plain_prompts,
        progress_seconds,
        lens,
        ablation,
    )
    seconds = time.perf_counter() - started
    return Scores(
        yes=[done[k][0] for k in keys],
        no=[done[k][1] for k in keys],
        p_yes=[done[k][2] for k in keys],
        seconds=seconds,
        computed=computed,
    )


def item_keys(benchmark: "Benchmark", prompts: list[str], cache: ScoreCache | None) -> list[str]:
    """Each item's key in the score cache (cache.item_key)."""
    # Cached scores are keyed by the image's content; without a cache its id will do.
    image_key = benchmark.image_digest if cache else lambda image_id: image_id
    return [
        item_key(benchmark.name, item.item_id, image_key(item.image_id), prompt)
        for item, prompt in zip(benchmark.items, prompts, strict=True)
    ]


def score_batches(
    loaded: LoadedModel,
    benchmark: "Benchmark",
    prompts: list[str],
    batches: list[list[int]],
    keys: list[str],
    edit: Rule | None,
    words: tuple[list[int], list[int]],
    num_workers: int,
    desc: str,
    cache: ScoreCache | None = None,
    profile=None,
    plain_prompts: list[str] | None = None,
    progress_seconds: float = 60.0,
    lens=None,
    ablation: str = NONE,
) -> dict[str, tuple[float, float, float]]:
    """Score the given batches of item indices (each saved to the cache as it is done):
    item key -> (yes_logit, no_logit, p_yes)."""
    guidance = edit is not None and edit.guidance is not None
    if guidance and plain_prompts is None:
        raise ValueError("PAI's guidance needs the prompts without their image")
    loader = DataLoader(
        BatchEncoder(
            benchmark, prompts, batches, loaded, plain_prompts if guidance else None, ablation
        ),
        batch_size=None,
        collate_fn=keep_batch,
        num_workers=num_workers if batches else 0,
    )
    done = {}
    progress = Progress(desc, sum(len(batch) for batch in batches), progress_seconds)
    for index, batch in enumerate(loader):
        if isinstance(batch, UsageError):
            raise batch
        # The first batch's logits get one cheap check of the scored answer tokens.
        with kernels.record_paths() as paths:
            scores = score_batch(
                loaded, batch, edit, *words, profile=profile, check_answers=index == 0, lens=lens
            )
        scores = [s.tolist() for s in scores]
        batch_keys = [keys[j] for j in batch.items]
        if cache:
            cache.save(batch_keys, *scores, paths=paths)
        done.update(zip(batch_keys, zip(*scores, strict=True), strict=True))
        progress.update(len(batch.items))
    progress.close()
    return done
