"""Items per second of GSVCitiesDataset vs the reference PIL pipeline, on one CPU core.

    python bench/loader.py [--small] [--places N] [--repeats R]

Builds a temporary GSV-Cities tree of 640x480 JPEGs (~100 KB each, like the real images),
then times, with torch.set_num_threads(1) and no workers:
- vprlib: GSVCitiesDataset default train path (read_file + libjpeg-turbo decode to uint8,
  uint8 antialiased resize to 320x320, RandAugment(num_ops=3) on uint8); items stay uint8
  (normalisation happens later on the device).
- reference: PIL open + convert("RGB"), Resize((320, 320)), RandAugment(num_ops=3),
  ToTensor, Normalize, on the same files and the same K images per place.
Prints images/s of each and their ratio (goal >= 1.5x).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vprlib.gsv_cities import gsv_filename  # noqa: E402
from vprlib.gsv_dataset import GSVCitiesDataset  # noqa: E402
from vprlib.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def photo_like(rng: np.random.Generator, w: int = 640, h: int = 480) -> Image.Image:
    """A 640x480 image with photo-like detail (smooth structure plus texture noise) so the
    JPEG is about 100 KB, like a real GSV-Cities image."""
    small = rng.integers(0, 256, size=(h // 16, w // 16, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), np.int16)
    noise = rng.normal(0, 7, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def make_tree(root: Path, places: int, per_place: int, seed: int = 0) -> None:
    """A GSV-Cities tree with one city of `places` places x `per_place` images."""
    rng = np.random.default_rng(seed)
    rows = []
    (root / "Images" / "Bench").mkdir(parents=True)
    for p in range(places):
        for j in range(per_place):
            row = {
                "place_id": p,
                "year": 2010 + j,
                "month": 1 + j,
                "northdeg": 30 * j,
                "city_id": "Bench",
                "lat": 45.0 + p * 0.002,
                "lon": 7.0 + j * 1e-5,
                "panoid": f"bench_{p:04d}-{j:02d}".ljust(22, "x"),
            }
            img = photo_like(rng)
            img.save(root / "Images" / "Bench" / gsv_filename(row), quality=90)
            rows.append(row)
    (root / "Dataframes").mkdir()
    pd.DataFrame(rows).to_csv(root / "Dataframes" / "Bench.csv", index=False)


def reference_items(ds: GSVCitiesDataset, indices) -> int:
    """The reference pipeline on the images that ds would choose; returns images done."""
    import torchvision.transforms as T

    tf = T.Compose(
        [
            T.Resize((320, 320), interpolation=T.InterpolationMode.BILINEAR),
            T.RandAugment(num_ops=3, interpolation=T.InterpolationMode.BILINEAR),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    n = 0
    for i in indices:
        rows = ds._candidates(i)[: ds.img_per_place]
        imgs = [tf(Image.open(ds._path(int(r))).convert("RGB")) for r in rows]
        torch.stack(imgs)
        n += len(imgs)
    return n


def vprlib_items(ds: GSVCitiesDataset, indices) -> int:
    n = 0
    for i in indices:
        images, _ = ds[i]
        n += len(images)
    return n


def best_rate(fn, repeats: int) -> float:
    """Best images/s over `repeats` runs (the machine may be shared: best is least noisy)."""
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
    return max(rates)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="quick smoke run")
    parser.add_argument("--places", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    places, repeats = (2, 1) if args.small else (args.places, args.repeats)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tree(root, places, per_place=4)
        sizes = [p.stat().st_size for p in (root / "Images").rglob("*.jpg")]
        ds = GSVCitiesDataset(root, image_size=(320, 320))
        idx = range(len(ds))
        vprlib_items(ds, idx[:1])  # warm-up (lazy imports, allocator)
        reference_items(ds, idx[:1])
        ref = best_rate(lambda: reference_items(ds, idx), repeats)
        ours = best_rate(lambda: vprlib_items(ds, idx), repeats)
    print(f"images: {len(sizes)} JPEGs 640x480, mean {np.mean(sizes) / 1e3:.0f} KB; 1 thread")
    print(f"reference PIL pipeline: {ref:.1f} images/s")
    print(f"vprlib GSVCitiesDataset: {ours:.1f} images/s")
    print(f"ratio vprlib/reference: {ours / ref:.2f}x (goal >= 1.5x)")


if __name__ == "__main__":
    main()
