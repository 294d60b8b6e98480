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


# ---------------------------------------------------------------- CPU transforms (uint8 in/out)

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def _interpolation(name: str):
    """'bilinear' | 'bicubic' | 'nearest' -> torchvision InterpolationMode."""
    from torchvision.transforms import InterpolationMode

    if isinstance(name, InterpolationMode):
        return name
    if name not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {name!r}")
    return InterpolationMode(name)


def _size(image_size) -> tuple[int, int]:
    """(H, W) from an int or a pair, validated."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    return size


def train_transform(image_size=(320, 320), interpolation: str = "bilinear"):
    """Training transform of the reference recipe on uint8 tensors: resize (stretching, no
    crop, antialiased) then RandAugment(num_ops=3). uint8 [3,H,W] in, uint8 [3,h,w] out."""
    from torchvision.transforms import v2

    mode = _interpolation(interpolation)
    return v2.Compose(
        [
            v2.Resize(_size(image_size), interpolation=mode, antialias=True),
            v2.RandAugment(num_ops=3, interpolation=mode),
        ]
    )


def eval_transform(image_size=(320, 320), interpolation: str = "bilinear"):
    """Evaluation transform: resize only (antialiased). uint8 [3,H,W] in, uint8 out."""
    from torchvision.transforms import v2

    return v2.Resize(_size(image_size), interpolation=_interpolation(interpolation), antialias=True)


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 3 and data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF


def decode_image_bytes(data: torch.Tensor, name: str = "<bytes>") -> torch.Tensor:
    """Encoded image bytes (uint8 1-D) -> uint8 RGB [3,H,W]. JPEG goes through libjpeg-turbo
    (grayscale and CMYK converted to RGB); other formats through torchvision.io.decode_image.
    A failure raises ValueError naming `name`."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    try:
        if _is_jpeg(data):
            return decode_jpeg(data, mode=ImageReadMode.RGB)
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise ValueError(f"cannot decode image {name}: {e}") from e


def read_image_bytes(path) -> torch.Tensor:
    """The bytes of an image file as a uint8 1-D tensor (FileNotFoundError names the file)."""
    from torchvision.io import read_file

    path = str(path)
    try:
        return read_file(path)
    except RuntimeError as e:
        import os

        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path}") from e
        raise ValueError(f"cannot read image file {path}: {e}") from e


def load_image(path) -> torch.Tensor:
    """Read and decode an image file -> uint8 RGB [3,H,W]; errors name the file."""
    return decode_image_bytes(read_image_bytes(path), str(path))


# ---------------------------------------------------------------- batch decode + augmentation
# Used by GSVCitiesDataset(decode="gpu"): workers only read bytes; decoding, resizing and
# RandAugment run on the training device (on "cpu" it runs the same code on the CPU).


def decode_jpeg_batch(
    data: list[torch.Tensor],
    device: torch.device | str,
    image_size=(320, 320),
    interpolation: str = "bilinear",
    names: list[str] | None = None,
) -> torch.Tensor:
    """Encoded JPEGs -> uint8 [N,3,H,W] on `device`, resized to `image_size`.

    On CUDA the whole list is decoded by nvJPEG in one call. A decode failure raises
    ValueError naming the offending image (from `names` when given).
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    device = torch.device(device)
    size = _size(image_size)
    mode = _interpolation(interpolation)
    if not data:
        return torch.empty((0, 3, *size), dtype=torch.uint8, device=device)
    try:
        decoded = decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        # find and name the culprit
        for i, d in enumerate(data):
            name = names[i] if names is not None else f"image {i} of the batch"
            try:
                decode_jpeg(d, mode=ImageReadMode.RGB)
            except RuntimeError as e:
                raise ValueError(f"cannot decode image {name}: {e}") from e
        raise
    shapes = {tuple(img.shape) for img in decoded}
    if len(shapes) == 1:
        batch = torch.stack(decoded)
        if batch.shape[-2:] != size:
            batch = F.resize(batch, list(size), interpolation=mode, antialias=True)
        return batch
    return torch.stack(
        [F.resize(img, list(size), interpolation=mode, antialias=True) for img in decoded]
    )


def augment_batch(
    images: torch.Tensor, seeds, num_ops: int = 3, interpolation: str = "bilinear"
) -> torch.Tensor:
    """RandAugment each image of a uint8 [N,3,H,W] batch with its own ops, drawn from its own
    seed (so the result does not depend on batch composition or on the device)."""
    from torchvision.transforms import v2

    seeds = [int(s) for s in seeds]
    if len(seeds) != len(images):
        raise ValueError(f"augment_batch: {len(images)} images but {len(seeds)} seeds")
    aug = v2.RandAugment(num_ops=num_ops, interpolation=_interpolation(interpolation))
    out = torch.empty_like(images)
    with torch.random.fork_rng(devices=[]):
        for i, s in enumerate(seeds):
            torch.manual_seed(s)
            out[i] = aug(images[i])
    return out
