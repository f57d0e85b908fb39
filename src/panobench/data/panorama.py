"""Loading and validating equirectangular panoramas (ERP) into uint8 RGB tensors.

Every failure (missing, unreadable, truncated or non-image file, unsupported pixel mode, wrong aspect)
raises :class:`~panobench.errors.InputError` naming the file; nothing is ever replaced by a substitute
image (SPEC §2 item 6).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from panobench.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

ERP_ASPECT = 2.0
ASPECT_TOLERANCE = 0.01  # relative: width/height must lie within 2.0 ± 1%

# PIL signals malformed files with many exception types depending on the format and where decoding stops.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


def check_erp_aspect(width: int, height: int) -> bool:
    """Whether ``width × height`` is an equirectangular 2:1 size within :data:`ASPECT_TOLERANCE`."""
    return height > 0 and abs(width / height - ERP_ASPECT) <= ERP_ASPECT * ASPECT_TOLERANCE


def load_erp(path: str | os.PathLike, *, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode an equirectangular panorama to an RGB uint8 tensor.

    Policies:
        * Aspect: the stored image must be 2:1 within 1% (``|W/H − 2| ≤ 0.02``); anything else is not a
          full ERP (a crop, a cubemap, a perspective photo) and raises ``InputError`` naming file and size.
          EXIF orientation is ignored: panorama cameras store ERPs upright.
        * Modes: ``RGB`` as is; ``L``/``1`` replicated to 3 channels; ``RGBA``/``LA``/``PA``: the alpha
          channel is **dropped** (colour values kept as stored, not composited — an ERP is an opaque
          photograph, alpha carries no meaning for it); ``P`` through its palette; ``CMYK``/``YCbCr``/``HSV``
          via PIL's conversion; 16-bit (``I;16``, ``I;16B``, ``I;16L``, and ``I`` with values in
          [0, 65535]) scaled by 255/65535 with rounding (so 65535 → 255; not clipped); float ``F`` taken
          as [0, 1] if its maximum is ≤ 1, else as [0, 255]; any other range raises ``InputError``.
        * The file is fully decoded here, so a truncated file fails now, not in a later batch; PIL's
          ``LOAD_TRUNCATED_IMAGES`` is never enabled.

    Args:
        path: Image file.
        size: Optional working size ``(H, W)``; the image is resized with antialiased bilinear filtering
            (PIL) so that images of different sizes stack into one batch. Must itself be 2:1.

    Returns:
        uint8 tensor ``[3, H, W]``.

    Raises:
        InputError: The file is missing, unreadable, not an image, truncated, of an unsupported mode or not 2:1.
        ConfigError: ``size`` is not a positive 2:1 ``(H, W)``.
    """
    path = Path(path)
    if size is not None:
        if len(size) != 2 or min(size) <= 0 or not check_erp_aspect(size[1], size[0]):
            raise ConfigError(f"ERP working size must be a positive 2:1 (H, W), got {tuple(size)}")
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if not path.is_file():
        raise InputError(f"image path is not a regular file: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # force the full decode now: truncation/corruption surfaces here
            rgb = _to_rgb(img, path)
    except InputError:
        raise
    except UnidentifiedImageError as err:
        raise InputError(f"not a readable image file: {path} ({err})") from err
    except _DECODE_ERRORS as err:
        raise InputError(f"cannot decode image {path}: {type(err).__name__}: {err}") from err
    width, height = rgb.size
    if not check_erp_aspect(width, height):
        raise InputError(
            f"image {path} is {width}x{height} (W x H), aspect {width / height:.3f}; an equirectangular "
            f"panorama must be 2:1 within {ASPECT_TOLERANCE:.0%}"
        )
    if size is not None and (height, width) != tuple(size):
        rgb = rgb.resize((size[1], size[0]), resample=Image.Resampling.BILINEAR)  # PIL antialiases on downscale
    array = np.asarray(rgb, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Convert any supported PIL mode to an 8-bit ``RGB`` image (see :func:`load_erp` for the policy)."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("L", "1", "P", "CMYK", "YCbCr", "HSV", "RGBX"):
        return img.convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        if mode == "PA":
            img = img.convert("RGBA")
        # Dropping alpha: keep the stored colour channels.
        bands = img.split()
        if len(bands) == 2:  # LA
            return Image.merge("RGB", (bands[0], bands[0], bands[0]))
        return Image.merge("RGB", bands[:3])
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img).astype(np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise InputError(
                f"image {path}: integer mode {mode} with values in [{values.min():g}, {values.max():g}], "
                "outside the 16-bit range [0, 65535]"
            )
        return _grey_or_rgb(np.rint(values * (255.0 / 65535.0)))
    if mode == "F":
        values = np.asarray(img).astype(np.float64)
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not np.isfinite(values).all() or lo < 0 or hi > 255:
            raise InputError(f"image {path}: float mode F with values in [{lo:g}, {hi:g}]; expected [0, 1] or [0, 255]")
        scale = 255.0 if hi <= 1.0 else 1.0
        return _grey_or_rgb(np.rint(values * scale))
    raise InputError(f"image {path}: unsupported pixel mode {mode!r}")


def _grey_or_rgb(values: np.ndarray) -> Image.Image:
    """Greyscale float array ``[H, W]`` (already in [0, 255]) -> RGB image."""
    grey = values.clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
