"""Helpers shared by the throughput scripts: synthetic JPEGs, device sync, machine summary."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import torch


def noisy_jpeg(rng: np.random.Generator, width: int = 640, height: int = 480) -> bytes:
    """A photo-like JPEG (smooth structure + texture noise, quality 90): ~106 KB at 640x480,
    about the size and decoding cost of a real GSV-Cities image."""
    from PIL import Image

    small = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
    base = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 7, size=(height, width, 3))
    pixels = np.clip(np.asarray(base, np.int16) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def jpeg_pool(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct synthetic JPEGs. The scripts write files as copies of a pool: decoding
    cost depends on the bytes, not on whether two files hold the same ones."""
    rng = np.random.default_rng(seed)
    return [noisy_jpeg(rng) for _ in range(count)]


def link_or_copy(pool_files: list[Path], i: int, path: Path) -> None:
    """Make `path` a hard link to pool file i % len(pool) (a copy where links fail). Links
    keep a 90k-image tree from costing 10 GB of disk writes; decoding cost is the same."""
    source = pool_files[i % len(pool_files)]
    try:
        os.link(source, path)
    except OSError:
        shutil.copyfile(source, path)


def write_pool(folder: Path, pool: list[bytes]) -> list[Path]:
    """Write the pool's JPEGs once into `folder`; return their paths (for `link_or_copy`)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, data in enumerate(pool):
        files.append(folder / f"pool_{i:04d}.jpg")
        files[-1].write_bytes(data)
    return files


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (timing must not stop before the GPU does)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_summary(device: torch.device) -> str:
    """Device name, usable CPU cores and torch version, for the results header."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"{name}, {cores} CPU cores, torch {torch.__version__}"
