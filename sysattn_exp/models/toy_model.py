"""The toy model: a small LLaVA trained on the toy benchmark's world (coloured shapes on
white, "Is there a <colour> <shape> in the image?"), so that the demo shows real answers.

Its weights ship in the package (`toy_weights.safetensors`) and are made by
`scripts/train_toy.py`, which calls `train` here: the same seed gives the same weights.

Training, in two stages (plain end-to-end training from random weights stays at chance):

1. the vision tower and projector alone learn, per image token (8 x 8 pixel patch), the
   colour and the shape of the object drawn there (an auxiliary linear head on the
   projected image features: a dense, easy signal);
2. the whole model learns to answer (cross-entropy of the next token, "Yes" or "No", over
   the vocabulary, after LLaVA-1.5's vicuna prompt with its system prompt), with the
   auxiliary loss kept on and a linear probe on the last hidden states of the question's
   words (at the colour word: is that colour shown; at the shape word: is that shape
   shown, and the answer), which gives the decoder intermediate targets to learn from.

The yes-bias is induced by the mix of questions, on purpose and nothing else: half the
questions are yes; a no question on a two-shape scene whose colours and shapes both
differ names, with probability HARD_SHARE only, a colour and a shape that are both shown
but on different objects (uniform sampling over the no questions would give 2 in 10), the
way a question that names what is in a picture is nearly always true in natural data.
The other no questions are near misses (the colour shown, or the shape shown) and
misses, a third each. Scenes of the held-out `test` and `hard` splits (benchmarks/toy.py)
are never drawn.
"""

import functools
import hashlib
import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from sysattn_exp.benchmarks import toy as world
from sysattn_exp.models.prompts import build_prompt
from sysattn_exp.models.tiny import build_config, build_processor, cast_parameters

WEIGHTS = Path(__file__).parent / "toy_weights.safetensors"
# The balanced twin (model=toy_balanced): the same script and seed with the uniform mix of
# no questions (UNIFORM_HARD_SHARE), the control for where the yes-bias comes from.
BALANCED_WEIGHTS = Path(__file__).parent / "toy_balanced_weights.safetensors"
# builtin:<name> -> its weights file
SHIPPED = {"toy": WEIGHTS, "toy_balanced": BALANCED_WEIGHTS}
IMAGE_SIZE = 64
PATCH_SIZE = 8
GRID = IMAGE_SIZE // PATCH_SIZE
SIZES = dict(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, init_std=0.02)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATE = "{question} Please answer yes or no."
HARD_SHARE = 0.05
# Uniform sampling over a two-shape scene's no questions: 2 of its 10 are hard (the balanced
# twin's mix, `scripts/train_toy.py --hard-share 0.2`).
UNIFORM_HARD_SHARE = 0.2
# (seed, steps of stage 1, steps of stage 2, batch size, learning rate, share of hard no's)
DEFAULTS = dict(seed=0, vision_steps=800, steps=600, batch_size=32, lr=2e-3, hard_share=HARD_SHARE)


def build_toy_processor() -> LlavaProcessor:
    return build_processor(IMAGE_SIZE, PATCH_SIZE)


def build_toy_config(tokenizer=None):
    config = build_config(tokenizer, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **SIZES)
    for key, value in VISION.items():
        setattr(config.vision_config, key, value)
    config.vision_config.projection_dim = VISION["hidden_size"]
    config.vision_feature_layer = -1
    return config


def build_toy_llava(weights: Path | None = WEIGHTS, dtype: torch.dtype = torch.float32):
    """The toy LLaVA and its processor, with the shipped weights (None: untrained), its
    parameters in `dtype` (buffers, the rotary frequencies, stay float32)."""
    from safetensors.torch import load_file

    processor = build_toy_processor()
    model = LlavaForConditionalGeneration(build_toy_config(processor.tokenizer))
    if weights is not None:
        model.load_state_dict(load_file(str(weights)), strict=True)
    return cast_parameters(model.eval(), dtype), processor


def patch_labels(objects) -> tuple[np.ndarray, np.ndarray]:
    """Per image token (row-major GRID x GRID): the colour (0 = background, 1.. COLOURS)
    and the shape (0 = none, 1.. SHAPES) of the object covering most of the patch."""
    owner = world.object_map(objects)
    cell = world.SIZE // GRID
    blocks = owner.reshape(GRID, cell, GRID, cell).transpose(0, 2, 1, 3).reshape(GRID**2, -1)
    colour = np.zeros(GRID**2, dtype=np.int64)
    shape = np.zeros(GRID**2, dtype=np.int64)
    for i, (s, c, *_) in enumerate(objects):
        covered = (blocks == i + 1).mean(axis=1) >= 0.25
        colour[covered] = world.COLOURS.index(c) + 1
        shape[covered] = world.SHAPES.index(s) + 1
    return colour, shape


def draw_question(
    rng: random.Random, objects, hard_share: float = HARD_SHARE
) -> tuple[str, str, bool]:
    asks = world.questions(objects)
    if rng.random() < 0.5:
        return (*rng.choice(asks["yes"]), True)
    if asks["hard"] and rng.random() < hard_share:
        return (*rng.choice(asks["hard"]), False)
    # Near misses as often as the rest: the colour shown (shape not), the shape shown
    # (colour not), neither.
    colours = {c for _, c, *_ in objects}
    shapes = {s for s, *_ in objects}
    near = [
        [(c, s) for c, s in asks["easy"] if c in colours],
        [(c, s) for c, s in asks["easy"] if s in shapes],
        [(c, s) for c, s in asks["easy"] if c not in colours and s not in shapes],
    ]
    return (*rng.choice(rng.choice([kind for kind in near if kind])), False)


class Batches:
    """Training batches drawn from a seeded generator, held-out scenes excluded."""

    def __init__(self, processor, seed: int, hard_share: float = HARD_SHARE):
        self.rng = random.Random(seed)
        self.hard_share = hard_share
        self.processor = processor
        tok = processor.tokenizer
        self.yes = tok("Yes", add_special_tokens=False).input_ids[0]
        self.no = tok("No", add_special_tokens=False).input_ids[0]
        self.ids, self.where = {}, {}
        blank = world.draw_scene(())
        for shape in world.SHAPES:
            for colour in world.COLOURS:
                text = build_prompt(
                    TEMPLATE.format(question=world.question(colour, shape)), SYSTEM_PROMPT
                )
                enc = processor(text=text, images=blank, return_tensors="pt")
                ids = enc.input_ids[0]
                self.ids[colour, shape] = ids
                self.where[colour, shape] = (
                    word_end(ids, tok(f" {colour}", add_special_tokens=False).input_ids),
                    word_end(ids, tok(f" {shape}", add_special_tokens=False).input_ids),
                )
        self.pad = tok.pad_token_id

    def scene(self):
        while True:
            objects = world.random_scene(self.rng)
            if not world.held_out(world.scene_id(objects)):
                return objects

    def __call__(self, size: int) -> dict:
        scenes = [self.scene() for _ in range(size)]
        asked = [draw_question(self.rng, s, self.hard_share) for s in scenes]
        labels = [patch_labels(s) for s in scenes]
        pixels = self.processor.image_processor(
            [world.draw_scene(s) for s in scenes], return_tensors="pt"
        ).pixel_values
        return {
            "pixel_values": pixels,
            **right_pad([self.ids[c, s] for c, s, _ in asked], self.pad),
            "target": torch.tensor([self.yes if y else self.no for *_, y in asked]),
            "label": torch.tensor([int(y) for *_, y in asked]),
            "colour_at": torch.tensor([self.where[c, s][0] for c, s, _ in asked]),
            "shape_at": torch.tensor([self.where[c, s][1] for c, s, _ in asked]),
            "colour_shown": torch.tensor(
                [int(any(o[1] == a[0] for o in sc)) for sc, a in zip(scenes, asked, strict=True)]
            ),
            "shape_shown": torch.tensor(
                [int(any(o[0] == a[1] for o in sc)) for sc, a in zip(scenes, asked, strict=True)]
            ),
            "colour": torch.from_numpy(np.stack([c for c, _ in labels])),
            "shape": torch.from_numpy(np.stack([s for _, s in labels])),
        }


def word_end(ids: torch.Tensor, word: list[int]) -> int:
    """The position of the last token of the last occurrence of `word` in `ids`."""
    ids = ids.tolist()
    for start in range(len(ids) - len(word), -1, -1):
        if ids[start : start + len(word)] == word:
            return start + len(word) - 1
    raise ValueError(f"{word} not in the prompt")


def right_pad(rows, pad: int) -> dict:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "last": mask.sum(1) - 1}


def aux_loss(head, features, batch):
    out = head(features)
    n_colours = len(world.COLOURS) + 1
    colour = F.cross_entropy(out[..., :n_colours].flatten(0, 1), batch["colour"].flatten())
    shape = F.cross_entropy(out[..., n_colours:].flatten(0, 1), batch["shape"].flatten())
    return colour + shape


def lr_at(step: int, total: int, lr: float, warmup: int = 50) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(
    seed=0, vision_steps=800, steps=600, batch_size=32, lr=2e-3, hard_share=HARD_SHARE, log=print
):
    """Train the toy LLaVA from `seed`, with `hard_share` of the hard no questions (the
    shipped model: HARD_SHARE; its balanced twin: UNIFORM_HARD_SHARE); returns (model,
    processor). Deterministic on one thread."""
    log = log or (lambda line: None)
    torch.manual_seed(seed)
    processor = build_toy_processor()
    model = LlavaForConditionalGeneration(build_toy_config(processor.tokenizer))
    hidden = model.config.text_config.hidden_size
    head = torch.nn.Linear(hidden, 5 + 4)
    # On the question's words: colour shown? (at the colour) answer? shape shown? (at the shape)
    probe = torch.nn.Linear(hidden, 3)
    batches = Batches(processor, seed, hard_share)
    model.train()

    vision = list(model.model.vision_tower.parameters())
    vision += list(model.model.multi_modal_projector.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(vision, lr=lr, weight_decay=0.0)
    for step in range(vision_steps):
        batch = batches(batch_size)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, vision_steps, lr)
        features = model.model.get_image_features(pixel_values=batch["pixel_values"])
        features = torch.stack(list(features.pooler_output))
        loss = aux_loss(head, features, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == vision_steps - 1:
            log(f"vision step {step}: aux {loss.item():.4f}")

    params = list(model.parameters()) + list(head.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    rows = torch.arange(batch_size)
    for step in range(steps):
        batch = batches(batch_size)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            output_hidden_states=True,
        )
        logits = out.logits[rows, batch["last"]]
        answer = F.cross_entropy(logits, batch["target"])
        final = out.hidden_states[-1]
        words = probe(final[rows, batch["colour_at"]])[:, 0]
        words = F.binary_cross_entropy_with_logits(words, batch["colour_shown"].float())
        at_shape = probe(final[rows, batch["shape_at"]])
        words += F.binary_cross_entropy_with_logits(at_shape[:, 1], batch["label"].float())
        words += F.binary_cross_entropy_with_logits(at_shape[:, 2], batch["shape_shown"].float())
        aux = aux_loss(head, torch.stack(list(out.image_outputs.pooler_output)), batch)
        loss = answer + 0.5 * aux + words
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            losses = f"answer {answer.item():.4f} aux {aux.item():.4f} words {words.item():.4f}"
            log(f"step {step}: {losses}")
    return model.eval(), processor


@functools.cache
def weights_file_digest(weights: Path = WEIGHTS) -> str:
    """sha256 of a shipped weights file (keys the score cache: retrained, rescored)."""
    return hashlib.sha256(Path(weights).read_bytes()).hexdigest()


def digest(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()
