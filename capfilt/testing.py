"""Broken and odd image fixtures (one per failure class of DESIGN §6), shared by the tests and the
`--broken` synthetic corpus."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from capfilt.records import Reason


@dataclass(frozen=True)
class ImageCase:
    name: str
    ext: str
    data: bytes
    reason: str | None  # expected decode failure; None = must decode to RGB
    expect_rgb: tuple[int, int, int] | None = None  # centre pixel of a decodable case, where meaningful


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def good_jpeg(seed: int = 0, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    return _save(Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)), "JPEG", quality=90)


def _corrupt_png() -> bytes:
    """A valid signature and IHDR, then an IDAT of garbage (with a correct CRC, so only inflate fails)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x78\x9c" + bytes(range(7, 200))) + \
        chunk(b"IEND", b"")


def _exif_rotated() -> bytes:
    img = Image.new("RGB", (64, 32), (0, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display, so width and height swap
    return _save(img, "JPEG", exif=exif.tobytes())


def _animated() -> bytes:
    frames = [Image.new("P", (32, 32), 0), Image.new("P", (32, 32), 1)]
    palette = [255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6)
    for f in frames:
        f.putpalette(palette)
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def image_cases() -> list[ImageCase]:
    jpeg = good_jpeg(1, 128)
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    palette_t = Image.new("P", (32, 32), 0)
    palette_t.putpalette([10, 20, 30] * 256)
    grey16 = Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))
    return [
        ImageCase("zero_byte", "jpg", b"", Reason.EMPTY_FILE),
        ImageCase("html_as_jpg", "jpg", b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
                  Reason.NOT_AN_IMAGE),
        ImageCase("random_bytes", "jpg", bytes(np.random.default_rng(7).integers(0, 255, 600, dtype=np.uint8)),
                  Reason.NOT_AN_IMAGE),
        ImageCase("truncated_jpeg", "jpg", jpeg[: len(jpeg) // 2], Reason.TRUNCATED_IMAGE),
        ImageCase("corrupt_png", "png", _corrupt_png(), Reason.CORRUPT_IMAGE),
        ImageCase("tiny_4x4", "png", _save(Image.new("RGB", (4, 4), (9, 9, 9)), "PNG"), Reason.IMAGE_TOO_SMALL),
        ImageCase("bomb_png", "png", _save(Image.new("1", (10000, 10000), 0), "PNG", optimize=True),
                  Reason.IMAGE_TOO_LARGE),
        ImageCase("cmyk_jpeg", "jpg", _save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), None,
                  (255, 0, 0)),
        ImageCase("palette_png", "png", _save(Image.new("RGB", (32, 32), (0, 0, 255)).convert("P"), "PNG"), None,
                  (0, 0, 255)),
        ImageCase("palette_transparent_png", "png", _save(palette_t, "PNG", transparency=0), None, (255, 255, 255)),
        ImageCase("rgba_png", "png", _save(rgba, "PNG"), None, (255, 255, 255)),
        ImageCase("la_png", "png", _save(Image.new("LA", (32, 32), (0, 0)), "PNG"), None, (255, 255, 255)),
        ImageCase("png_16bit", "png", _save(grey16, "PNG"), None, (128, 128, 128)),
        ImageCase("grayscale_jpeg", "jpg", _save(Image.new("L", (32, 32), 100), "JPEG"), None, (100, 100, 100)),
        ImageCase("animated_gif", "gif", _animated(), None, (255, 0, 0)),
        ImageCase("webp", "webp", _save(Image.new("RGB", (32, 32), (0, 255, 0)), "WEBP", lossless=True), None,
                  (0, 255, 0)),
        ImageCase("exif_rotated_jpeg", "jpg", _exif_rotated(), None, (0, 200, 0)),
        ImageCase("mode_1_png", "png", _save(Image.new("1", (32, 32), 1), "PNG"), None, (255, 255, 255)),
    ]
