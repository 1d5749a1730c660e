"""Images for the visualisations: the photos bundled with scikit-image, files, and model inputs."""
from __future__ import annotations

import math
import os
from typing import Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import UserValueError
from .._extras import require

__all__ = ["BUNDLED_IMAGES", "load_image", "model_input", "to_input_coords"]

# real photos that ship inside scikit-image (no download)
BUNDLED_IMAGES = ("astronaut", "coffee", "chelsea")

ImageLike = Union[str, "os.PathLike[str]", np.ndarray]


def load_image(image: ImageLike) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 RGB array from a bundled photo's name, a file path, or an array."""
    if isinstance(image, np.ndarray):
        array = image
    elif str(image) in BUNDLED_IMAGES:
        require("skimage", extra="viz")  # one clear error when the extra is absent
        from skimage import data

        array = getattr(data, str(image))()
    else:
        from ..images import ImageNotFound, open_rgb

        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ImageNotFound(f"no image file at {path!r}; expected a file or one of the bundled photos {BUNDLED_IMAGES}")
        array = np.asarray(open_rgb(path))
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise UserValueError(f"got an image of shape {array.shape}, expected (H, W), (H, W, 3) or (H, W, 4)")
    array = array[..., :3]
    if array.dtype == np.uint16:  # 16-bit: scale, do not clip
        array = np.rint(array / 257.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        scale = 255.0 if array.max() <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(math.floor(value / multiple + 0.5)) * multiple)


def input_size(image_shape: Sequence[int], size: int = 224, multiple: int = 32) -> Tuple[int, int]:
    """``(h, w)`` of the model input for an image of ``image_shape``: shorter side about ``size``, both
    sides multiples of ``multiple`` (see :func:`model_input`)."""
    if not isinstance(size, int) or size < 32:
        raise UserValueError(f"got size={size!r}, expected an integer of at least 32 (the model's total stride)")
    h, w = image_shape[:2]
    scale = size / min(h, w)
    return _round_to(h * scale, multiple), _round_to(w * scale, multiple)


def model_input(
    image: np.ndarray,
    size: int = 224,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    multiple: int = 32,
) -> Tuple[Tensor, np.ndarray]:
    """Resize ``image`` so its shorter side is about ``size`` and both sides are multiples of
    ``multiple`` (aspect ratio kept up to that rounding), then normalise. The figures pass
    :func:`biformer.viz.figures.input_multiple`, so that no routed stage needs padding.

    Returns the ``(1, 3, h, w)`` float input and the resized ``(h, w, 3)`` uint8 image it shows.
    """
    from PIL import Image

    new_h, new_w = input_size(image.shape, size, multiple)
    resized = np.array(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))  # a writable copy
    x = torch.from_numpy(resized).float().div(255.0).permute(2, 0, 1)  # (3, h, w)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0), resized


def to_input_coords(point: Tuple[float, float], image_shape: Sequence[int], input_shape: Sequence[int]) -> Tuple[float, float]:
    """Map an ``(x, y)`` pixel of the original image onto the resized model input."""
    x, y = point
    h, w = image_shape[:2]
    if not (0 <= x < w and 0 <= y < h):
        raise UserValueError(f"got query point ({x:g}, {y:g}) outside the {w}x{h} image; expected 0 <= x < {w}, 0 <= y < {h}")
    return x * input_shape[1] / w, y * input_shape[0] / h
