"""The one way images are read from files: 8-bit RGB at the image's real bit depth.

PIL's ``convert("RGB")`` clips 16-bit and 32-bit pixels to 255 instead of scaling them (a 16-bit
PNG became 99.6% white). :func:`to_rgb8` scales each mode's actual range to 0..255 first:

* ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit grey): ``/ 257``, so 65535 -> 255;
* ``I`` (32-bit integers; 16-bit PNGs and TIFFs decode to it): ``/ 257`` when every value lies in
  0..65535, else the image's own min..max is stretched to 0..255;
* ``F`` (32-bit float): 0..1 when every value lies there, else 0..255 when every value lies there,
  else the image's own min..max; NaN becomes 0;
* everything else (``L``, ``P``, ``RGBA``, ``CMYK``, 16-bit RGB, which PIL already reduces to 8 bits
  by its high byte): PIL's ``convert("RGB")``.

Only PIL and NumPy are imported, so both the training data and the command-line tools use it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Union

import numpy as np

from .errors import UserError
from ._extras import require

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["ImageReadError", "ImageNotFound", "to_rgb8", "open_rgb"]

PathLike = Union[str, "os.PathLike[str]"]

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageReadError(UserError, OSError):
    """An image file that cannot be decoded (not an image, truncated, unsupported)."""


class ImageNotFound(ImageReadError, FileNotFoundError):
    """No file at the given path."""


def _stretch(values: np.ndarray) -> np.ndarray:
    """``values`` (any real dtype) stretched from their own min..max to 0..255."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float64)
    return (values.astype(np.float64) - lo) * (255.0 / (hi - lo))


def _gray_to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """An ``(H, W)`` array of a wide grey mode as uint8 0..255 (see the module doc for the rule)."""
    if mode in _SIXTEEN_BIT:
        scaled = values.astype(np.float64) / 257.0
    elif mode == "I":
        in_16_bit = values.size == 0 or (values.min() >= 0 and values.max() <= 65535)
        scaled = values.astype(np.float64) / 257.0 if in_16_bit else _stretch(values)
    else:  # "F"
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if values.size == 0 or (values.min() >= 0 and values.max() <= 1):
            scaled = values * 255.0
        elif values.min() >= 0 and values.max() <= 255:
            scaled = values
        else:
            scaled = _stretch(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb8(image: "Image.Image") -> "Image.Image":
    """An 8-bit RGB copy of a PIL image, with 16-bit, 32-bit and float pixels scaled, not clipped."""
    from PIL import Image

    mode = image.mode
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        gray = _gray_to_8bit(np.asarray(image), mode)  # (H, W) uint8
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "RGB":
        return image.copy()
    return image.convert("RGB")


def open_rgb(source: Union[PathLike, BinaryIO]) -> "Image.Image":
    """The image file at ``source`` (a path or an open binary file) fully decoded as 8-bit RGB (:func:`to_rgb8`).

    Raises :class:`ImageNotFound` or :class:`ImageReadError` (both :class:`~biformer.errors.UserError`)
    naming the file: a missing file, something that is not an image, or a truncated one.
    """
    from PIL import Image, UnidentifiedImageError

    if hasattr(source, "read"):
        name = str(getattr(source, "name", "<stream>"))
    else:
        name = source = os.fspath(source)  # type: ignore[arg-type]
        if not os.path.isfile(name):
            raise ImageNotFound(f"no image file at {name!r}")
    try:
        with Image.open(source) as opened:
            opened.load()  # decode every pixel now, so a truncated file fails here
            return to_rgb8(opened)
    except UnidentifiedImageError:
        raise ImageReadError(f"cannot read {name!r}: not an image format PIL recognises") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"refusing {name!r}: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's errors for damaged data
        raise ImageReadError(f"cannot read image {name!r}: {type(e).__name__}: {e}") from e


# scikit-image's bundled photos (no download needed), usable wherever a command takes IMAGE
SAMPLE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry")


def load_image(source: PathLike) -> "Image.Image":  # noqa: F821  (PIL, imported lazily)
    """An RGB PIL image from a file, or from one of scikit-image's bundled photos by name (``astronaut``)."""
    from PIL import Image

    path = Path(source)
    if path.is_file():
        return open_rgb(path)
    if str(source) in SAMPLE_IMAGES:
        require("skimage", extra="viz")  # one clear error when the extra is absent
        import skimage.data

        array = getattr(skimage.data, str(source))()
        return to_rgb8(Image.fromarray(array))
    raise ImageNotFound(
        f"no image file at {str(source)!r}, and it is not one of scikit-image's sample names {SAMPLE_IMAGES}"
    )
