"""sensor_msgs/Image and CompressedImage <-> HxWx3 uint8 RGB numpy arrays, without cv_bridge.

Readers take any object with the message's attributes (an rclpy message, or a SimpleNamespace in tests) and check
what cv_bridge would: a known `encoding`, a `step` that covers a row, `data` that covers `step * height`. Row
padding (step > width * channels) is handled without copying twice. Errors say which camera and what to change.
"""

from __future__ import annotations

import io

import numpy as np

# encoding -> (channels, index order that gives RGB); 8-bit encodings only: policies take uint8 RGB
_ENCODINGS: dict[str, tuple[int, tuple[int, ...] | None]] = {
    "rgb8": (3, None),
    "bgr8": (3, (2, 1, 0)),
    "rgba8": (4, (0, 1, 2)),
    "bgra8": (4, (2, 1, 0)),
    "mono8": (1, None),
    "8UC3": (3, None),  # some drivers label rgb8 this way; treated as RGB
    "8UC1": (1, None),
}
SUPPORTED_ENCODINGS = tuple(_ENCODINGS)
COMPRESSED_FORMATS = ("jpeg", "png")


class ImageFormatError(ValueError):
    """An image message cannot be turned into an RGB array; the message says what was wrong and what to do."""


def check_image(msg, source: str = "image") -> tuple[int, int, int, int]:
    """The checks of `image_to_rgb` that need only the message's fields, not its pixels (cheap enough for every
    frame on arrival): (height, width, channels, step), or ImageFormatError saying what is wrong."""
    enc = str(msg.encoding)
    if enc not in _ENCODINGS:
        raise ImageFormatError(
            f"{source}: encoding {enc!r} is not supported (supported: {', '.join(SUPPORTED_ENCODINGS)}); "
            "configure the camera driver for rgb8 or bgr8"
        )
    channels = _ENCODINGS[enc][0]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ImageFormatError(f"{source}: empty image ({w}x{h})")
    if step < w * channels:
        raise ImageFormatError(f"{source}: step {step} is shorter than a row of {w} {enc} pixels ({w * channels} B)")
    if len(msg.data) < step * h:
        raise ImageFormatError(
            f"{source}: data has {len(msg.data)} bytes but height {h} x step {step} needs {step * h}; "
            "the message is truncated or its step is wrong"
        )
    return h, w, channels, step


def check_compressed(msg, source: str = "image") -> None:
    """The cheap checks of `compressed_to_rgb` (format named, payload present); decoding errors come later."""
    fmt = str(msg.format).lower()
    if not any(c in fmt for c in COMPRESSED_FORMATS):
        raise ImageFormatError(
            f"{source}: compressed format {msg.format!r} is not supported (supported: jpeg, png); "
            "use image_transport's jpeg or png compression"
        )
    if len(msg.data) == 0:
        raise ImageFormatError(f"{source}: empty {msg.format!r} payload (0 bytes)")


def image_to_rgb(msg, source: str = "image") -> np.ndarray:
    """A sensor_msgs/Image (fields height, width, encoding, step, data, is_bigendian) -> HxWx3 uint8 RGB.

    The result may share memory with `msg.data` (read-only view) when no conversion is needed.
    """
    h, w, channels, step = check_image(msg, source)
    order = _ENCODINGS[str(msg.encoding)][1]
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    rows = buf[: step * h].reshape(h, step)[:, : w * channels].reshape(h, w, channels)
    if channels == 1:
        return np.repeat(rows, 3, axis=2)
    if order is None:
        return rows
    return rows[:, :, list(order)]


def rgb_to_image_fields(img: np.ndarray, encoding: str = "rgb8") -> dict:
    """HxWx3 uint8 RGB -> the fields of a sensor_msgs/Image (header left to the caller)."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ImageFormatError(f"expected an HxWx3 uint8 RGB array, got {img.dtype} {img.shape}")
    if encoding == "bgr8":
        img = img[:, :, ::-1]
    elif encoding != "rgb8":
        raise ImageFormatError(f"can only write rgb8 or bgr8 images, not {encoding!r}")
    h, w, _ = img.shape
    return {
        "height": h,
        "width": w,
        "encoding": encoding,
        "is_bigendian": 0,
        "step": w * 3,
        "data": np.ascontiguousarray(img).tobytes(),
    }


def compressed_to_rgb(msg, source: str = "image") -> np.ndarray:
    """A sensor_msgs/CompressedImage (fields format, data) with a JPEG or PNG payload -> HxWx3 uint8 RGB.

    `format` is free text in ROS ("jpeg", "png", "rgb8; jpeg compressed bgr8"): the payload's own magic bytes
    decide, and the format string only has to name one of the supported codecs.
    """
    from PIL import Image as PILImage  # Pillow: imported here so raw-image users never pay for it

    check_compressed(msg, source)
    data = bytes(msg.data)
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # Pillow raises several types for corrupt payloads
        raise ImageFormatError(f"{source}: could not decode the {msg.format!r} payload ({len(data)} B): {e}") from e


def rgb_to_compressed_fields(img: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> dict:
    """HxWx3 uint8 RGB -> the fields of a sensor_msgs/CompressedImage (format, data)."""
    from PIL import Image as PILImage

    if fmt not in COMPRESSED_FORMATS:
        raise ImageFormatError(f"can only compress to jpeg or png, not {fmt!r}")
    out = io.BytesIO()
    PILImage.fromarray(np.asarray(img, dtype=np.uint8)).save(
        out, format="JPEG" if fmt == "jpeg" else "PNG", quality=quality
    )
    return {"format": fmt, "data": out.getvalue()}
