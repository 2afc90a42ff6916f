"""Encoding uint8 images for the wire and for files."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 90) -> bytes:
    """(H, W, 3) uint8 -> encoded bytes. PNG is lossless, so it round-trips the exact pixels."""
    buf = io.BytesIO()
    kwargs = {} if fmt == "png" else {"quality": quality}
    Image.fromarray(image).save(buf, format=FORMATS[fmt], **kwargs)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
