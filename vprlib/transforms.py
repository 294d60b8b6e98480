"""Image transforms: uint8 on the CPU side, float conversion and normalisation on the device.

Why: decoding, resizing and augmenting in uint8 is cheaper on the CPU and moves 4x fewer
bytes to the GPU. `to_model_input` then converts a uint8 batch to normalised float on the
device where the model runs. Float input is taken as already normalised and only moved.
"""

from __future__ import annotations

import contextlib
import functools
import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# RandAugment's Shear/Rotate resample bilinearly whatever the resize uses, as the reference
# recipe does (T.Resize(..., interpolation) then T.RandAugment(3, interpolation=BILINEAR)).
AUGMENT_INTERPOLATION = "bilinear"


def normalize(
    images: torch.Tensor,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 images [..., 3, H, W] in 0..255 -> float32 normalised with mean/std (on their device)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    m, s = _mean_std(images.device, tuple(mean), tuple(std))
    return (images.float().div_(255.0) - m) / s


@functools.lru_cache(maxsize=16)
def _mean_std(device: torch.device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """mean/std as [3,1,1] float32 on `device`, made once: a fresh host-to-device copy per
    batch would make the host wait for the GPU (a blocking copy syncs its stream)."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1).to(device)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1).to(device)
    return m, s


def to_model_input(
    images: torch.Tensor,
    device: torch.device | str,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    channels_last: bool = False,
) -> torch.Tensor:
    """Move a batch to `device` and make it model-ready float.

    Accepts [N,3,H,W] or [P,K,3,H,W] (flattened to [P*K,3,H,W]). uint8 is normalised on
    the device; floating input is assumed normalised already; other integer types are refused
    (a 16-bit image would reach the model unnormalised).
    """
    if images.dim() == 5:
        images = images.flatten(0, 1)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N,3,H,W] or [P,K,3,H,W], got {tuple(images.shape)}")
    device = torch.device(device)
    # asynchronous only towards a GPU: a copy to the CPU must be done before it is read
    images = images.to(device, non_blocking=device.type == "cuda")
    if images.dtype == torch.uint8:
        images = normalize(images, mean, std)
    elif images.is_floating_point():
        images = images.float()
    else:
        raise TypeError(
            f"to_model_input expects uint8 (0..255) or normalised float images, got {images.dtype}"
        )
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


class FastRandAugment:
    """RandAugment (torchvision.transforms.v2 semantics, fill 0) with faster uint8 kernels.

    Same op list, magnitudes and random draws (torch's global RNG) as
    `v2.RandAugment(num_ops, magnitude, num_magnitude_bins, interpolation)`, and the same
    output bytes except after Shear/Rotate: translations are integer shifts done by slicing;
    Solarize, Brightness, Posterize, AutoContrast and Equalize are 256-entry lookup tables;
    Sharpness sums the 3x3 neighbourhood in integers instead of a float convolution;
    Shear/Rotate run one own affine warp (`_warp_affine`, a matrix per image) that rounds
    ~0.1% of pixels one grey level apart from torchvision's (a later Solarize can turn such a
    pixel to the other side of its threshold); Color and Contrast call torchvision. Works on
    any device (used by the GPU path too). Input and output: uint8 [..., 3, H, W].
    """

    def __init__(
        self,
        num_ops: int = 3,
        magnitude: int = 9,
        num_magnitude_bins: int = 31,
        interpolation: str = "bilinear",
    ):
        from torchvision.transforms import v2

        mode = _interpolation(interpolation)
        self.reference = v2.RandAugment(
            num_ops=num_ops,
            magnitude=magnitude,
            num_magnitude_bins=num_magnitude_bins,
            interpolation=mode,
        )
        self.ops = list(self.reference._AUGMENTATION_SPACE.items())
        self.mode = mode.value
        self._magnitudes: dict = {}
        self._tables: dict = {}

    def __getstate__(self) -> dict:
        # `ops` holds torchvision's lambdas, which cannot be pickled (DataLoader workers
        # started with spawn/forkserver): rebuilt from the class table, caches start empty.
        return {
            k: v for k, v in self.__dict__.items() if k not in ("ops", "_magnitudes", "_tables")
        }

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.ops = list(self.reference._AUGMENTATION_SPACE.items())
        self._magnitudes, self._tables = {}, {}

    def __repr__(self) -> str:
        r = self.reference
        return f"FastRandAugment(num_ops={r.num_ops}, magnitude={r.magnitude})"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8:
            raise TypeError(f"FastRandAugment expects uint8 images, got {image.dtype}")
        for op, negate in self.draw(*image.shape[-2:]):
            image = self.apply_op(image, op, negate)
        return image

    def draw(
        self, height: int, width: int, generator: torch.Generator | None = None
    ) -> list[tuple[int, bool]]:
        """The random choices of one call on a height x width image, from `generator` (default:
        torch's global RNG; the draws of v2.RandAugment.forward, in the same order): num_ops
        pairs of (index into `self.ops`, whether the magnitude is negated)."""
        r = self.reference
        plan = []
        for _ in range(r.num_ops):
            op = int(torch.randint(len(self.ops), (), generator=generator))
            magnitudes_fn, signed = self.ops[op][1]
            negate = False
            if magnitudes_fn(r.num_magnitude_bins, height, width) is not None and signed:
                negate = bool(torch.rand((), generator=generator) <= 0.5)
            plan.append((op, negate))
        return plan

    def apply_op(self, image: torch.Tensor, op: int, negate: bool) -> torch.Tensor:
        """Apply op number `op` of `self.ops` (magnitude negated if `negate`) to uint8
        [..., 3, H, W]: every image of a batch gets the same op."""
        return self._apply(image, *self.op_and_magnitude(op, negate, *image.shape[-2:]))

    def op_and_magnitude(self, op: int, negate: bool, height: int, width: int):
        """(name, signed magnitude) of op number `op` on a height x width image (cached:
        torchvision builds a tensor of magnitudes for each lookup)."""
        key = (op, negate, height, width)
        if key not in self._magnitudes:
            name, (magnitudes_fn, _) = self.ops[op]
            magnitudes = magnitudes_fn(self.reference.num_magnitude_bins, height, width)
            value = 0.0 if magnitudes is None else float(magnitudes[self.reference.magnitude])
            self._magnitudes[key] = (name, -value if negate else value)
        return self._magnitudes[key]

    def table(self, op: int, negate: bool, image: torch.Tensor) -> torch.Tensor:
        """The lookup table of table op `op` for uint8 `image` [n, 3, H, W] (see `_table`);
        the tables that do not depend on the image are made once per device."""
        name, magnitude = self.op_and_magnitude(op, negate, *image.shape[-2:])
        if name in ("AutoContrast", "Equalize"):
            return _table(name, magnitude, image)
        key = (name, magnitude, image.device)
        if key not in self._tables:
            self._tables[key] = _table(name, magnitude, image)
        return self._tables[key]

    def warp_matrix(self, op: int, negate: bool, height: int, width: int) -> list[float]:
        """The inverse affine matrix (6 floats) of a Shear/Rotate op, so that warps of
        different images and magnitudes can run as one batched call (see `apply_plans`)."""
        return _warp_matrix(*self.op_and_magnitude(op, negate, height, width), height, width)

    def _apply(self, image: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
        if name == "Identity":
            return image
        if name == "TranslateX":
            return _shift(image, int(magnitude), 0)
        if name == "TranslateY":
            return _shift(image, 0, int(magnitude))
        if name in TABLES:
            return _apply_lut(image, _table(name, magnitude, image))
        if name == "Sharpness":
            return _sharpness(image, 1.0 + magnitude)
        if _is_warp(name):
            matrix = torch.tensor([_warp_matrix(name, magnitude, *image.shape[-2:])])
            return _warp_affine(image, matrix.to(image.device), self.mode)
        return self.reference._apply_image_or_video_transform(
            image,
            name,
            magnitude,
            interpolation=self.reference.interpolation,
            fill=self.reference._fill,
        )


try:  # the matrix convention of torchvision's affine/rotate (private: fall back if it moves)
    from torchvision.transforms.functional import _get_inverse_affine_matrix as _inverse_affine
except ImportError:  # pragma: no cover - depends on the torchvision version
    _inverse_affine = None


WARPS = ("ShearX", "ShearY", "Rotate")
TABLES = ("Solarize", "Brightness", "Posterize", "AutoContrast", "Equalize")


def _table(name: str, magnitude: float, image: torch.Tensor) -> torch.Tensor:
    """The 256-entry lookup table that RandAugment op `name` (one of TABLES) applies to
    uint8 `image` [..., 3, H, W]: [256] for every pixel, or [..., 3, 256] per image and
    channel (AutoContrast, Equalize). Each equals v2's op on the 256 possible values."""
    values = torch.arange(256, dtype=torch.uint8, device=image.device)
    if name == "Solarize":  # the same comparison as v2 (in float32)
        return torch.where(values >= 255.0 * magnitude, 255 - values, values)
    if name == "Brightness":  # v2: (image * factor).clamp(0, 255) -> uint8
        return values.mul(1.0 + magnitude).clamp_(0, 255).to(torch.uint8)
    if name == "Posterize":  # v2: keep the `bits` high bits
        bits = int(magnitude)
        return values if bits >= 8 else values & (((1 << bits) - 1) << (8 - bits))
    if name == "AutoContrast":
        return _autocontrast_lut(image)
    if name == "Equalize":
        return _equalize_lut(image)
    raise ValueError(f"{name!r} is not a table op (one of {TABLES})")


def _warp_matrix(name: str, magnitude: float, height: int, width: int) -> list[float]:
    """torchvision's inverse affine matrix of a RandAugment Shear/Rotate op."""
    if name == "Rotate":  # v2 rotate: centre of the image, angle negated
        return _inverse_affine([0.0, 0.0], -magnitude, [0.0, 0.0], 1.0, [0.0, 0.0])
    # v2 RandAugment shears about the top-left corner (centre [0, 0])
    shear = math.degrees(math.atan(magnitude))
    shear_xy = [shear, 0.0] if name == "ShearX" else [0.0, shear]
    return _inverse_affine([-width * 0.5, -height * 0.5], 0.0, [0.0, 0.0], 1.0, shear_xy)


def _warp_affine(
    image: torch.Tensor, matrices: torch.Tensor, mode: str, counts: list[int] | None = None
) -> torch.Tensor:
    """v2 affine_image (same size, zero fill) of uint8 [N, 3, H, W] with the sampling grid
    built by broadcasting instead of a batched matmul; equal to v2 up to float rounding (rare
    +-1 in uint8 for bilinear; for nearest a rare rounding flip picks the neighbouring pixel
    instead). `matrices` (float32 [M, 6] on the image's device): M inverse affine
    matrices, the first for the first counts[0] images, and so on (one call warps a batch
    whatever its ops); counts=None: one matrix for all images."""
    h, w = image.shape[-2:]
    dev = image.device
    # float32 [M, 1, 1] entries: the same float32 products and sums as Python scalars give
    a, b, c, d, e, f = matrices.to(torch.float32).T.reshape(6, -1, 1, 1)
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=dev)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=dev).unsqueeze_(-1)
    gx = (xs * a + ys * b + c).div_(0.5 * w)
    gy = (xs * d + ys * e + f).div_(0.5 * h)
    grid = torch.stack([gx, gy], dim=-1)  # [M, h, w, 2]
    flat = image.reshape(-1, *image.shape[-3:]).to(torch.float32)
    if counts is not None and len(counts) > 1:
        grid = torch.cat([g.expand(n, -1, -1, -1) for g, n in zip(grid, counts, strict=True)])
    out = torch.nn.functional.grid_sample(
        flat,
        grid.expand(flat.shape[0], -1, -1, -1),
        mode=mode,
        padding_mode="zeros",
        align_corners=False,
    )
    if mode == "bicubic":  # cubic weights overshoot 0..255 near edges; uint8 would wrap around
        out.clamp_(0, 255)
    return out.round_().to(torch.uint8).reshape(image.shape)


def _shift(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """out[y, x] = image[y - dy, x - dx], zeros where that falls outside."""
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    if abs(dx) >= w or abs(dy) >= h:
        return out
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = image[..., ys, xs]
    return out


def _apply_lut(image: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Lookup table applied per pixel: lut [256] (all channels) or [..., C, 256] (per channel)."""
    flat = image.flatten(-2).long()
    if lut.dim() == 1:
        lut = lut.expand(*flat.shape[:-1], 256)
    return lut.gather(-1, flat).view_as(image)


def _autocontrast_lut(image: torch.Tensor) -> torch.Tensor:
    """The table of v2 autocontrast (same float32 arithmetic, on 256 values per channel)."""
    minimum = image.amin(dim=(-2, -1)).float().unsqueeze(-1)
    maximum = image.amax(dim=(-2, -1)).float().unsqueeze(-1)
    eq = maximum == minimum
    inv_scale = maximum.sub_(minimum).mul_(1.0 / 255)
    minimum = torch.where(eq, 0.0, minimum)  # torch.where, not masking: no host sync on a GPU
    inv_scale = torch.where(eq, 1.0, inv_scale)
    values = torch.arange(256, device=image.device, dtype=torch.float32)
    return (values - minimum).div_(inv_scale).clamp_(0, 255).to(torch.uint8)


def _equalize(image: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation with PIL's (and v2's) table (see `_equalize_lut`)."""
    return _apply_lut(image, _equalize_lut(image))


def _equalize_lut(image: torch.Tensor) -> torch.Tensor:
    """PIL's (and v2's) equalisation tables [..., C, 256], one histogram per channel of
    every image, all computed at once (no per-channel loop, no device-to-host sync)."""
    h, w = image.shape[-2:]
    channels = image.reshape(-1, h * w)
    c, n = channels.shape
    dev = image.device
    bins = (torch.arange(c, device=dev).unsqueeze_(1) * 256 + channels.long()).flatten()
    # index_add_, not bincount: CUDA's bincount reads the largest bin back to the host
    ones = torch.ones(1, dtype=torch.int64, device=dev).expand(len(bins))
    hist = torch.zeros(c * 256, dtype=torch.int64, device=dev).index_add_(0, bins, ones)
    hist = hist.view(c, 256)
    values = torch.arange(256, device=dev)
    last = torch.where(hist > 0, values, -1).amax(dim=1, keepdim=True)  # last non-empty bin
    step = (n - hist.gather(1, last)).div(255, rounding_mode="floor")  # [c, 1]
    cum = hist.cumsum(1)
    lut = torch.zeros((c, 256), dtype=torch.int64, device=dev)
    lut[:, 1:] = (cum[:, :-1] + step // 2).div(step.clamp(min=1), rounding_mode="floor")
    lut = torch.where(step == 0, values, lut.clamp_(0, 255)).to(torch.uint8)
    return lut.view(*image.shape[:-2], 256)


def _sharpness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """v2 adjust_sharpness: the 3x3 blur (weights 1, centre 5, /13) is summed exactly in
    integers, as a separable 3x3 box sum (rows, then columns: 4 additions instead of 9) plus
    4 x centre; round(sum / 13) equals v2's rounded float convolution (never a .5 tie)."""
    h, w = image.shape[-2:]
    if h <= 2 or w <= 2:
        return image
    x = image.to(torch.int16)
    rows = x[..., :, :-2] + x[..., :, 1:-1] + x[..., :, 2:]  # [..., h, w - 2]
    total = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]  # [..., h - 2, w - 2]
    total += 4 * x[..., 1:-1, 1:-1]
    blurred = total.float().div_(13.0).round_()
    output = image.to(torch.float32)
    view = output[..., 1:-1, 1:-1]
    view.add_(blurred.sub_(view), alpha=(1.0 - factor))
    return output.clamp_(0, 255).to(torch.uint8)


def train_transform(image_size=(320, 320), interpolation: str = "bilinear"):
    """Training transform of the reference recipe on uint8 tensors: resize (stretching, no
    crop, antialiased, `interpolation`) then RandAugment(num_ops=3) with bilinear warps
    (AUGMENT_INTERPOLATION, as the reference). uint8 [3,H,W] in, uint8 [3,h,w] out."""
    from torchvision.transforms import v2

    mode = _interpolation(interpolation)
    return v2.Compose(
        [
            v2.Resize(_size(image_size), interpolation=mode, antialias=True),
            FastRandAugment(num_ops=3, interpolation=AUGMENT_INTERPOLATION),
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
    (grayscale and CMYK converted to RGB); other formats through torchvision.io.decode_image
    (16-bit PNGs scaled to 0..255). A failure raises ValueError naming `name`."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    from torchvision.transforms.v2.functional import to_dtype

    try:
        if _is_jpeg(data):
            return decode_jpeg(data, mode=ImageReadMode.RGB)
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise ValueError(f"cannot decode image {name}: {e}") from e
    return image if image.dtype == torch.uint8 else to_dtype(image, torch.uint8, scale=True)


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


def pack_bytes(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D uint8 tensors (e.g. JPEG files) -> (one buffer, int64 offsets [n+1]).

    Why: a DataLoader worker sends every tensor of a batch through its own shared-memory
    segment and file descriptor; hundreds of small ones per batch are slow and can exhaust
    descriptors. One buffer per batch is one segment (and one pinned copy)."""
    offsets = torch.zeros(len(tensors) + 1, dtype=torch.int64)
    if not tensors:
        return torch.empty(0, dtype=torch.uint8), offsets
    torch.cumsum(torch.tensor([t.numel() for t in tensors]), 0, out=offsets[1:])
    return torch.cat(tensors), offsets


def unpack_bytes(buffer: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of `pack_bytes`: views into `buffer`."""
    bounds = offsets.tolist()
    return [buffer[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def decode_jpeg_batch(
    data: list[torch.Tensor],
    device: torch.device | str,
    image_size=(320, 320),
    interpolation: str = "bilinear",
    names: list[str] | None = None,
) -> torch.Tensor:
    """Encoded JPEGs -> uint8 [N,3,H,W] on `device`, resized to `image_size`.

    On CUDA the whole list is decoded by nvJPEG in one call. If that fails, each image is
    decoded alone, and one that the device cannot decode (nvJPEG refuses some valid files,
    e.g. CMYK or lossless JPEGs) is decoded on the CPU (libjpeg-turbo) instead: the GPU path
    reads whatever the CPU path reads. An image neither can decode raises ValueError naming
    it (from `names` when given).
    """
    from torchvision.transforms.v2 import functional as F

    device = torch.device(device)
    size = _size(image_size)
    mode = _interpolation(interpolation)
    if not data:
        return torch.empty((0, 3, *size), dtype=torch.uint8, device=device)
    try:
        decoded = _decode_jpegs(list(data), device)
    except RuntimeError:
        decoded = []
        for i, d in enumerate(data):
            try:
                decoded += _decode_jpegs([d], device)
            except RuntimeError:
                name = names[i] if names is not None else f"image {i} of the batch"
                decoded.append(decode_image_bytes(d, name).to(device))
    shapes = {tuple(img.shape) for img in decoded}
    if len(shapes) == 1:
        batch = torch.stack(decoded)
        if batch.shape[-2:] != size:
            batch = F.resize(batch, list(size), interpolation=mode, antialias=True)
        return batch
    return torch.stack(
        [F.resize(img, list(size), interpolation=mode, antialias=True) for img in decoded]
    )


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's JPEG decoder (nvJPEG on CUDA, one call for the list) -> RGB uint8.

    On CUDA the current stream is drained first: torchvision allocates the outputs on it but
    nvJPEG writes them on a stream of its own that does not wait for ours, so memory just
    freed by kernels still queued here could be overwritten under them (pytorch/vision
    PR 9606). Cheap: the decoder makes the host wait for its own work anyway."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def draw_plans(
    seeds, height: int, width: int, num_ops: int = 3, interpolation: str = "bilinear"
) -> torch.Tensor:
    """RandAugment choices of each image, drawn from its own seed: int64 [N, num_ops, 2] of
    (op index into FastRandAugment.ops, negate). The same choices as FastRandAugment called
    after torch.manual_seed(seed), each from a generator of its own: the global RNG is not
    touched, so another thread drawing from it meanwhile (a prefetch thread builds items when
    num_workers=0) changes neither."""
    aug = _augmenter(num_ops, interpolation)
    plans = torch.zeros((len(seeds), num_ops, 2), dtype=torch.int64)
    generator = torch.Generator()
    for i, seed in enumerate(seeds):
        generator.manual_seed(int(seed))
        plans[i] = torch.tensor(aug.draw(height, width, generator), dtype=torch.int64)
    return plans


def apply_plans(
    images: torch.Tensor, plans: torch.Tensor, interpolation: str = "bilinear"
) -> torch.Tensor:
    """RandAugment a uint8 [N,3,H,W] batch, image i with its own ops plans[i] (from
    `draw_plans`). Still per image, but images that share an op at a given position are
    transformed together, all table ops (Solarize, Brightness, Posterize, AutoContrast,
    Equalize) of a position are one lookup with a table per image, and all its Shear/Rotate
    ops one grid_sample with a matrix per image: ~12 calls per position instead of one per
    image, and half the kernels of one call per op (479 instead of 930 for 400 images), which
    is what a GPU wants (few large kernels, no host syncs). Equal to one FastRandAugment call
    per image (tests/test_fast_paths.py)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"apply_plans expects uint8 images (0..255), got {images.dtype}")
    if plans.dim() != 3 or plans.shape[0] != len(images) or plans.shape[2] != 2:
        raise ValueError(
            f"plans must be [N, num_ops, 2] for {len(images)} images, got {tuple(plans.shape)}"
        )
    if len(images) == 0:
        return images
    aug = _augmenter(plans.shape[1], interpolation)
    h, w = images.shape[-2:]
    keys = plans[:, :, 0].cpu() * 2 + plans[:, :, 1].cpu()  # [N, num_ops]: op and sign
    # Per position the images are sorted by (kind, key): the other ops group by group, then
    # the table ops (one lookup for all: a table per image), then Shear/Rotate (one warp for
    # all: a matrix per image). Fewer, larger kernels: what a GPU wants.
    n_keys = 2 * len(aug.ops)
    names = [aug.op_and_magnitude(k // 2, bool(k % 2), h, w)[0] for k in range(n_keys)]
    kinds = [_TABLE if n in TABLES else _WARP if _is_warp(n) else _OTHER for n in names]
    rank = keys + torch.tensor(kinds)[keys] * n_keys
    orders = torch.argsort(rank, dim=0, stable=True).T  # per position: images sorted by rank
    perms = torch.cat([orders, torch.argsort(orders, dim=1)])  # gather, then scatter orders
    groups = []  # per position and kind: [(key, count)]
    for position, order in enumerate(orders):
        values, counts = torch.unique_consecutive(rank[order, position], return_counts=True)
        by_kind: tuple[list, list, list] = ([], [], [])
        for r, count in zip(values.tolist(), counts.tolist(), strict=True):
            by_kind[r // n_keys].append((r % n_keys, count))
        groups.append(by_kind)
    # the orders and the warp matrices of every position go to the device in one copy each
    matrices = [aug.warp_matrix(k // 2, bool(k % 2), h, w) for g in groups for k, _ in g[_WARP]]
    perms, matrices = _to_device([perms, torch.tensor(matrices or [[0.0] * 6])], images.device)
    used = 0
    for position, (others, tables, warps) in enumerate(groups):
        ordered = images.index_select(0, perms[position])
        pieces, start = [], 0
        for key, count in others:
            pieces.append(aug.apply_op(ordered[start : start + count], key // 2, bool(key % 2)))
            start += count
        if tables:
            first, luts = start, []
            for key, count in tables:
                lut = aug.table(key // 2, bool(key % 2), ordered[start : start + count])
                luts.append(lut.expand(count, 3, 256) if lut.dim() == 1 else lut)
                start += count
            pieces.append(_apply_lut(ordered[first:start], torch.cat(luts)))
        if warps:
            block, counts = matrices[used : used + len(warps)], [n for _, n in warps]
            pieces.append(_warp_affine(ordered[start:], block, aug.mode, counts))
            used += len(warps)
        images = torch.cat(pieces).index_select(0, perms[len(orders) + position])
    return images


_OTHER, _TABLE, _WARP = 0, 1, 2  # how apply_plans runs an op (see there)


def _is_warp(name: str) -> bool:
    return name in WARPS and _inverse_affine is not None


@functools.lru_cache(maxsize=8)
def _augmenter(num_ops: int, interpolation: str) -> FastRandAugment:
    """One FastRandAugment per setting, so its magnitude cache lasts across batches."""
    return FastRandAugment(num_ops=num_ops, interpolation=interpolation)


def _to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors -> `device`; on CUDA through pinned memory without blocking the host."""
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


def augment_batch(
    images: torch.Tensor, seeds, num_ops: int = 3, interpolation: str = "bilinear"
) -> torch.Tensor:
    """RandAugment each image of a uint8 [N,3,H,W] batch with its own ops, drawn from its own
    seed (so the result does not depend on batch composition or on the device)."""
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(images):
        raise ValueError(f"augment_batch: {len(images)} images but {len(seeds)} seeds")
    plans = draw_plans(seeds, *images.shape[-2:], num_ops=num_ops, interpolation=interpolation)
    return apply_plans(images, plans, interpolation)


# ---------------------------------------------------------------- overlapping input and compute


class _Failed:
    """An exception raised in the prefetch thread, carried to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


def _record_stream(obj, stream) -> None:
    """Tell the CUDA caching allocator that tensors made on a side stream are used on
    `stream` (so their memory is not reused before that stream is done with them)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            obj.record_stream(stream)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _record_stream(item, stream)
    elif isinstance(obj, dict):
        for item in obj.values():
            _record_stream(item, stream)


def prefetch_to_device(
    batches: Iterable,
    to_device: Callable,
    device: torch.device | str,
    depth: int = 1,
    priority: int = 0,
) -> Iterator:
    """Yield `to_device(batch)` for each batch, computed ahead in a background thread (up to
    `depth` batches wait in its queue, one more is in the making), so that decoding,
    augmenting and copying the next batch overlaps the training step on the current one. On CUDA the thread works on a side stream and the
    consumer's stream waits on an event per batch (no host sync). depth=0: plain loop.
    `priority`: that side stream's CUDA priority (lower is higher, e.g. -1: the GPU starts
    the preparation's small kernels ahead of the step's queued ones; clamped to the device's
    range; bench/train_throughput.py's "/hp" option measures it).

    Errors raised while loading or preparing a batch are re-raised in the consumer. Closing
    the generator (e.g. `break`) stops the thread after at most one more batch, and closes
    `batches` when it is a generator (e.g. another prefetch_to_device: two chained stages).
    """
    device = torch.device(device)
    if depth <= 0:
        for batch in batches:
            yield to_device(batch)
        return
    iterator = iter(batches)  # made here: a DataLoader iterator wants the main thread
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    stream = torch.cuda.Stream(device, priority=priority) if device.type == "cuda" else None

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with context:
                for batch in iterator:
                    out = to_device(batch)
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not put((out, event)):
                        return
        except BaseException as e:  # handed to the consumer and re-raised there
            put(_Failed(e))
            return
        put(_DONE)

    thread = threading.Thread(target=work, name="prefetch_to_device", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            out, event = item
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                _record_stream(out, current)
            yield out
    finally:
        stop.set()
        thread.join()
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
