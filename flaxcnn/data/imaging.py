"""Small Pillow/numpy image helpers shared by preparation and the pipelines."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# ITU-R BT.601 luma weights, the ones Pillow uses for RGB -> "L".
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes made by Pillow: tfds would otherwise need TensorFlow to encode arrays."""
    pixels = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square (left, top, right, bottom) with the shorter side's length."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop a uint8 HxWxC image to a square and resize it to size x size.

    Square images are only resized, so the aspect ratio is never distorted. Bilinear, with
    Pillow's antialiasing when shrinking.
    """
    height, width, channels = image.shape
    if height == width == size:
        return image
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    if height != width:
        pil = pil.crop(square_box(width, height))  # Not resize(box=): that blends in the edges.
    resized = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
    return resized[..., None] if channels == 1 else resized


def match_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Grayscale -> RGB by repetition, RGB -> grayscale by luma; otherwise unchanged."""
    have = image.shape[-1]
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    if have == 3 and channels == 1:
        luma = image.astype(np.float32) @ LUMA_WEIGHTS.astype(np.float32)
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels")


class ChannelStats:
    """Streaming per-channel mean and standard deviation of uint8 images on the 0..1 scale."""

    def __init__(self, channels: int):
        self._count = 0
        self._sum = np.zeros(channels, np.float64)
        self._sum_sq = np.zeros(channels, np.float64)

    def update(self, images: np.ndarray) -> None:
        """Add one HxWxC image or a batch of them."""
        pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
        self._count += pixels.shape[0]
        self._sum += pixels.sum(axis=0)
        self._sum_sq += np.square(pixels).sum(axis=0)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(float(m) for m in self._sum / max(self._count, 1))

    @property
    def std(self) -> tuple[float, ...]:
        mean = self._sum / max(self._count, 1)
        variance = np.maximum(self._sum_sq / max(self._count, 1) - np.square(mean), 0.0)
        return tuple(float(s) for s in np.maximum(np.sqrt(variance), 1e-6))
