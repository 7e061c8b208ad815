"""Load any image file as an 8-bit RGB PIL image.

PIL's ``convert('RGB')`` silently clips 16-bit and 32-bit images to white and drops alpha onto
whatever colour the transparent pixels happen to hold. :func:`load_image` handles those modes
explicitly so that the network sees what a person sees.
"""
import os
from typing import Union

import numpy as np
from PIL import Image

__all__ = ['load_image', 'to_rgb', 'UNREADABLE_ERRORS']

# What PIL raises for truncated, corrupt, unsupported or oversized files.
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

_BACKGROUND = (255, 255, 255)


def load_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Read ``path`` fully (so corrupt files fail here) and return an 8-bit RGB image.

    Raises one of :data:`UNREADABLE_ERRORS` when the file cannot be decoded.
    """
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    * 16-bit and 32-bit integer grey (``I;16*``, ``I``): scaled from the full 16-bit range, or
      from the image's own maximum when values exceed 16 bits;
    * float grey (``F``): values in [0, 1] are scaled by 255, others clipped to [0, 255]; a NaN or inf
      pixel makes the image unreadable (``ValueError``), as a corrupt file does;
    * transparency (``RGBA``, ``LA``, ``PA``, palette with a transparent colour): composited
      over a white background;
    * everything else (grey, palette, CMYK, YCbCr, 1-bit): PIL's own conversion.
    """
    mode = img.mode
    if mode == 'RGB':
        return img
    if mode.startswith('I') or mode == 'F':
        return _high_depth_to_rgb(img)
    if mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (mode == 'P' and 'transparency' in img.info):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return img.convert('RGB')


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img).astype(np.float64)
    if not np.isfinite(arr).all():  # a float image with NaN or inf: no picture to show the network
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f'{bad} pixels are not finite numbers (NaN or inf)')
    if img.mode == 'F':
        scaled = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
    else:
        peak = arr.max() if arr.size else 0
        full_scale = 65535.0 if peak <= 65535 else float(peak)
        scaled = arr / full_scale * 255.0
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode='L').convert('RGB')
