"""Image messages <-> RGB arrays: encodings, row padding, truncation, compressed payloads."""

from types import SimpleNamespace

import numpy as np
import pytest

from qvla_ros.control.images import (
    ImageFormatError,
    compressed_to_rgb,
    image_to_rgb,
    rgb_to_compressed_fields,
    rgb_to_image_fields,
)

RNG = np.random.default_rng(0)
IMG = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)


def msg(**fields):
    return SimpleNamespace(**fields)


def test_rgb8_round_trip_is_exact():
    f = rgb_to_image_fields(IMG)
    assert f["step"] == 15 and f["encoding"] == "rgb8" and len(f["data"]) == 90
    np.testing.assert_array_equal(image_to_rgb(msg(**f)), IMG)


@pytest.mark.parametrize(
    "encoding,channels,order", [("bgr8", 3, [2, 1, 0]), ("rgba8", 4, [0, 1, 2]), ("bgra8", 4, [2, 1, 0])]
)
def test_other_colour_encodings_become_rgb(encoding, channels, order):
    raw = np.zeros((6, 5, channels), np.uint8)
    raw[:, :, order] = IMG
    m = msg(height=6, width=5, encoding=encoding, step=5 * channels, data=raw.tobytes(), is_bigendian=0)
    np.testing.assert_array_equal(image_to_rgb(m), IMG)


def test_mono8_is_replicated_to_three_channels():
    gray = IMG[:, :, 0]
    m = msg(height=6, width=5, encoding="mono8", step=5, data=gray.tobytes(), is_bigendian=0)
    out = image_to_rgb(m)
    assert out.shape == (6, 5, 3) and (out == gray[:, :, None]).all()


def test_row_padding_is_skipped():
    padded = np.zeros((6, 20), np.uint8)  # step 20 > 15 bytes of pixels per row
    padded[:, :15] = IMG.reshape(6, 15)
    m = msg(height=6, width=5, encoding="rgb8", step=20, data=padded.tobytes(), is_bigendian=0)
    np.testing.assert_array_equal(image_to_rgb(m), IMG)


def test_bgr8_writer():
    f = rgb_to_image_fields(IMG, "bgr8")
    np.testing.assert_array_equal(image_to_rgb(msg(**f)), IMG)


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(encoding="16UC1"), "encoding '16UC1' is not supported"),
        (dict(step=10), "step 10 is shorter than a row"),
        (dict(data=b"\0" * 50), "truncated"),
        (dict(height=0), "empty image"),
    ],
)
def test_bad_images_name_the_camera_and_the_problem(fields, match):
    f = {**rgb_to_image_fields(IMG), **fields}
    with pytest.raises(ImageFormatError, match=match) as e:
        image_to_rgb(msg(**f), source="camera 'top'")
    assert "camera 'top'" in str(e.value)


def test_png_is_lossless_and_jpeg_close():
    big = np.kron(IMG, np.ones((8, 8, 1), np.uint8))  # smooth-ish blocks: JPEG stays close
    png = rgb_to_compressed_fields(big, "png")
    np.testing.assert_array_equal(compressed_to_rgb(msg(**png)), big)
    jpg = rgb_to_compressed_fields(big, "jpeg", quality=95)
    assert jpg["data"][:2] == b"\xff\xd8"
    out = compressed_to_rgb(msg(format="rgb8; jpeg compressed bgr8", data=jpg["data"]))
    assert out.shape == big.shape and np.abs(out.astype(int) - big).mean() < 12


def test_bad_compressed_payloads():
    with pytest.raises(ImageFormatError, match="not supported"):
        compressed_to_rgb(msg(format="theora", data=b"x"))
    with pytest.raises(ImageFormatError, match="could not decode"):
        compressed_to_rgb(msg(format="jpeg", data=b"not a jpeg"))
    with pytest.raises(ImageFormatError):
        rgb_to_image_fields(np.zeros((2, 2), np.uint8))
