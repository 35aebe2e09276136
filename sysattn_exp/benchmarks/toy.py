"""A small paired benchmark drawn in code: coloured shapes on white.

Every question is "Is there a <colour> <shape> in the image?". `benchmark.split` picks the
item set:

- `demo` (the default): 36 groups. 24 are one question asked of two images of one large
  centred shape that differ only in colour (one answer yes, the other no); the last 12
  are the first 12 groups of `hard` (below), where a yes-bias shows;
- `test`: held-out scenes of one or two shapes (any position and size) that the toy
  model's training (scripts/train_toy.py) never sees; each group is one image asked one
  question whose answer is yes (a shape it shows) and one whose answer is no (a colour or
  a shape it does not show);
- `hard`: held-out two-shape scenes asked compositional questions: the no question names
  a colour and a shape that are both in the image, but on different objects (a red
  circle and a blue square, asked about a blue circle); its pair is a yes question on
  the same image.

A scene's image id is its objects, `shape.colour.x.y.size` joined by `+` (centre and
size in pixels of the 96 x 96 canvas); the demo's ids are `<colour>_<shape>`.
"""

import hashlib
import itertools
import random

import numpy as np
from PIL import Image, ImageDraw

from sysattn_exp.benchmarks.base import Benchmark, Item, check_template

SHAPES = ["circle", "square", "triangle"]
COLOURS = ["red", "green", "blue", "yellow"]
COLOUR_PAIRS = [("red", "blue"), ("green", "yellow"), ("blue", "green"), ("yellow", "red")]
SIZE = 96
# Held-out scenes: those whose id hashes into this bucket (1 in HELD_OUT_EVERY). Training
# draws only from the other buckets, so no test or hard image is ever seen in training.
HELD_OUT_EVERY = 4
TEST_GROUPS = 96
HARD_GROUPS = 48
SPLIT_SEEDS = {"test": 1001, "hard": 1002}

# Where objects go: single objects anywhere on a 3 x 3 grid of centres; two objects in
# two cells far enough apart that they never touch at the sizes they may take.
CENTRES = [24, 48, 72]
SINGLE_SIZES = [28, 36, 44]
PAIR_SIZES = [24, 32, 40]
BIG = (48, 48, 64)  # centre x, y and size of the demo's shape


def draw_shape(pen: ImageDraw.ImageDraw, shape: str, colour, x: int, y: int, size: int):
    half = size // 2
    box = (x - half, y - half, x + half, y + half)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=colour)


def draw(shape: str, colour: str) -> Image.Image:
    """The demo's image: one large shape in the middle."""
    return draw_scene(((shape, colour, *BIG),))


def draw_scene(objects) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), "white")
    pen = ImageDraw.Draw(image)
    for shape, colour, x, y, size in objects:
        draw_shape(pen, shape, colour, x, y, size)
    return image


def object_map(objects) -> np.ndarray:
    """(SIZE, SIZE) int array: 0 background, i + 1 where object i is drawn (last on top)."""
    image = Image.new("L", (SIZE, SIZE), 0)
    pen = ImageDraw.Draw(image)
    for i, (shape, _, x, y, size) in enumerate(objects):
        draw_shape(pen, shape, i + 1, x, y, size)
    return np.asarray(image, dtype=np.int64)


def scene_id(objects) -> str:
    return "+".join(f"{s}.{c}.{x}.{y}.{z}" for s, c, x, y, z in objects)


def parse_scene(image_id: str) -> tuple:
    if "_" in image_id:  # the demo's "<colour>_<shape>"
        colour, shape = image_id.split("_")
        return ((shape, colour, *BIG),)
    objects = []
    for part in image_id.split("+"):
        shape, colour, x, y, size = part.split(".")
        objects.append((shape, colour, int(x), int(y), int(size)))
    return tuple(objects)


def held_out(image_id: str) -> bool:
    digest = hashlib.sha256(image_id.encode()).digest()
    return digest[0] % HELD_OUT_EVERY == 0


def random_scene(rng: random.Random, n_objects: int | None = None) -> tuple:
    """One or two shapes; two shapes always differ in shape or colour."""
    n_objects = n_objects or rng.choice((1, 2))
    if n_objects == 1:
        if rng.random() < 0.15:
            return ((rng.choice(SHAPES), rng.choice(COLOURS), *BIG),)
        x, y = rng.choice(CENTRES), rng.choice(CENTRES)
        return ((rng.choice(SHAPES), rng.choice(COLOURS), x, y, rng.choice(SINGLE_SIZES)),)
    while True:
        (x1, y1), (x2, y2) = rng.sample(list(itertools.product(CENTRES, CENTRES)), 2)
        if max(abs(x1 - x2), abs(y1 - y2)) >= 48:
            break
    kinds = list(itertools.product(SHAPES, COLOURS))
    (s1, c1), (s2, c2) = rng.sample(kinds, 2)
    return (
        (s1, c1, x1, y1, rng.choice(PAIR_SIZES)),
        (s2, c2, x2, y2, rng.choice(PAIR_SIZES)),
    )


def questions(objects) -> dict[str, list[tuple[str, str]]]:
    """The (colour, shape) pairs one may ask about a scene, by kind: `yes` (shown),
    `hard` (colour and shape both shown, on different objects), `easy` (any other no)."""
    shown = {(c, s) for s, c, *_ in objects}
    colours = {c for c, _ in shown}
    shapes = {s for _, s in shown}
    out = {"yes": sorted(shown), "hard": [], "easy": []}
    for shape, colour in itertools.product(SHAPES, COLOURS):
        if (colour, shape) in shown:
            continue
        kind = "hard" if colour in colours and shape in shapes else "easy"
        out[kind].append((colour, shape))
    return out


def question(colour: str, shape: str) -> str:
    return f"Is there a {colour} {shape} in the image?"


def demo_items() -> list[Item]:
    items = []
    for shape, (first, second) in itertools.product(SHAPES, COLOUR_PAIRS):
        for asked, shown in itertools.product((first, second), repeat=2):
            group = f"{shape}-{first}-{second}/ask-{asked}"
            items.append(
                Item(
                    item_id=f"{group}/show-{shown}",
                    group_id=group,
                    image_id=f"{shown}_{shape}",
                    question=question(asked, shape),
                    label=asked == shown,
                )
            )
    return items


DEMO_HARD_GROUPS = 12


def make_items(split: str = "demo") -> list[Item]:
    if split == "demo":
        return demo_items() + make_items("hard")[: 2 * DEMO_HARD_GROUPS]
    rng = random.Random(SPLIT_SEEDS[split])
    n_groups = TEST_GROUPS if split == "test" else HARD_GROUPS
    items, seen = [], set()
    while len(seen) < n_groups:
        objects = random_scene(rng, 2 if split == "hard" else None)
        image_id = scene_id(objects)
        asks = questions(objects)
        no_kind = "hard" if split == "hard" else "easy"
        if image_id in seen or not held_out(image_id) or not asks[no_kind]:
            continue
        seen.add(image_id)
        group = f"{split}/{image_id}"
        for label, (colour, shape) in (
            (True, rng.choice(asks["yes"])),
            (False, rng.choice(asks[no_kind])),
        ):
            items.append(
                Item(
                    item_id=f"{group}/ask-{colour}-{shape}",
                    group_id=group,
                    image_id=image_id,
                    question=question(colour, shape),
                    label=label,
                    meta={"n_objects": len(objects)},
                )
            )
    return items


def load_image(image_id: str) -> Image.Image:
    return draw_scene(parse_scene(image_id))


def load(cfg) -> Benchmark:
    split = cfg.get("split") or "demo"
    template = check_template(cfg.template)
    # Drawn in code: no image file to check before the run.
    return Benchmark("toy", make_items(split), template, load_image, image_files=False)
