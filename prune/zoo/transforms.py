"""How folder images become model inputs: the ImageNet normalisation constants and the
resize / center-crop / normalise transform (shared by the data loaders and the model registry).

A model's preprocessing is described in timm's vocabulary: `crop_pct` (the center crop's share
of the resized image's shorter side: 0.875 is ImageNet's 224 of 256, 1.0 no crop) and
`interpolation` ('bilinear', 'bicubic', 'nearest', ...) beside `mean` and `std`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torchvision is imported where a transform is built: a run on in-memory data never needs it
    from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CROP_PCT = 224 / 256
"""The ImageNet convention: resize to 256/224 of the input side, center-crop the input side."""
DEFAULT_INTERPOLATION = "bilinear"


def resize_side(input_size: int, crop_pct: float) -> int:
    """The side the shorter image side is resized to before a center crop of `input_size`:
    floor(input_size / crop_pct) as timm's eval transform (256 for 224 at 0.875; a torchvision
    preset's resize_size for its crop_size / resize_size, hence the tolerance for rounding)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct {crop_pct} is not in (0, 1]")
    return math.floor(input_size / crop_pct + 1e-6)


def interpolation_mode(name: str) -> transforms.InterpolationMode:
    """torchvision's InterpolationMode for a timm / torchvision name ('bilinear', 'bicubic', ...);
    ValueError for an unknown one."""
    from torchvision import transforms

    return transforms.InterpolationMode(name)


def folder_transform(
    input_size: int, *, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
    crop_pct: float = IMAGENET_CROP_PCT, interpolation: str = DEFAULT_INTERPOLATION,
) -> transforms.Compose:
    """PIL image → [3, s, s] (s = `input_size`): resize the shorter side to `resize_side(s, crop_pct)`
    with `interpolation`, center-crop s, normalise `(x - mean) / std` (defaults: ImageNet's convention).
    An image whose shorter side is already the resize side is not resampled (crop_pct 1.0 on s² images
    is the identity before normalisation)."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(resize_side(input_size, crop_pct), interpolation=interpolation_mode(interpolation)),
            transforms.CenterCrop(input_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
