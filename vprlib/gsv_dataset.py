"""The GSV-Cities training dataset: one place per item, K images and K equal labels.

`GSVCitiesDataset` reads the tables of `gsv_cities` (`read_gsv_dataframes`), keeps the places
with at least `min_img_per_place` images and picks K of them per item.
The CPU path (decode="cpu", and the items of the default decode="auto"), chosen by
measurement (bench/loader.py):
- bytes are read with torchvision.io.read_file and decoded with libjpeg-turbo
  (torchvision.io.decode_jpeg) straight into a uint8 tensor, with no PIL object;
- resizing runs on uint8 (antialiased bilinear has a vectorised uint8 kernel), then
  RandAugment(num_ops=3, bilinear warps whatever `interpolation` the resize uses, as the
  reference) runs on the uint8 tensor through `transforms.FastRandAugment` (torchvision's
  ops and draws, with table/slicing/integer kernels: ~2x faster; warps round ~0.1% of
  pixels one grey level apart);
- items stay uint8: conversion to float and ImageNet normalisation happen on the training
  device in `batch_to_device` (4x fewer bytes through the DataLoader and to the GPU).
PIL's draft mode (DCT-domain downscaling) does not help here: it only reduces by powers of
two while keeping both sides >= the target, so 640x480 -> 320x320 decodes at full size anyway.
On one core this path gives about 2x the images/s of the reference PIL pipeline.

On a GPU, RandAugment costs more CPU time than decoding (about 2x on one core), so two
more modes move work to the device (bench/train_throughput.py compares them; with
decode="auto", the default, `fit` trains with "gpu" on a CUDA device):
- decode="gpu": the workers only read the JPEG bytes; `batch_to_device` decodes the batch
  with nvJPEG (torchvision.io.decode_jpeg(list, device="cuda")), resizes and augments it on
  the GPU, so the CPU is no longer the bottleneck;
- decode="mixed": the workers decode and resize K - gpu_images images of each place, the
  device decodes the other gpu_images with nvJPEG, and RandAugment runs on the device for
  all of them: CPU cores and the GPU's JPEG decoder share the decoding. gpu_images=0 is
  "CPU decode, device augmentation".
Training ResNet50 + Conv-AP on one H200 with 16 CPU cores (model alone: ~7,200 img/s), in
one session: "gpu" ran at ~5,700 img/s end to end (with fit's two preparation threads,
`device_batches(stages=2)`), "mixed" (gpu_images=2) at ~5,000, "cpu" at 1,800. The CPU side
of "mixed" could not keep up: 12 workers decoding and resizing half the images left the step
waiting.
In both, RandAugment stays per image: each image's ops are drawn in the worker from its own
seed (`transforms.draw_plans`) and the device applies them, grouping the images that share
an op (`transforms.apply_plans`). The JPEG bytes of a batch travel packed in one buffer (one
shared-memory segment and one pinned copy per batch, not one per image). On a CPU device the
same code runs on the CPU and gives the same tensors as decode="cpu".

Image choice and augmentation of item i are a pure function of (seed, epoch, i): the same
batches come out whatever the number of workers or the order of access, which makes
resumed training exact. Call `set_epoch(epoch)` at the start of each epoch.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from .batching import check_seed
from .gsv_cities import filter_min_images, read_gsv_dataframes
from .transforms import (
    AUGMENT_INTERPOLATION,
    _size,
    apply_plans,
    decode_image_bytes,
    decode_jpeg_batch,
    draw_plans,
    eval_transform,
    pack_bytes,
    read_image_bytes,
    to_model_input,
    train_transform,
    unpack_bytes,
)


def _item_seed(*keys: int) -> int:
    """A 63-bit seed from integers (seed, epoch, index, stream), well mixed."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _pack_strings(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (one uint8 buffer, offsets): no Python objects to copy into workers."""
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


@dataclass
class EncodedImages:
    """Images that the device finishes (decode="gpu" or "mixed"), for one place or a batch.

    - buffer, offsets: the JPEG bytes of the images the device decodes, packed in one uint8
      buffer (image i is buffer[offsets[i]:offsets[i + 1]]; `data` lists them as views);
    - paths: their files (for error messages);
    - decoded: images the workers already decoded and resized, uint8 [..., k_cpu, 3, H, W]
      (decode="mixed"), or None;
    - plans: the RandAugment ops of every image, int64 [N, num_ops, 2] (see
      transforms.draw_plans), or None without augmentation;
    - shape: (K,) for one place, (P, K) for a batch; per place the worker-decoded images
      come first.
    """

    buffer: torch.Tensor
    offsets: torch.Tensor
    paths: list[str]
    plans: torch.Tensor | None
    shape: tuple[int, ...]
    decoded: torch.Tensor | None = None

    @property
    def data(self) -> list[torch.Tensor]:
        """The encoded images, as views into `buffer`."""
        return unpack_bytes(self.buffer, self.offsets)

    def __len__(self) -> int:
        return math.prod(self.shape)

    def pin_memory(self) -> EncodedImages:
        """Pinned copy (the DataLoader calls this with pin_memory=True)."""
        decoded = self.decoded.pin_memory() if self.decoded is not None else None
        return replace(self, buffer=self.buffer.pin_memory(), decoded=decoded)

    @staticmethod
    def collate(items: list[EncodedImages], shape: tuple[int, ...]) -> EncodedImages:
        """Items of P places -> one batch of `shape` (P, K), bytes in one buffer."""
        buffer, bases = pack_bytes([e.buffer for e in items])  # bases[i]: start of item i
        offsets = torch.cat(
            [bases[:1]]
            + [e.offsets[1:] + base for e, base in zip(items, bases[:-1].tolist(), strict=True)]
        )
        return EncodedImages(
            buffer=buffer,
            offsets=offsets,
            paths=[p for e in items for p in e.paths],
            plans=torch.cat([e.plans for e in items]) if items[0].plans is not None else None,
            shape=shape,
            decoded=torch.stack([e.decoded for e in items])
            if items[0].decoded is not None
            else None,
        )


JPEG_TAIL = 1024  # bytes searched for the end marker: some files carry padding after it


def _looks_complete_jpeg(data: torch.Tensor) -> bool:
    """A JPEG whose end marker (FF D9) lies in its last KiB: a truncated file lacks it (in
    the compressed data FF is never followed by D9). A cheap test; what fails it is checked
    by decoding on the CPU."""
    if data.numel() <= 4 or data[0] != 0xFF or data[1] != 0xD8:
        return False
    tail = data[-JPEG_TAIL:]
    return bool(((tail[:-1] == 0xFF) & (tail[1:] == 0xD9)).any())


class GSVCitiesDataset(torch.utils.data.Dataset):
    """Places of GSV-Cities as items: ds[i] -> (images uint8 [K,3,H,W], labels int64 [K]).

    img_per_place (K) images are drawn per place, at random (random_sample=True) or the K
    most recent by (year, month). Places with fewer than min_img_per_place images are left
    out. `transform` (uint8 [3,H,W] -> [3,h,w]) defaults to resize + RandAugment(3)
    (augment=True) or resize only (augment=False). Labels are the `place` column.

    decode="cpu": items hold decoded (and augmented) uint8 images; decode="gpu": items hold
    the JPEG bytes and `batch_to_device` decodes, resizes and augments on the device;
    decode="mixed": the workers decode and resize K - gpu_images images per place (default
    gpu_images = K // 2), the device decodes the rest and augments all (see the module
    docstring). decode="auto" (default) behaves as "cpu" (items are uint8 images) and lets
    `fit` switch to "gpu" on a CUDA device (`for_device`). All modes give the same images
    on the CPU; on a GPU nvJPEG rounds a grey level or two differently. Use `collate_fn` in
    the DataLoader and `batch_to_device` on each batch.
    Items depend only on (seed, epoch, index): in your own loop call `set_epoch(e)` before
    each epoch, or every epoch repeats the same images and augmentations. With
    `persistent_workers=True` the workers keep their own copy and never see that call: use
    `vprlib.batching.make_loader` (what `fit` uses: `loader, sampler = make_loader(ds, P,
    seed, num_workers, device)`, then `sampler.set_epoch(e)` each epoch; the sampler sends the
    epoch with each index).
    `interpolation` ("bilinear" | "bicubic") is the resize's; RandAugment's warps stay
    bilinear, as in the reference recipe.
    on_corrupt="error" raises on an unreadable image naming the file; "skip" takes another
    image of the same place instead. `dataframe` replaces reading the CSVs (e.g. a
    filtered read_gsv_dataframes table; needs `place`, `path`, `year` and `month`). Copies of
    the dataset in worker processes carry `dataframe=None` (they need only the packed paths).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        cities: str | Iterable[str] | None = None,
        img_per_place: int = 4,
        min_img_per_place: int = 4,
        random_sample: bool = True,
        image_size=(320, 320),
        transform=None,
        seed: int = 0,
        decode: str = "auto",
        augment: bool = True,
        interpolation: str = "bilinear",
        on_corrupt: str = "error",
        dataframe: pd.DataFrame | None = None,
        gpu_images: int | None = None,
    ):
        if img_per_place < 1 or img_per_place > min_img_per_place:
            raise ValueError(
                f"need 1 <= img_per_place <= min_img_per_place, got {img_per_place} and "
                f"{min_img_per_place}"
            )
        if decode not in ("auto", "cpu", "gpu", "mixed"):
            raise ValueError(f"decode must be 'auto', 'cpu', 'gpu' or 'mixed', got {decode!r}")
        if decode == "auto" and gpu_images is not None:
            raise ValueError("gpu_images applies to decode='mixed' only: pass decode='mixed'")
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        if decode not in ("cpu", "auto") and transform is not None:
            raise ValueError(
                f"decode={decode!r} augments on the device: pass augment=, not transform="
            )
        self.root = Path(root)
        if dataframe is None:
            dataframe = read_gsv_dataframes(self.root, cities)
        for col in ("place", "path", "year", "month"):
            if col not in dataframe.columns:
                raise KeyError(f"dataframe lacks column {col!r} (use read_gsv_dataframes)")
        df = filter_min_images(dataframe, min_img_per_place)
        if len(df) == 0:
            raise ValueError(f"no place has >= {min_img_per_place} images under {self.root}")
        # most recent first inside each place; `place` order across places
        df = df.sort_values(
            ["place", "year", "month"], ascending=[True, False, False], kind="stable"
        )
        self.dataframe = df.reset_index(drop=True)
        self.img_per_place = int(img_per_place)
        self.min_img_per_place = int(min_img_per_place)
        self.random_sample = bool(random_sample)
        self.image_size = _size(image_size)
        self.seed = check_seed(seed)
        self.epoch = 0
        self.augment = bool(augment)
        self.interpolation = interpolation
        self.on_corrupt = on_corrupt
        self.auto_decode = decode == "auto"
        self._custom_transform = transform
        self._set_decode("cpu" if decode == "auto" else decode, gpu_images)
        place = self.dataframe["place"].to_numpy()
        starts = np.flatnonzero(np.r_[True, place[1:] != place[:-1]])
        self._starts = starts.astype(np.int64)
        self._counts = np.diff(np.r_[starts, len(place)]).astype(np.int64)
        self._labels = place[starts].astype(np.int64)
        self._paths, self._offsets = _pack_strings(self.dataframe["path"].tolist())

    def _set_decode(self, decode: str, gpu_images: int | None) -> None:
        """Set the decoding mode and the transform the workers run for it."""
        self.gpu_images = _gpu_images(decode, gpu_images, self.img_per_place)
        self.decode = decode
        if decode == "cpu" and self._custom_transform is not None:
            self.transform = self._custom_transform
        elif decode == "cpu":
            make = train_transform if self.augment else eval_transform
            self.transform = make(self.image_size, self.interpolation)
        elif decode == "mixed":  # the workers only resize; augmentation happens on the device
            self.transform = eval_transform(self.image_size, self.interpolation)
        else:
            self.transform = None

    def for_device(self, device: str | torch.device) -> GSVCitiesDataset:
        """The dataset to train with on `device` (what `fit` does with it). With decode="auto"
        (the default) on a CUDA device: a copy with decode="gpu" (nvJPEG decodes every
        image, resizing and RandAugment on the GPU), 3.1x the images/s of "cpu" and 1.15x
        those of "mixed" on an H200 with 16 CPU cores (bench/RESULTS.md). Otherwise (an
        explicit decode, a custom `transform`, or another device) this dataset itself."""
        if not self.auto_decode or self._custom_transform is not None:
            return self
        if torch.device(device).type != "cuda":
            return self
        fast = copy.copy(self)  # shares the packed arrays; __getstate__ drops the table:
        fast.dataframe = self.dataframe  # keep it (read-only, shared)
        fast.auto_decode = False
        fast._set_decode("gpu", None)
        return fast

    # -- bookkeeping
    def __len__(self) -> int:
        return len(self._starts)

    @property
    def num_images(self) -> int:
        return int(self._counts.sum())

    @property
    def num_places(self) -> int:
        return len(self)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch: image choice and augmentation depend on (seed, epoch, index)."""
        self.epoch = int(epoch)

    def __getstate__(self):
        # workers need the packed arrays only, not the DataFrame
        state = self.__dict__.copy()
        state["dataframe"] = None
        return state

    def __repr__(self) -> str:
        decode = "'auto' (cpu; gpu under fit on CUDA)" if self.auto_decode else repr(self.decode)
        return (
            f"GSVCitiesDataset({len(self)} places, {self.num_images} images, "
            f"K={self.img_per_place}, size={self.image_size}, decode={decode}"
            + (f", gpu_images={self.gpu_images})" if self.decode == "mixed" else ")")
        )

    def _path(self, row: int) -> str:
        a, b = self._offsets[row], self._offsets[row + 1]
        return os.path.join(self.root, self._paths[a:b].tobytes().decode("utf-8"))

    # -- items
    def _candidates(self, index: int) -> np.ndarray:
        """Row numbers of place `index` in the order they are tried."""
        start, count = int(self._starts[index]), int(self._counts[index])
        if not self.random_sample:
            return np.arange(start, start + count)
        g = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index, 0))
        return start + torch.randperm(count, generator=g).numpy()

    def _load(self, path: str, encoded: bool) -> torch.Tensor:
        """The image at `path`: its JPEG bytes (`encoded`, checked for completeness) or
        decoded uint8 [3,H,W]."""
        data = read_image_bytes(path)
        if not encoded:
            return decode_image_bytes(data, path)
        if not _looks_complete_jpeg(data):  # cut short? or another format, or a long trailer:
            decode_image_bytes(data, path)  # checked as decode="cpu" would (raises if unreadable)
        return data

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"place index {index} out of range for {len(self)} places")
        k = self.img_per_place
        k_cpu = k - self.gpu_images  # the first k_cpu images are decoded here
        loaded, paths = [], []
        for row in self._candidates(index):
            path = self._path(int(row))
            try:
                loaded.append(self._load(path, encoded=len(loaded) >= k_cpu))
            except (ValueError, FileNotFoundError) as e:
                if self.on_corrupt == "error":
                    raise
                warnings.warn(f"skipping unreadable image: {e}", stacklevel=2)
                continue
            paths.append(path)
            if len(loaded) == k:
                break
        if len(loaded) < k:
            raise ValueError(
                f"place {int(self._labels[index])} has only {len(loaded)} readable images, "
                f"needs {k} (last tried: {paths[-1:]})"
            )
        labels = torch.full((k,), int(self._labels[index]), dtype=torch.int64)
        seeds = [_item_seed(self.seed, self.epoch, index, 1 + j) for j in range(k)]
        if self.decode != "cpu":
            return self._device_item(loaded, paths, seeds, k_cpu), labels
        out = []
        with torch.random.fork_rng(devices=[]):
            for img, s in zip(loaded, seeds, strict=True):
                torch.default_generator.manual_seed(s)  # CPU only: GPU generators untouched
                out.append(self.transform(img))
        return torch.stack(out), labels

    def _device_item(self, loaded, paths, seeds, k_cpu: int) -> EncodedImages:
        """One place for decode="gpu"/"mixed": the first k_cpu images resized here, the rest
        as bytes; the RandAugment ops of all drawn here from their seeds (cheap, and it keeps
        per-image Python work off the training process)."""
        buffer, offsets = pack_bytes(loaded[k_cpu:])
        decoded = None
        if k_cpu:
            decoded = torch.stack([self.transform(img) for img in loaded[:k_cpu]])
        plans = None
        if self.augment:
            plans = draw_plans(seeds, *self.image_size, interpolation=AUGMENT_INTERPOLATION)
        return EncodedImages(buffer, offsets, paths[k_cpu:], plans, (len(seeds),), decoded)

    # -- batching
    def collate_fn(self, items):
        """[(images, labels)] -> (images [P,K,3,H,W] uint8 or EncodedImages, labels [P,K])."""
        labels = torch.stack([lab for _, lab in items])
        if self.decode != "cpu":
            return EncodedImages.collate([enc for enc, _ in items], tuple(labels.shape)), labels
        return torch.stack([img for img, _ in items]), labels

    def batch_to_device(self, images, device, channels_last: bool = False) -> torch.Tensor:
        """The images of a collated batch (`images, labels = batch`) -> normalised float
        [P*K,3,H,W] on `device`. For decode="gpu" and
        "mixed" this decodes (nvJPEG on CUDA), resizes and RandAugments on the device.
        Equal to `augment_on_device(decode_on_device(...))`, its two halves."""
        return self.augment_on_device(self.decode_on_device(images, device), device, channels_last)

    def decode_on_device(self, images, device) -> DecodedImages | torch.Tensor:
        """First half of `batch_to_device`: EncodedImages -> DecodedImages (uint8 on
        `device`, decoded and resized, not yet augmented); a batch the workers finished is
        returned as it is. Decoding waits for the device (nvJPEG returns when done), so
        `batching.device_batches(stages=2)` runs this half in a thread of its own."""
        if not isinstance(images, EncodedImages):
            return images
        device = torch.device(device)
        places = images.shape[0] if len(images.shape) == 2 else 1
        size = self.image_size
        parts = []
        if images.decoded is not None:
            parts.append(images.decoded.to(device, non_blocking=True).view(places, -1, 3, *size))
        if len(images.paths):
            batch = decode_jpeg_batch(images.data, device, size, self.interpolation, images.paths)
            parts.append(batch.view(places, -1, 3, *size))
        batch = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return DecodedImages(batch.flatten(0, 1), images.plans)

    def augment_on_device(
        self, images: DecodedImages | torch.Tensor, device, channels_last: bool = False
    ) -> torch.Tensor:
        """Second half of `batch_to_device`: RandAugment the DecodedImages by their plans
        (each image its own ops) and normalise -> float [N,3,H,W] on `device`."""
        if isinstance(images, DecodedImages):
            batch = images.images
            if images.plans is not None:
                batch = apply_plans(batch, images.plans, AUGMENT_INTERPOLATION)
            images = batch
        return to_model_input(images, device, channels_last=channels_last)


class DecodedImages(NamedTuple):
    """A batch decoded on the device, not yet augmented: uint8 [N,3,H,W] and each image's
    RandAugment plan (int64 [N, num_ops, 2], on the CPU) or None."""

    images: torch.Tensor
    plans: torch.Tensor | None


def _gpu_images(decode: str, gpu_images: int | None, k: int) -> int:
    """Images per place decoded on the device: all for "gpu", none for "cpu", `gpu_images`
    (default K // 2) for "mixed"."""
    if decode != "mixed":
        if gpu_images is not None:
            raise ValueError(f"gpu_images applies to decode='mixed' only, got decode={decode!r}")
        return k if decode == "gpu" else 0
    gpu_images = k // 2 if gpu_images is None else gpu_images
    if isinstance(gpu_images, bool) or not isinstance(gpu_images, int) or not 0 <= gpu_images <= k:
        raise ValueError(f"gpu_images must be an int in 0..{k} (img_per_place), got {gpu_images!r}")
    return gpu_images
