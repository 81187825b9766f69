"""Every class of bad or odd image decodes to RGB or fails with its reason (DESIGN §6)."""

import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from capfilt.io.images import DecodeLimits, ImageDecodeError, decode_image, to_rgb
from capfilt.records import SAMPLE_FAILURE_REASONS, Reason
from capfilt.synthetic.broken import BLUE, RED, WHITE, good_jpeg, image_cases

CASES = image_cases()
BY_NAME = {c.name: c for c in CASES}


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but whose pixel data stops after a few bytes: decoding
    it can only fail as truncated, so image_too_large proves the limit was checked first."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64)))


def opened(data: bytes) -> Image.Image:
    """The file as PIL sees it, for checking what a fixture is (quietly: some are meant to be odd)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Image.open(io.BytesIO(data))


def decode_error(data: bytes, limits: DecodeLimits = DecodeLimits()) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, limits)
    assert info.value.reason in SAMPLE_FAILURE_REASONS
    assert info.value.detail.strip()
    return info.value


def pixel(img: Image.Image, x: int, y: int) -> np.ndarray:
    return np.asarray(img)[y, x].astype(int)


# --- the shared fixtures -----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case_decodes_or_fails_with_its_reason(case):
    if case.reason is not None:
        assert decode_error(case.data).reason == case.reason
        return
    img = decode_image(case.data)
    assert img.mode == "RGB"
    assert not isinstance(img, ImageFile.ImageFile)  # a plain, loaded image: no reader behind it
    stored = opened(case.data).size
    assert img.size == (stored if case.name != "exif_rotated_jpeg" else stored[::-1])
    if case.expect_rgb is not None:
        centre = pixel(img, img.width // 2, img.height // 2)
        assert np.abs(centre - case.expect_rgb).max() <= 6, (case.name, centre)


def test_cases_cover_the_required_classes_and_stay_small():
    required = {
        "zero_byte": Reason.EMPTY_FILE,
        "html_as_jpg": Reason.NOT_AN_IMAGE,
        "random_bytes": Reason.NOT_AN_IMAGE,
        "truncated_jpeg": Reason.TRUNCATED_IMAGE,
        "corrupt_png": Reason.CORRUPT_IMAGE,
        "tiny_4x4": Reason.IMAGE_TOO_SMALL,
        "bomb_png": Reason.IMAGE_TOO_LARGE,
        **{
            name: None
            for name in (
                "cmyk_jpeg",
                "palette_png",
                "palette_transparent_png",
                "rgba_png",
                "la_png",
                "png_16bit",
                "grayscale_jpeg",
                "animated_gif",
                "webp",
                "exif_rotated_jpeg",
                "mode_1_png",
            )
        },
    }
    assert {name: BY_NAME[name].reason for name in required} == required
    assert len(BY_NAME) == len(CASES)  # names are unique
    assert all(len(c.data) < 50_000 and c.ext in ("jpg", "png", "webp", "gif") for c in CASES)
    assert image_cases() == CASES  # deterministic


def test_fixtures_are_what_their_names_say():
    def fixture(name):
        return opened(BY_NAME[name].data)

    assert fixture("bomb_png").size == (10_000, 10_000) and fixture("bomb_png").mode == "1"
    assert fixture("cmyk_jpeg").mode == "CMYK"
    assert fixture("png_16bit").mode.startswith("I;16")
    assert fixture("la_png").mode == "LA"
    assert fixture("mode_1_png").mode == "1"
    assert fixture("exif_rotated_jpeg").getexif()[0x0112] == 6
    for name in ("animated_gif", "animated_webp", "animated_png"):
        assert fixture(name).n_frames == 2, name
    assert good_jpeg(3) == good_jpeg(3) != good_jpeg(4)
    assert decode_image(good_jpeg(size=48)).size == (48, 48)


# --- RGB normalisation -------------------------------------------------------------------------


def test_transparency_is_composited_on_white():
    for name in ("rgba_png", "palette_transparent_png"):
        img = decode_image(BY_NAME[name].data)
        assert tuple(pixel(img, 1, 1)) == RED  # the opaque corner keeps its colour
        assert tuple(pixel(img, 20, 20)) == WHITE  # transparent black is white, not black
    half = decode_image(save(Image.new("RGBA", (32, 32), (0, 0, 0, 128)), "PNG"))
    assert abs(pixel(half, 5, 5) - 127).max() <= 1  # 50% black over white


def test_16bit_and_wide_modes_are_scaled_not_clipped():
    levels = np.array([[0, 32768, 65535]], np.uint16).repeat(16, axis=0).repeat(16, axis=1)  # 16x48
    for data in (
        save(Image.fromarray(levels), "PNG"),  # opens as I;16
        save(Image.frombytes("I;16B", (48, 16), levels.astype(">u2").tobytes()), "TIFF"),
        save(Image.fromarray(levels.astype(np.int32)), "TIFF"),
    ):  # opens as I (32-bit)
        img = decode_image(data)
        assert [pixel(img, x, 8)[0] for x in (8, 24, 40)] == [0, 128, 255]
    floats = np.array([[0.0, 0.5, 1.0]], np.float32).repeat(16, axis=0).repeat(16, axis=1)
    for scale in (1.0, 1000.0):  # 0..1, and an arbitrary range stretched to its min..max
        img = decode_image(save(Image.fromarray(floats * scale), "TIFF"))
        assert [pixel(img, x, 8)[0] for x in (8, 24, 40)] == [0, 128, 255]


def test_exif_orientation_is_applied():
    data = BY_NAME["exif_rotated_jpeg"].data
    assert opened(data).size == (64, 32)
    img = decode_image(data)
    assert img.size == (32, 64)
    assert abs(pixel(img, 16, 8) - RED).max() <= 10  # the stored left half is on top after orientation 6
    assert abs(pixel(img, 16, 56) - BLUE).max() <= 10
    assert decode_image(data, DecodeLimits(max_side=32)).size == (16, 32)  # downsized after rotation


def test_unconvertible_mode_is_unsupported():
    with pytest.raises(ImageDecodeError) as info:
        to_rgb(Image.new("La", (4, 4)))  # premultiplied LA: PIL has no conversion from it
    assert info.value.reason == Reason.UNSUPPORTED_MODE and "La" in info.value.detail


# --- limits ------------------------------------------------------------------------------------


def test_downsizing_keeps_aspect_and_limit():
    png = save(Image.new("RGB", (1000, 400), (1, 2, 3)), "PNG")
    assert decode_image(png, DecodeLimits(max_side=100)).size == (100, 40)
    assert decode_image(png, DecodeLimits(max_side=0)).size == (1000, 400)
    assert decode_image(png, DecodeLimits(max_side=1000)).size == (1000, 400)
    portrait = save(Image.new("RGB", (300, 1000)), "PNG")
    assert decode_image(portrait, DecodeLimits(max_side=100)).size == (30, 100)


def test_big_jpeg_is_downsized_with_its_content():
    img = Image.new("RGB", (2048, 1000), BLUE)
    img.paste(RED, (0, 0, 1024, 1000))
    small = decode_image(save(img, "JPEG", quality=90), DecodeLimits(max_side=256))
    assert small.size == (256, 125)
    assert abs(pixel(small, 20, 60) - RED).max() <= 10 and abs(pixel(small, 236, 60) - BLUE).max() <= 10


def test_min_side_applies_before_downsizing():
    strip = save(Image.new("RGB", (1000, 20)), "PNG")
    assert decode_image(strip, DecodeLimits(min_side=16, max_side=100)).size == (100, 2)
    assert decode_error(strip, DecodeLimits(min_side=21)).reason == Reason.IMAGE_TOO_SMALL
    assert decode_image(BY_NAME["tiny_4x4"].data, DecodeLimits(min_side=4)).size == (4, 4)


def test_max_pixels_is_checked_from_the_header_before_decoding():
    claims = header_only_png(6000, 6000)  # 36M pixels claimed, a few bytes of data
    assert decode_error(claims).reason == Reason.TRUNCATED_IMAGE  # within the limit: decoded, and cut short
    err = decode_error(claims, DecodeLimits(max_pixels=35_999_999))
    assert err.reason == Reason.IMAGE_TOO_LARGE and "6000x6000" in err.detail  # never got to the pixels
    bomb = decode_error(BY_NAME["bomb_png"].data)
    assert bomb.reason == Reason.IMAGE_TOO_LARGE and "10000x10000" in bomb.detail


def test_max_pixels_boundary_is_as_configured():
    png = save(Image.new("RGB", (200, 100)), "PNG")
    assert decode_error(png, DecodeLimits(max_pixels=19_999)).reason == Reason.IMAGE_TOO_LARGE
    assert decode_image(png, DecodeLimits(max_pixels=20_000)).size == (200, 100)


def test_pil_bomb_guard_is_reported_as_too_large():
    # 10^10 pixels is beyond PIL's own guard (2 * MAX_IMAGE_PIXELS), whatever max_pixels says.
    err = decode_error(header_only_png(100_000, 100_000), DecodeLimits(max_pixels=10**11))
    assert err.reason == Reason.IMAGE_TOO_LARGE and "bomb" in err.detail


def test_limits_are_validated():
    for bad in ({"min_side": -1}, {"max_side": -1}, {"max_pixels": 0}):
        with pytest.raises(ValueError):
            DecodeLimits(**bad)


# --- classification of broken bytes ------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
@pytest.mark.parametrize("keep", [0.02, 0.1, 0.5, 0.9])
def test_a_file_cut_short_is_truncated_wherever_it_is_cut(fmt, keep):
    photo = Image.open(io.BytesIO(good_jpeg(5, 96)))
    data = save(photo if fmt != "GIF" else photo.convert("P"), fmt)
    assert decode_error(data[: max(16, int(len(data) * keep))]).reason == Reason.TRUNCATED_IMAGE


def test_other_formats_are_refused_not_handed_to_pil_plugins():
    assert decode_error(save(Image.new("RGB", (32, 32)), "PPM")).reason == Reason.NOT_AN_IMAGE
    assert decode_error(save(Image.new("RGB", (32, 32)), "ICO")).reason == Reason.NOT_AN_IMAGE
    for fmt in ("BMP", "TIFF"):  # these do turn up in crawls
        assert decode_image(save(Image.new("RGB", (32, 32), RED), fmt)).getpixel((5, 5)) == RED


def test_not_an_image_detail_shows_the_start_of_the_bytes():
    assert "<!DOCTYPE html>" in decode_error(BY_NAME["html_as_jpg"].data).detail


# --- no global side effects; the error travels -------------------------------------------------


def test_decoding_changes_no_global_state_and_leaks_no_warnings():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for case in CASES:
            try:
                decode_image(case.data)
            except ImageDecodeError:
                pass
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters)) == before
    assert [str(w.message) for w in seen] == []  # PIL's notes on bad input went into the details


def test_error_pickles_and_rejects_unknown_reasons():
    err = ImageDecodeError(Reason.CORRUPT_IMAGE, "bad IDAT")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.detail, str(back)) == (Reason.CORRUPT_IMAGE, "bad IDAT", "corrupt_image: bad IDAT")
    with pytest.raises(ValueError):
        ImageDecodeError("no_such_reason", "x")
