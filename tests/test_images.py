"""images.open_image, mode by mode: each file written in that mode, read back, and compared
with the picture built by hand (numpy) that a person sees; transparency on white, as the
families' processors (transformers' convert_to_rgb) composite it."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, features
from transformers.image_transforms import convert_to_rgb

from sysattn_exp.benchmarks.images import decode_errors, open_image, to_rgb
from sysattn_exp.errors import UsageError

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255,) * 3, (0,) * 3


def saved(tmp_path, image: Image.Image, name: str, **options):
    path = tmp_path / name
    image.save(path, **options)
    return path


def rgb_of(grey: np.ndarray) -> np.ndarray:
    """A grey picture (H, W) as the RGB one a person sees: the value in all three channels."""
    return np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)


def on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """colour (H, W, 3) with alpha (H, W) over white, rounded to the nearest 8-bit value."""
    a = alpha[..., None].astype(np.float64) / 255
    return np.floor(colour * a + 255 * (1 - a) + 0.5).astype(np.uint8)


def pixels(path) -> np.ndarray:
    image = open_image(path)
    assert image.mode == "RGB" and "transparency" not in image.info
    return np.asarray(image)


def test_one_bit(tmp_path):
    bits = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)
    path = saved(tmp_path, Image.fromarray(bits), "bits.png")
    assert Image.open(path).mode == "1"
    assert (pixels(path) == rgb_of(bits * 255)).all()


def test_grey(tmp_path):
    grey = np.array([[0, 17, 128], [200, 254, 255]], dtype=np.uint8)
    path = saved(tmp_path, Image.fromarray(grey), "grey.png")
    assert (pixels(path) == rgb_of(grey)).all()


def test_grey_with_alpha_on_white(tmp_path):
    grey = np.array([[0, 100, 200, 50]], dtype=np.uint8)
    alpha = np.array([[0, 255, 128, 1]], dtype=np.uint8)
    path = saved(tmp_path, Image.fromarray(np.stack([grey, alpha], -1)), "la.png")
    assert Image.open(path).mode == "LA"
    assert (pixels(path) == on_white(rgb_of(grey).astype(float), alpha)).all()
    assert pixels(path)[0, 0].tolist() == [255, 255, 255]  # transparent black is white


def test_palette_without_and_with_transparency(tmp_path):
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    palette = [*RED, *GREEN, *BLUE]
    image = Image.frombytes("P", (3, 2), indices.tobytes())
    image.putpalette(palette)
    colours = np.array([RED, GREEN, BLUE], dtype=np.uint8)
    plain = saved(tmp_path, image, "p.png")
    assert (pixels(plain) == colours[indices]).all()
    # Index 1 (green) transparent: a tRNS entry, as a palette PNG saved with transparency.
    transparent = saved(tmp_path, image, "p_trns.png", transparency=1)
    assert Image.open(transparent).info["transparency"] == 1
    expected = colours[indices].copy()
    expected[indices == 1] = WHITE
    assert (pixels(transparent) == expected).all()


def test_palette_with_alpha_band():
    image = Image.new("PA", (2, 1))
    image.putpalette([*RED, *BLUE])
    image.putdata([(0, 255), (1, 0)])
    assert np.asarray(to_rgb(image, "pa")).tolist() == [[list(RED), list(WHITE)]]


def test_rgb_and_rgb_with_a_transparent_colour(tmp_path):
    colour = np.array([[RED, BLACK], [BLUE, BLACK]], dtype=np.uint8)
    path = saved(tmp_path, Image.fromarray(colour), "rgb.png")
    assert (pixels(path) == colour).all()
    trns = saved(tmp_path, Image.fromarray(colour), "rgb_trns.png", transparency=BLACK)
    assert Image.open(trns).info["transparency"] == BLACK
    expected = np.array([[RED, WHITE], [BLUE, WHITE]], dtype=np.uint8)
    assert (pixels(trns) == expected).all()


def test_grey_with_a_transparent_value(tmp_path):
    grey = np.array([[0, 90, 0]], dtype=np.uint8)
    path = saved(tmp_path, Image.fromarray(grey), "l_trns.png", transparency=0)
    assert (pixels(path) == rgb_of(np.array([[255, 90, 255]]))).all()


def test_rgba_on_white(tmp_path):
    colour = np.array([[RED, BLACK, BLUE, (10, 20, 30)]], dtype=np.uint8)
    alpha = np.array([[255, 0, 64, 200]], dtype=np.uint8)
    path = saved(tmp_path, Image.fromarray(np.dstack([colour, alpha])), "rgba.png")
    assert (pixels(path) == on_white(colour.astype(float), alpha)).all()
    assert pixels(path)[0, 1].tolist() == [255, 255, 255]  # not the black stored beneath


def test_cmyk(tmp_path):
    """Pillow's conversion, the processors' (no ICC profile): X = (255 - ink)(255 - K) / 255."""
    cmyk = np.array([[(0, 255, 255, 0), (0, 0, 0, 255), (0, 0, 0, 0), (255, 0, 0, 102)]])
    image = Image.frombytes("CMYK", (4, 1), cmyk.astype(np.uint8).tobytes())
    expected = np.floor(
        (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255 + 0.5
    )  # cyan at K 102: (0, 153, 153)
    path = saved(tmp_path, image, "cmyk.tif")
    assert Image.open(path).mode == "CMYK"
    assert np.abs(pixels(path).astype(int) - expected).max() <= 1
    jpeg = saved(tmp_path, image.resize((32, 8), Image.NEAREST), "cmyk.jpg", quality=100)
    assert Image.open(jpeg).mode == "CMYK"
    # Each colour fills an 8 x 8 block: its centre, after JPEG's loss, is close to it.
    centres = pixels(jpeg)[4, [4, 12, 20, 28]].astype(int)
    assert np.abs(centres - expected[0]).max() <= 3


def test_ycbcr(tmp_path):
    """YCbCr (JPEG's BT.601 full range) to RGB: R = Y + 1.402 (Cr - 128), ..."""
    ycc = np.array([[(81, 90, 240), (145, 54, 34), (128, 128, 128)]], dtype=np.float64)
    y, cb, cr = (ycc[..., k] for k in range(3))
    expected = np.stack(
        [
            y + 1.402 * (cr - 128),
            y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
            y + 1.772 * (cb - 128),
        ],
        -1,
    ).clip(0, 255)
    image = Image.frombytes("YCbCr", (3, 1), ycc.astype(np.uint8).tobytes())
    assert np.abs(np.asarray(to_rgb(image, "ycc")).astype(int) - expected).max() <= 1
    # A YCbCr JPEG (the usual kind) arrives as RGB from libjpeg.
    jpeg = saved(tmp_path, image.resize((24, 8), Image.NEAREST), "ycc.jpg", quality=100)
    centres = pixels(jpeg)[4, [4, 12, 20]].astype(int)
    assert np.abs(centres - expected[0]).max() <= 3


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16)
    path = saved(tmp_path, Image.fromarray(values), "grey16.png")
    assert Image.open(path).mode == "I;16"
    # v / 257, rounded: 1000 -> 3.89 -> 4; Pillow's own convert would give 255 for all but 0.
    assert (pixels(path) == rgb_of(np.array([[0, 1, 4, 128, 255]]))).all()


def test_sixteen_bit_grey_with_a_transparent_value(tmp_path):
    values = np.array([[0, 65535, 0]], dtype=np.uint16)
    path = saved(tmp_path, Image.fromarray(values), "grey16_trns.png", transparency=0)
    assert Image.open(path).info["transparency"] == 0
    assert (pixels(path) == rgb_of(np.array([[255, 255, 255]]))).all()
    values = np.array([[5140, 65535]], dtype=np.uint16)  # 5140 = 20 * 257
    path = saved(tmp_path, Image.fromarray(values), "grey16_trns2.png", transparency=65535)
    assert (pixels(path) == rgb_of(np.array([[20, 255]]))).all()


def test_big_endian_sixteen_bit_pgm_and_integer_mode(tmp_path):
    path = tmp_path / "grey16.pgm"
    path.write_bytes(b"P5\n3 1\n65535\n" + np.array([0, 2570, 65535], ">u2").tobytes())
    assert Image.open(path).mode == "I"  # Pillow reads 16-bit PGM as 32-bit integer grey
    assert (pixels(path) == rgb_of(np.array([[0, 10, 255]]))).all()


def test_thirty_two_bit_integer_grey_beyond_sixteen_bits_stops(tmp_path):
    path = saved(tmp_path, Image.fromarray(np.array([[0, 70000]], np.int32)), "grey32.tif")
    assert Image.open(path).mode == "I"
    with pytest.raises(UsageError, match=r"grey32.tif: mode I .*outside 0\.\.65535"):
        open_image(path)


def test_float_grey(tmp_path):
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    path = saved(tmp_path, Image.fromarray(values), "float.tif")
    assert Image.open(path).mode == "F"
    # round(255 v): 63.75 -> 64, 127.5 -> 128 (to even)
    assert (pixels(path) == rgb_of(np.array([[0, 64, 128, 255]]))).all()
    wide = saved(tmp_path, Image.fromarray(np.array([[0.0, 200.0]], np.float32)), "wide.tif")
    with pytest.raises(UsageError, match=r"wide.tif: mode F .*outside 0\.\.1"):
        open_image(wide)


def test_exif_orientation_is_not_applied_as_in_llava_eval(tmp_path):
    """LLaVA-1.5's evaluation opens images with Image.open(path).convert('RGB'): the stored
    pixels, whatever the EXIF orientation says."""
    stored = np.zeros((2, 3, 3), dtype=np.uint8)
    stored[0, 0] = RED
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = saved(tmp_path, image, "turned.png", exif=exif)
    assert Image.open(path).getexif()[0x0112] == 6
    assert np.asarray(ImageOps.exif_transpose(Image.open(path))).shape == (3, 2, 3)
    assert (pixels(path) == stored).all()


def frames(colours):
    return [Image.new("RGB", (4, 4), colour) for colour in colours]


def test_animated_gif_first_frame(tmp_path):
    first, *rest = frames([RED, BLUE, GREEN])
    path = saved(tmp_path, first, "anim.gif", save_all=True, append_images=rest, duration=50)
    assert Image.open(path).n_frames == 3
    assert (pixels(path) == np.array(RED, np.uint8)).all()


@pytest.mark.skipif(not features.check("webp"), reason="this Pillow has no WebP support")
def test_animated_webp_first_frame(tmp_path):
    first, *rest = frames([BLUE, RED])
    path = saved(tmp_path, first, "anim.webp", save_all=True, append_images=rest, lossless=True)
    assert Image.open(path).n_frames == 2
    assert (pixels(path) == np.array(BLUE, np.uint8)).all()


def test_animated_png_first_frame(tmp_path):
    first, *rest = frames([GREEN, RED])
    path = saved(tmp_path, first, "anim.png", save_all=True, append_images=rest)
    assert Image.open(path).n_frames == 2
    assert (pixels(path) == np.array(GREEN, np.uint8)).all()


def test_truncated_jpeg_fails_here_with_the_file_named(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = saved(tmp_path, Image.fromarray(noise), "full.jpg", quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with Image.open(cut) as header_only:  # the header alone still reads
        assert header_only.size == (64, 64)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(UsageError, match=r"^cannot read image .*cut\.jpg: image file is trunc"):
        open_image(cut)


def test_unknown_mode_stops_naming_file_and_mode():
    with pytest.raises(UsageError, match="lab.tif: mode LAB"):
        to_rgb(Image.new("LAB", (2, 2)), "lab.tif")


def test_bytes_source_is_named_as_given():
    with pytest.raises(UsageError, match=r"^cannot read image 7/Image_0 \(row 3, Image_0\): "):
        open_image(io.BytesIO(b"\x89PNG not really"), "7/Image_0 (row 3, Image_0)")


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr"])
def test_eight_bit_modes_match_transformers_convert_to_rgb(mode):
    """For every 8-bit mode, with and without transparency, the picture is the one the
    families' processors make of the same PIL image (transformers' convert_to_rgb)."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (5, 7, 4), dtype=np.uint8), "RGBA")
    image = base.convert(mode) if mode != "P" else base.convert("RGB").quantize(16)
    cases = [image]
    if mode in ("L", "P", "RGB"):
        keyed = image.copy()
        keyed.info["transparency"] = keyed.getpixel((0, 0))
        cases.append(keyed)
    for case in cases:
        ours = np.asarray(to_rgb(case, "x"))
        theirs = convert_to_rgb(case, return_numpy=True)
        assert (ours == theirs).all()


def test_the_case_pictures_are_one_picture():
    """The issue's case 02 (a copy in tests/data/cases): an RGB, an RGBA and a palette PNG of
    one red circle on white (or on transparency) reach the model as the same pixels."""
    folder = Path(__file__).parent / "data" / "cases" / "02-rgba-transparency"
    rgb = pixels(folder / "rgb.png")
    assert (pixels(folder / "rgba.png") == rgb).all()
    assert (pixels(folder / "p_trans.png") == rgb).all()
    assert rgb[2, 2].tolist() == [255, 255, 255]


def test_decode_errors_names_each_bad_image(tmp_path):
    good = saved(tmp_path, Image.new("RGB", (4, 4), RED), "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"no")
    errors = decode_errors(open_image, [good, bad, tmp_path / "absent.png"])
    assert errors[good] is None
    assert "bad.png" in errors[bad] and "absent.png" in errors[tmp_path / "absent.png"]
