"""Safe image decoding: bytes -> RGB image, or an `ImageDecodeError` carrying a ledger reason.

Web images are hostile input. `decode_image`:

- reads width and height from the header and enforces `DecodeLimits` before a single pixel is
  decoded (decompression bombs; tiny images are refused without decoding too);
- opens only the raster formats the web serves (`ACCEPTED_FORMATS`), never PIL's long tail of
  plugins (EPS, for one, would run Ghostscript on load);
- never changes PIL's process-wide settings (`Image.MAX_IMAGE_PIXELS`,
  `ImageFile.LOAD_TRUNCATED_IMAGES`), so importing capfilt changes nothing for its host;
- normalises every odd-but-valid image to RGB: EXIF orientation applied, alpha composited on
  white, 16-bit and float scaled (not clipped), CMYK and palette converted, animations reduced to
  their first frame.

PIL reports per-image oddities (corrupt EXIF, truncated reads, bomb heuristics) as warnings. Each
call records its own: they go into the failure detail when the image fails and are dropped when it
decodes, so a job over millions of images does not flood its log. The recording uses
`warnings.catch_warnings`, which is process-global before Python 3.14: decode from one thread per
process (as the runners do), not from a thread pool.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from capfilt.records import SAMPLE_FAILURE_REASONS, Reason

# The formats web crawls serve (AVIF often under a .jpg URL, by content negotiation). MPO camera
# JPEGs come in through the JPEG opener.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")

_PIL_DIR = os.path.dirname(Image.__file__)


@dataclass(frozen=True)
class DecodeLimits:
    # Smaller side below this -> image_too_small. Checked on the header size, which equals the size
    # after EXIF rotation for this purpose (a rotation swaps the sides, not their minimum).
    min_side: int = 16
    # width*height from the header above this -> image_too_large, before any pixel is decoded.
    # PIL's own bomb guard (2 * Image.MAX_IMAGE_PIXELS, ~179M pixels) still refuses bigger images;
    # a process that needs more raises Image.MAX_IMAGE_PIXELS itself.
    max_pixels: int = 50_000_000
    # Downsize so the longer side is at most this (0 = never). JPEGs decode at a reduced DCT scale
    # first (Image.draft), which skips most of the decoding work for big photos.
    max_side: int = 1024

    def __post_init__(self):
        if self.min_side < 0 or self.max_side < 0 or self.max_pixels < 1:
            raise ValueError(f"invalid {self}: min_side and max_side must be >= 0, max_pixels >= 1")


class ImageDecodeError(Exception):
    """An image that cannot be used. `.reason` is a `records.Reason` value; `.detail` says why."""

    def __init__(self, reason: str, detail: str):
        if reason not in SAMPLE_FAILURE_REASONS:
            raise ValueError(f"unknown failure reason {reason!r}")
        # Both in args, so the error pickles (Ray and multiprocessing send errors between processes).
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """A fully loaded RGB image, with no file handle behind it, or ImageDecodeError(reason, detail)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # record every warning of this call, repeats included
        try:
            image, error = _decode(data, limits), None
        except ImageDecodeError as err:
            image, error = None, err
    # Warnings that are not PIL's notes about the input (deprecations, our own) reach the caller's filters.
    for w in caught:
        if not _from_pil(w):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if error is not None:
        notes = [str(w.message) for w in caught if _from_pil(w) and w.category is not Image.DecompressionBombWarning]
        if notes:
            error = ImageDecodeError(error.reason, f"{error.detail} (PIL warned: {notes[0][:200]})")
        raise error
    return image


def to_rgb(img: Image.Image) -> Image.Image:
    """Any loaded PIL image as mode RGB: alpha on white, 16-bit/float scaled, everything else converted."""
    mode = img.mode
    if mode.startswith("I;16"):
        return _grey_to_rgb(np.asarray(img, dtype=np.float64), 0.0, 65535.0)
    if mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = arr.min(), arr.max()
        # 16-bit data widened to 32-bit ints (PNG, PGM): keep its 0..65535 scale so a dark image stays dark.
        return _grey_to_rgb(arr, *((0.0, 65535.0) if lo >= 0 and hi <= 65535 else (lo, hi)))
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
        # Floats are usually normalised to 0..1; anything else (depth, HDR) is stretched to its range.
        return _grey_to_rgb(arr, *((0.0, 1.0) if lo >= 0 and hi <= 1 else (lo, hi)))
    try:
        if img.has_transparency_data:  # RGBA, LA, PA, premultiplied, or a transparent palette/colour key
            rgba = img.convert("RGBA")
            white = Image.new("RGB", rgba.size, (255, 255, 255))
            white.paste(rgba, (0, 0), rgba)  # the alpha channel is the paste mask: compositing "over" white
            return white
        return img if mode == "RGB" else img.convert("RGB")
    except ValueError as err:  # PIL has no conversion path for this mode
        raise ImageDecodeError(Reason.UNSUPPORTED_MODE, f"mode {mode}: {err}") from None


def _decode(data: bytes, limits: DecodeLimits) -> Image.Image:
    img = _open(data, limits)
    if limits.max_side and max(img.size) > limits.max_side and img.format in ("JPEG", "MPO"):
        img.draft(None, _fit(img.size, limits.max_side))  # DCT-scaled decoding, to a size still >= the target
    _load(img, data)
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not fail an otherwise good image
        pass
    rgb = to_rgb(img)
    if limits.max_side and max(rgb.size) > limits.max_side:
        rgb = rgb.resize(_fit(rgb.size, limits.max_side), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if isinstance(rgb, ImageFile.ImageFile):  # still the opened file object: detach it from its reader
        rgb = rgb.copy()
    return rgb


def _open(data: bytes, limits: DecodeLimits) -> ImageFile.ImageFile:
    """Parse the header only, and enforce the limits that need no pixels."""
    if not data:
        raise ImageDecodeError(Reason.EMPTY_FILE, "zero-byte image member")
    try:
        img = Image.open(io.BytesIO(data), formats=_formats())
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(Reason.IMAGE_TOO_LARGE, f"PIL's decompression-bomb guard: {err}") from None
    except UnidentifiedImageError:
        kind = _sniff(data)
        if kind is None:
            raise ImageDecodeError(
                Reason.NOT_AN_IMAGE, f"not a {'/'.join(_formats())} image; starts with {data[:24]!r}"
            ) from None
        # A real image signature whose header PIL cannot parse: most often a download cut short.
        reason = Reason.TRUNCATED_IMAGE if _ends_early(data, kind) else Reason.CORRUPT_IMAGE
        raise ImageDecodeError(reason, f"{kind} signature but unreadable header ({len(data)} bytes)") from None
    except Exception as err:  # noqa: BLE001 - any other header failure on hostile bytes is the image's fault
        raise ImageDecodeError(_broken_reason(err, data), f"header: {type(err).__name__}: {err}") from None
    width, height = img.size
    if width * height > limits.max_pixels:
        raise ImageDecodeError(
            Reason.IMAGE_TOO_LARGE, f"{width}x{height} = {width * height} pixels > max_pixels {limits.max_pixels}"
        )
    if min(width, height) < limits.min_side:
        raise ImageDecodeError(Reason.IMAGE_TOO_SMALL, f"{width}x{height} is below min_side {limits.min_side}")
    return img


def _load(img: ImageFile.ImageFile, data: bytes) -> None:
    """Decode the pixels of the current (first) frame."""
    try:
        img.load()
    except Image.DecompressionBombError as err:  # a frame bigger than the header said (GIF)
        raise ImageDecodeError(Reason.IMAGE_TOO_LARGE, f"PIL's decompression-bomb guard: {err}") from None
    except Exception as err:  # noqa: BLE001 - OSError mostly, but decoders raise others on hostile data
        raise ImageDecodeError(_broken_reason(err, data), f"{img.format} data: {type(err).__name__}: {err}") from None


def _broken_reason(err: Exception, data: bytes) -> str:
    text = str(err).lower()
    if "truncated" in text or "premature" in text or isinstance(err, EOFError):
        return Reason.TRUNCATED_IMAGE
    kind = _sniff(data)
    return Reason.TRUNCATED_IMAGE if kind and _ends_early(data, kind) else Reason.CORRUPT_IMAGE


def _sniff(data: bytes) -> str | None:
    """The format a file's magic bytes claim, for the formats whose end we can also recognise."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _ends_early(data: bytes, kind: str) -> bool:
    """Whether the container's own end marker is missing: the bytes stop before the file does.

    Only consulted after PIL has failed, so a harmless trailer after the end marker (some cameras
    append one) never fails a good image.
    """
    tail = data.rstrip(b"\x00\r\n ")  # padding some servers append
    if kind == "JPEG":
        return not tail.endswith(b"\xff\xd9")  # EOI; cannot occur inside entropy-coded data
    if kind == "PNG":
        return b"IEND" not in data[-64:]
    if kind == "GIF":
        return not tail.endswith(b";")  # the GIF trailer byte
    if kind == "WEBP":
        return len(data) < 8 + int.from_bytes(data[4:8], "little")  # the RIFF header states the size
    return False


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    width, height = size
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _grey_to_rgb(arr: np.ndarray, lo: float, hi: float) -> Image.Image:
    scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8)).convert("RGB")


def _from_pil(w: warnings.WarningMessage) -> bool:
    return os.path.dirname(w.filename) == _PIL_DIR


@cache
def _formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin, so the test below sees AVIF where this PIL build has it
    return tuple(f for f in ACCEPTED_FORMATS if f in Image.OPEN)
