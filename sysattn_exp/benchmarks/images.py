"""Image files to the 8-bit RGB picture the model's processor is given: one conversion for
every benchmark loader (local files and hub datasets) and the caption task.

What reaches the processor, by the mode Pillow opens the file in:

- RGB: as stored. 1, L, P (palette), CMYK, YCbCr, HSV: Pillow's own conversion to RGB,
  the one the families' processors apply (transformers 5's `convert_to_rgb`,
  transformers/image_transforms.py: `image.convert("RGB")` without transparency); for
  CMYK that is R = (255 - C)(255 - K) / 255 (and likewise G, B), with no ICC profile.
  YCbCr JPEGs (the usual kind) are decoded to RGB by libjpeg already.
- Transparency, in any mode that has it (RGBA, LA, PA, P or L or RGB with a `tRNS`
  transparency entry, 16-bit grey with one): composited onto white, as transformers'
  `convert_to_rgb` does it (an alpha band or `image.info["transparency"]`:
  `Image.alpha_composite` over an opaque white RGBA, then RGB). A plain
  `convert("RGB")` would drop the alpha channel and show the colour stored under
  transparent pixels (often black).
- Deeper grey, scaled to 8 bits (Pillow's conversion would clip at 255 instead): 16-bit
  (I;16, I;16B, I;16L) v -> round(v / 257), so 65535 -> 255; 32-bit integer (I) the
  same when every value is within 0..65535 (what Pillow's 16-bit PGM reader, and older
  Pillows' 16-bit PNG reader, store there), otherwise an error, since such data has no
  agreed 8-bit scale; 32-bit float (F) v -> round(255 v) when every value is within 0..1
  (the float image convention, also transformers' for float input), otherwise an error.
- Other modes: an error naming the file and the mode. LAB (CIELab TIFFs) is one: Pillow's
  LAB -> RGB conversion is not a colour conversion, and transformers' convert_to_rgb
  would take its a* band for alpha.
- EXIF orientation is NOT applied: the stored pixels are used as they are, as LLaVA-1.5's
  reference evaluation code does (haotian-liu/LLaVA, llava/eval/model_vqa_loader.py,
  which its scripts/v1_5/eval scripts for MME, POPE, ... run: `CustomDataset.__getitem__`
  opens each image with `Image.open(path).convert('RGB')`, no `ImageOps.exif_transpose`),
  so that published LLaVA-1.5 figures and these see the same picture. (transformers'
  `load_image` would rotate, but the processors themselves, given a PIL image, do not.)
- Animated GIF / WebP / APNG and multi-page files: the first frame.

The whole file is decoded here (`Image.load`), so a file whose data is cut short fails
here and not later in the model's batch; Pillow's `ImageFile.LOAD_TRUNCATED_IMAGES` is
left False, so such a file is never read as a partly grey picture."""

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from sysattn_exp.errors import UsageError, first_line

WHITE = (255, 255, 255, 255)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
DEEP_GREY = (*SIXTEEN_BIT, "I", "F")
# Modes with an alpha band ("a": premultiplied). Not LAB, whose "A" band is the a* axis.
ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
# Modes whose conversion to RGB is the picture (Pillow's, as the processors use it).
OPAQUE = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")
# Pillow's errors for a file it cannot decode: a bad or cut-short file (OSError, its
# SyntaxError for some headers, EOFError), a bad value, a decompression bomb.
DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError)


def open_image(source: Path | BinaryIO, name: str | None = None) -> Image.Image:
    """The image in `source` (a file path or a binary stream), fully decoded, as an RGB
    picture (see the module's docstring); `name` names it in errors (default: the path).
    Raises UsageError, one line naming the image, when it cannot be decoded or has a mode
    with no defined conversion."""
    name = name or str(source)
    try:
        with Image.open(source) as image:
            image.seek(0)  # the first frame of an animation (open starts there anyway)
            image.load()
            return to_rgb(image, name)
    except DECODE_ERRORS as err:
        raise UsageError(f"cannot read image {name}: {first_line(err)}") from None


def decode_errors(load_image: Callable, image_ids: list) -> dict[str, str | None]:
    """`load_image(id)` for every id, in threads (Pillow releases the GIL while it decodes,
    so they run in parallel): each id's one-line UsageError message, or None where the
    image decodes. For checking every image before a model loads."""

    def error(image_id) -> str | None:
        try:
            load_image(image_id)
        except UsageError as err:
            return str(err)
        return None

    if not image_ids:
        return {}
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1, len(image_ids))) as pool:
        return dict(zip(image_ids, pool.map(error, image_ids), strict=True))


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """A decoded image as 8-bit RGB: transparency on white, deep grey scaled (module
    docstring). `name` names the image in errors."""
    if image.mode in DEEP_GREY:
        image = deep_grey_to_8_bit(image, name)
    if image.mode not in (*ALPHA, *OPAQUE):
        raise unsupported(image, name)
    if has_transparency(image):
        try:
            rgba = image.convert("RGBA")
        except ValueError:
            raise unsupported(image, name) from None
        rgb = Image.alpha_composite(Image.new("RGBA", image.size, WHITE), rgba).convert("RGB")
    else:
        try:
            rgb = image.convert("RGB")
        except ValueError:
            raise unsupported(image, name) from None
    # convert() copies a palette's transparency entry as an RGB colour: it is resolved.
    rgb.info.pop("transparency", None)
    return rgb


def has_transparency(image: Image.Image) -> bool:
    """As transformers' convert_to_rgb decides it: an alpha band or a transparency entry."""
    return image.mode in ALPHA or image.info.get("transparency") is not None


def deep_grey_to_8_bit(image: Image.Image, name: str) -> Image.Image:
    """16-bit, 32-bit integer or float grey as 8-bit L (LA where a transparency entry
    marks a grey value as transparent)."""
    values = np.asarray(image)
    if image.mode == "F":
        if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise UsageError(
                f"cannot read image {name}: mode F (32-bit float grey) with values outside "
                f"0..1 ({values.min():g} to {values.max():g}) has no agreed 8-bit scale; "
                "save it as 8- or 16-bit, or scale it to 0..1"
            )
        grey = np.rint(values.astype(np.float64) * 255)
    else:
        if image.mode == "I" and (values.min() < 0 or values.max() > 65535):
            raise UsageError(
                f"cannot read image {name}: mode I (32-bit integer grey) with values outside "
                f"0..65535 ({values.min()} to {values.max()}) has no agreed 8-bit scale; "
                "save it as 8- or 16-bit"
            )
        grey = np.rint(values.astype(np.float64) / 257)
    grey = Image.fromarray(grey.astype(np.uint8))
    transparent = image.info.get("transparency")
    if transparent is None:
        return grey
    alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
    return Image.merge("LA", (grey, Image.fromarray(alpha)))


def unsupported(image: Image.Image, name: str) -> UsageError:
    return UsageError(
        f"cannot read image {name}: mode {image.mode} has no defined conversion to RGB; "
        "save it as RGB (or RGBA, L, CMYK) first"
    )
