"""A small paired benchmark drawn in code: a coloured shape on white, asked about two colours.

Each group is one question, "Is there a <colour> <shape> in the image?", asked of two images
of that shape that differ only in colour: one answer is yes, the other no.
"""

import itertools

from PIL import Image, ImageDraw

from sysattn_exp.benchmarks.base import Benchmark, Item, check_template

SHAPES = ["circle", "square", "triangle"]
COLOUR_PAIRS = [("red", "blue"), ("green", "yellow"), ("blue", "green"), ("yellow", "red")]
SIZE = 96


def draw(shape: str, colour: str) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), "white")
    pen = ImageDraw.Draw(image)
    box = (16, 16, SIZE - 16, SIZE - 16)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([(SIZE // 2, 16), (SIZE - 16, SIZE - 16), (16, SIZE - 16)], fill=colour)
    return image


def load_image(image_id: str) -> Image.Image:
    colour, shape = image_id.split("_")
    return draw(shape, colour)


def make_items() -> list[Item]:
    items = []
    for shape, (first, second) in itertools.product(SHAPES, COLOUR_PAIRS):
        for asked, shown in itertools.product((first, second), repeat=2):
            group = f"{shape}-{first}-{second}/ask-{asked}"
            items.append(
                Item(
                    item_id=f"{group}/show-{shown}",
                    group_id=group,
                    image_id=f"{shown}_{shape}",
                    question=f"Is there a {asked} {shape} in the image?",
                    label=asked == shown,
                )
            )
    return items


def load(cfg) -> Benchmark:
    return Benchmark("toy", make_items(), check_template(cfg.template), load_image)
