"""Image transforms: uint8 on the CPU side, float conversion and normalisation on the device.

Why: decoding, resizing and augmenting in uint8 is cheaper on the CPU and moves 4x fewer
bytes to the GPU. `to_model_input` then converts a uint8 batch to normalised float on the
device where the model runs. Float input is taken as already normalised and only moved.
"""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(
    images: torch.Tensor,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 images [..., 3, H, W] in 0..255 -> float32 normalised with mean/std (on their device)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(3, 1, 1)
    return (images.float().div_(255.0) - m) / s


def to_model_input(
    images: torch.Tensor,
    device: torch.device | str,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    channels_last: bool = False,
) -> torch.Tensor:
    """Move a batch to `device` and make it model-ready float.

    Accepts [N,3,H,W] or [P,K,3,H,W] (flattened to [P*K,3,H,W]). uint8 is normalised on
    the device; floating input is assumed normalised already.
    """
    if images.dim() == 5:
        images = images.flatten(0, 1)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N,3,H,W] or [P,K,3,H,W], got {tuple(images.shape)}")
    device = torch.device(device)
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = normalize(images, mean, std)
    else:
        images = images.float()
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images
