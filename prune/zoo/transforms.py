"""How folder images become model inputs: the ImageNet normalisation constants and the
resize / center-crop / normalise transform (shared by the data loaders and the model registry)."""

from __future__ import annotations

from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def folder_transform(
    input_size: int, *, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> transforms.Compose:
    """Resize to 256/224 of the input size, center-crop, normalise `(x - mean) / std` (default ImageNet)."""
    return transforms.Compose(
        [
            transforms.Resize(round(input_size * 256 / 224)),
            transforms.CenterCrop(input_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
