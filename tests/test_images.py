"""Every class of bad or odd image decodes to RGB or fails with its reason."""

import io

import numpy as np
import pytest
from PIL import Image

from capfilt.io.images import DecodeLimits, ImageDecodeError, decode_image
from capfilt.testing import image_cases

CASES = image_cases()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case_decodes_or_fails_with_its_reason(case):
    if case.reason is None:
        img = decode_image(case.data)
        assert img.mode == "RGB"
        if case.expect_rgb:
            centre = np.asarray(img)[img.height // 2, img.width // 2].astype(int)
            assert np.abs(centre - case.expect_rgb).max() <= 6, (case.name, centre)
    else:
        with pytest.raises(ImageDecodeError) as err:
            decode_image(case.data)
        assert err.value.reason == case.reason
        assert err.value.detail


def test_exif_orientation_is_applied():
    case = next(c for c in CASES if c.name == "exif_rotated_jpeg")
    assert Image.open(io.BytesIO(case.data)).size == (64, 32)
    assert decode_image(case.data).size == (32, 64)


def test_downsizing_keeps_aspect_and_limit():
    buf = io.BytesIO()
    Image.new("RGB", (1000, 400), (1, 2, 3)).save(buf, "PNG")
    assert decode_image(buf.getvalue(), DecodeLimits(max_side=100)).size == (100, 40)
    assert decode_image(buf.getvalue(), DecodeLimits(max_side=0)).size == (1000, 400)


def test_pixel_limit_is_configurable():
    buf = io.BytesIO()
    Image.new("RGB", (200, 100), (1, 2, 3)).save(buf, "PNG")
    with pytest.raises(ImageDecodeError, match="image_too_large"):
        decode_image(buf.getvalue(), DecodeLimits(max_pixels=19_999))
    assert decode_image(buf.getvalue(), DecodeLimits(max_pixels=20_000)).size == (200, 100)
