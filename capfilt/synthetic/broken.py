"""Broken and odd image files (the image classes of DESIGN §6), for the tests and the `--broken`
synthetic corpus: every one a case with the decode failure it must produce, or the RGB it must
decode to. Everything here is built in memory, deterministically, in well under a second; every case
is a few KB at most.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

from capfilt.records import Reason


@dataclass(frozen=True)
class ImageCase:
    name: str  # e.g. "html_as_jpg"
    ext: str  # member extension to store it under: jpg, png, webp, gif
    data: bytes
    reason: str | None  # expected decode failure (a records.Reason); None = must decode to RGB
    expect_rgb: tuple[int, int, int] | None = None  # centre pixel of a decodable case, where meaningful


RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
EXIF_ORIENTATION = 0x0112


def good_jpeg(seed: int = 0, size: int = 64) -> bytes:
    """A valid RGB JPEG of smooth random colour blobs (noise would make it needlessly big)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return _save(small.resize((size, size), Image.Resampling.BICUBIC), "JPEG", quality=90)


def image_cases() -> list[ImageCase]:
    jpeg = good_jpeg(1, 128)
    return [
        # --- failures: each must come back as exactly this reason ---
        ImageCase("zero_byte", "jpg", b"", Reason.EMPTY_FILE),
        ImageCase(
            "html_as_jpg",
            "jpg",
            b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>\n",
            Reason.NOT_AN_IMAGE,
        ),
        ImageCase(
            "random_bytes",
            "jpg",
            np.random.default_rng(7).integers(0, 256, 600, dtype=np.uint8).tobytes(),
            Reason.NOT_AN_IMAGE,
        ),
        ImageCase("truncated_jpeg", "jpg", jpeg[: len(jpeg) // 2], Reason.TRUNCATED_IMAGE),
        ImageCase("corrupt_png", "png", _corrupt_png(), Reason.CORRUPT_IMAGE),
        ImageCase("tiny_4x4", "png", _save(Image.new("RGB", (4, 4), RED), "PNG"), Reason.IMAGE_TOO_SMALL),
        ImageCase("bomb_png", "png", _bomb_png(10_000, 10_000), Reason.IMAGE_TOO_LARGE),
        # --- odd but valid: each must decode to RGB ---
        ImageCase("cmyk_jpeg", "jpg", _save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), None, RED),
        ImageCase("palette_png", "png", _save(Image.new("RGB", (32, 32), BLUE).convert("P"), "PNG"), None, BLUE),
        ImageCase("palette_transparent_png", "png", _palette_transparent(), None, WHITE),
        ImageCase("rgba_png", "png", _rgba(), None, WHITE),
        ImageCase("la_png", "png", _save(Image.new("LA", (32, 32), (0, 0)), "PNG"), None, WHITE),
        ImageCase(
            "png_16bit",
            "png",
            _save(Image.fromarray(np.full((32, 32), 32768, np.uint16)), "PNG"),
            None,
            (128, 128, 128),
        ),
        ImageCase("grayscale_jpeg", "jpg", _save(Image.new("L", (32, 32), 100), "JPEG"), None, (100, 100, 100)),
        ImageCase("mode_1_png", "png", _save(Image.new("1", (32, 32), 1), "PNG"), None, WHITE),
        ImageCase("webp", "webp", _save(Image.new("RGB", (32, 32), GREEN), "WEBP", lossless=True), None, GREEN),
        ImageCase("animated_gif", "gif", _animated("GIF", RED, BLUE), None, RED),
        ImageCase("animated_webp", "webp", _animated("WEBP", GREEN, RED, lossless=True), None, GREEN),
        ImageCase("animated_png", "png", _animated("PNG", BLUE, GREEN), None, BLUE),
        # Stored 64x32, left half red, right half blue; displayed 32x64 with red on top.
        ImageCase("exif_rotated_jpeg", "jpg", _exif_rotated(), None),
        ImageCase(
            "broken_exif_jpeg",
            "jpg",
            _save(Image.new("RGB", (32, 32), BLUE), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff"),
            None,
            BLUE,
        ),
    ]


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _corrupt_png() -> bytes:
    """A valid signature, IHDR and IEND around an IDAT of garbage (with a correct CRC, so the file is
    complete and only inflating the pixels fails)."""
    ihdr = struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0)  # 32x32, 8-bit RGB
    garbage = b"\x78\x9c" + bytes(range(7, 200))  # a zlib header, then no valid deflate stream
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", garbage) + _png_chunk(b"IEND", b"")


@cache  # deflating 12 MB of zeros is most of image_cases()' build time
def _bomb_png(width: int, height: int) -> bytes:
    """A real, complete 1-bit PNG: all-zero rows deflate ~1000:1, so 10^8 pixels take ~12 KB."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    pixels = zlib.compress(row * height, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


def _palette_transparent() -> bytes:
    """Index 0 transparent everywhere but a red top-left corner (index 1, opaque)."""
    img = Image.new("P", (32, 32), 0)
    img.putpalette([10, 20, 30, *RED])
    img.paste(1, (0, 0, 8, 8))
    return _save(img, "PNG", transparency=0)


def _rgba() -> bytes:
    """Fully transparent black (must become white, not black) but an opaque red top-left corner."""
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    img.paste((*RED, 255), (0, 0, 8, 8))
    return _save(img, "PNG")


def _animated(fmt: str, first: tuple, second: tuple, **kw) -> bytes:
    frames = [Image.new("RGB", (32, 32), first), Image.new("RGB", (32, 32), second)]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)


def _exif_rotated() -> bytes:
    img = Image.new("RGB", (64, 32), BLUE)
    img.paste(RED, (0, 0, 32, 32))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # display rotated 90° clockwise: width and height swap
    return _save(img, "JPEG", exif=exif.tobytes(), quality=95)
