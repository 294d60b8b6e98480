"""GSV-Cities: file names, dataframes and the place-batching training dataset.

On disk (see data/README.md)::

    <root>/Dataframes/<City>.csv         place_id, year, month, northdeg, city_id, lat, lon, panoid
    <root>/Images/<city_id>/<file>.jpg   {city_id}_{place_id:07d}_{year:04d}_{month:02d}_
                                         {northdeg:03d}_{lat}_{lon}_{panoid}.jpg

`read_gsv_dataframes` reads the CSVs into one table with a `place` id unique across cities
(city index * 10**5 + place_id, cities in sorted city_id order) and the image `path`
relative to the root, as it exists on disk (.jpg or .JPG); the reading of each city CSV and
the building of its paths (Arrow, one thread per CSV) live in `gsv_csv`.

`GSVCitiesDataset` yields one place per item: K images of the place and K equal labels.
The CPU path (decode="cpu", and the items of the default decode="auto"), chosen by
measurement (bench/loader.py):
- bytes are read with torchvision.io.read_file and decoded with libjpeg-turbo
  (torchvision.io.decode_jpeg) straight into a uint8 tensor, with no PIL object;
- resizing runs on uint8 (antialiased bilinear has a vectorised uint8 kernel), then
  RandAugment(num_ops=3) runs on the uint8 tensor through `transforms.FastRandAugment`
  (torchvision's ops, draws and outputs, with table/slicing/integer kernels: ~2x faster);
- items stay uint8: conversion to float and ImageNet normalisation happen on the training
  device in `batch_to_device` (4x fewer bytes through the DataLoader and to the GPU).
PIL's draft mode (DCT-domain downscaling) does not help here: it only reduces by powers of
two while keeping both sides >= the target, so 640x480 -> 320x320 decodes at full size anyway.
On one core this path gives about 2x the images/s of the reference PIL pipeline.

On a GPU, RandAugment costs more CPU time than decoding (about 2x on one core), so two
more modes move work to the device (bench/train_throughput.py compares them; with
decode="auto", the default, `fit` trains with "mixed" on a CUDA device):
- decode="gpu": the workers only read the JPEG bytes; `batch_to_device` decodes the batch
  with nvJPEG (torchvision.io.decode_jpeg(list, device="cuda")), resizes and augments it on
  the GPU, so the CPU is no longer the bottleneck;
- decode="mixed": the workers decode and resize K - gpu_images images of each place, the
  device decodes the other gpu_images with nvJPEG, and RandAugment runs on the device for
  all of them: CPU cores and the GPU's JPEG decoder share the decoding. gpu_images=0 is
  "CPU decode, device augmentation".
Training ResNet50 + Conv-AP on one H200 with 16 CPU cores (model alone: ~7,200 img/s):
"mixed" ran at ~5,500 img/s end to end, "gpu" at ~5,200, "cpu" at 2,100.
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
import csv
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from .gsv_csv import (
    COLUMNS,
    FLOAT_COLUMNS,
    INT_COLUMNS,
    PLACE_STRIDE,
    read_city,
)
from .transforms import (
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

LAYOUT = "<root>/Dataframes/<City>.csv and <root>/Images/<city_id>/<image>.jpg"
FILENAME_FORMAT = (
    "{city_id}_{place_id:07d}_{year:04d}_{month:02d}_{northdeg:03d}_{lat}_{lon}_{panoid}.jpg"
)

_FLOAT = r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NAME_RE = re.compile(
    r"(?P<city_id>[^_/\\]+)_(?P<place_id>\d+)_(?P<year>\d{4})_(?P<month>\d{2})_"
    rf"(?P<northdeg>\d+)_(?P<lat>{_FLOAT})_(?P<lon>{_FLOAT})_(?P<panoid>[^/\\]+)\.(?:jpg|JPG)"
)

# ---------------------------------------------------------------- file names


def parse_gsv_filename(name: str | os.PathLike) -> dict:
    """GSV-Cities image file name (or path) -> dict of city_id, place_id, year, month,
    northdeg (int), lat, lon (float), panoid. The panoid may contain '_' and '-'.

    Raises ValueError naming the input when it is not such a name.
    """
    base = os.path.basename(os.fspath(name))
    m = _NAME_RE.fullmatch(base)
    if m is None:
        raise ValueError(
            f"not a GSV-Cities image file name: {base!r} (expected {FILENAME_FORMAT}, "
            "extension .jpg or .JPG)"
        )
    out = {
        "city_id": m["city_id"],
        "place_id": int(m["place_id"]),
        "year": int(m["year"]),
        "month": int(m["month"]),
        "northdeg": int(m["northdeg"]),
        "lat": float(m["lat"]),
        "lon": float(m["lon"]),
        "panoid": m["panoid"],
    }
    if not 1 <= out["month"] <= 12:
        raise ValueError(f"month {out['month']} out of 1..12 in GSV-Cities file name {base!r}")
    if not (-90.0 <= out["lat"] <= 90.0 and -180.0 <= out["lon"] <= 180.0):
        raise ValueError(f"lat/lon out of range in GSV-Cities file name {base!r}")
    return out


def _as_int(value, key: str) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    raise ValueError(f"gsv_filename: {key} must be an integer, got {value!r}")


def gsv_filename(row: Mapping, ext: str = ".jpg") -> str:
    """The image file name of a dataframe row (dict, Series, ...): the inverse of
    `parse_gsv_filename` (lat/lon written as Python's shortest float repr)."""
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise KeyError(f"gsv_filename: row lacks {missing} (needs {list(COLUMNS)})")
    if ext not in (".jpg", ".JPG"):
        raise ValueError(f"gsv_filename: ext must be '.jpg' or '.JPG', got {ext!r}")
    ints = {k: _as_int(row[k], k) for k in INT_COLUMNS}
    if min(ints.values()) < 0 or not 1 <= ints["month"] <= 12:
        raise ValueError(f"gsv_filename: negative value or month out of 1..12 in {ints}")
    lat, lon = float(row["lat"]), float(row["lon"])
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        raise ValueError(f"gsv_filename: lat/lon out of range: {lat}, {lon}")
    city_id, panoid = str(row["city_id"]), str(row["panoid"])
    if not city_id or re.search(r"[_/\\]", city_id):
        raise ValueError(f"gsv_filename: city_id must be non-empty without '_' or '/': {city_id!r}")
    if not panoid or re.search(r"[/\\]", panoid):
        raise ValueError(f"gsv_filename: panoid must be non-empty without '/': {panoid!r}")
    return (
        f"{city_id}_{ints['place_id']:07d}_{ints['year']:04d}_{ints['month']:02d}_"
        f"{ints['northdeg']:03d}_{lat!r}_{lon!r}_{panoid}{ext}"
    )


# ---------------------------------------------------------------- dataframes


def _check_root(root) -> Path:
    root = Path(root)
    if not (root / "Dataframes").is_dir():
        what = "does not exist" if not root.exists() else "has no Dataframes/ folder"
        raise FileNotFoundError(f"GSV-Cities root {root} {what}; expected the layout {LAYOUT}")
    return root


def _first_city_id(path: Path) -> str | None:
    """city_id of the first data row of a city CSV (None for a file without rows)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        row = next(reader, None)
    if header is None or row is None:
        return None
    if "city_id" not in header:
        raise ValueError(f"{path}: missing column 'city_id' (needs {list(COLUMNS)})")
    return row[header.index("city_id")]


def _city_csvs(root: Path) -> dict[str, Path]:
    csvs = {p.stem: p for p in sorted((root / "Dataframes").glob("*.csv"))}
    if not csvs:
        raise FileNotFoundError(f"no city CSV in {root / 'Dataframes'}; expected {LAYOUT}")
    return csvs


def _resolve(names, available: dict[str, str | None], kind: str) -> list[str]:
    """Map user city names (CSV stems or city_ids) to keys of `available` {key: city_id}."""
    if names is None:
        return list(available)
    if isinstance(names, str):
        names = [names]
    out = []
    for name in names:
        if name in available:
            out.append(name)
            continue
        hits = [k for k, cid in available.items() if cid == name]
        if len(hits) != 1:
            listing = ", ".join(k if v in (None, k) else f"{k} ({v})" for k, v in available.items())
            why = "ambiguous" if hits else "unknown"
            raise ValueError(f"{why} city {name!r}; available {kind}: {listing}")
        out.append(hits[0])
    return list(dict.fromkeys(out))


def _find_images(
    root: Path, df: pd.DataFrame, stems: np.ndarray, csvs: dict[str, Path], on_missing: str
) -> pd.DataFrame:
    """Point `path` at the file on disk (.jpg, or .JPG where only that exists); rows whose
    image is missing raise, or are dropped with a warning (see read_gsv_dataframes).
    stems: the CSV stem of each row, for messages that name the file."""
    listed = []
    for city_id in df["city_id"].unique():
        folder = root / "Images" / city_id
        if folder.is_dir():
            listed += [f"Images/{city_id}/{n}" for n in os.listdir(folder)]
    path = df["path"]
    found = path.isin(listed)
    if not found.all():  # the dataset README spells the extension .JPG: try it for the misses
        upper = path.str.slice(0, -4) + ".JPG"
        use_upper = ~found & upper.isin(listed)
        df["path"] = path.where(~use_upper, upper)
        found |= use_upper
    if found.all():
        return df
    for stem, csv_path in csvs.items():
        rows = stems == stem
        missing = df.loc[rows & ~found.to_numpy(), "path"].tolist()
        if not missing:
            continue
        msg = (
            f"{len(missing)} of {int(rows.sum())} rows of {csv_path.name} have no image file "
            f"under {root}, e.g. {missing[:3]}"
        )
        if on_missing == "error":
            raise FileNotFoundError(msg + " (on_missing='drop' skips them)")
        warnings.warn(msg + "; dropped", stacklevel=3)
    return df[found.to_numpy()]


def read_gsv_dataframes(
    root: str | os.PathLike,
    cities: str | Iterable[str] | None = None,
    on_missing: str = "error",
    check_files: bool = True,
    threads: int | None = None,
) -> pd.DataFrame:
    """All rows of the chosen city CSVs as one DataFrame.

    `cities`: CSV stems (e.g. "Paris") or city_ids (e.g. "PRS"); None = every CSV in
    Dataframes/. Keeps the CSV columns (extra ones too) and adds `place` (int, unique across
    cities, stable: city index in sorted city_id order * 10**5 + place_id) and `path`
    (image path relative to root, .jpg or .JPG as found on disk). Rows whose image is
    missing raise FileNotFoundError, or are dropped with a warning when on_missing="drop".
    check_files=False skips the directory listing (paths then end in .jpg). `threads`: CSVs
    read at once (None: one per CPU core); the parsing and path building run in Arrow
    (`gsv_csv`), outside Python's GIL.
    """
    if on_missing not in ("error", "drop"):
        raise ValueError(f"on_missing must be 'error' or 'drop', got {on_missing!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    root = _check_root(root)
    csvs = _city_csvs(root)
    ids = {stem: _first_city_id(p) for stem, p in csvs.items()}
    order = {cid: i for i, cid in enumerate(sorted({c for c in ids.values() if c is not None}))}
    chosen = _resolve(cities, ids, "cities (CSV stem, city_id in brackets)")
    workers = min(len(chosen), threads or os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # one city CSV per task
        frames = list(pool.map(lambda s: read_city(csvs[s], order), chosen))
    out = pd.concat(frames, ignore_index=True)
    if check_files:
        stems = np.repeat(np.array(chosen, dtype=object), [len(f) for f in frames])
        out = _find_images(root, out, stems, {s: csvs[s] for s in chosen}, on_missing)
        out = out.reset_index(drop=True)
    if len(out) == 0:
        raise ValueError(f"no rows left under {root} for cities {cities!r}")
    return out


def scan_gsv_images(
    root: str | os.PathLike, cities: str | Iterable[str] | None = None
) -> pd.DataFrame:
    """The same table as read_gsv_dataframes, built from the image file names alone (for a
    copy without Dataframes/, or to cross-check one). `cities` are Images/ folder names
    (city_ids) or, when Dataframes/ exists, CSV stems. Rows sorted by path; `place` uses
    the sorted Images/ folders as the city order."""
    root = Path(root)
    images = root / "Images"
    if not images.is_dir():
        raise FileNotFoundError(f"GSV-Cities root {root} has no Images/ folder; expected {LAYOUT}")
    folders = sorted(e.name for e in os.scandir(images) if e.is_dir())
    if not folders:
        raise FileNotFoundError(f"no city folder in {images}; expected {LAYOUT}")
    available: dict[str, str | None] = {f: f for f in folders}
    if (root / "Dataframes").is_dir() and cities is not None:
        for stem, p in _city_csvs(root).items():
            cid = _first_city_id(p)
            if stem not in available and cid in folders:
                available[stem] = cid
    chosen = [available[k] for k in _resolve(cities, available, "city folders")]
    frames = []
    for city_id in dict.fromkeys(chosen):
        names = sorted(n for n in os.listdir(images / city_id) if n.endswith((".jpg", ".JPG")))
        parts = pd.Series(names, dtype=object).str.extract(_NAME_RE)
        bad = parts["city_id"].isna() | (parts["city_id"] != city_id)
        if bad.any():
            wrong = [names[i] for i in np.flatnonzero(bad.to_numpy())]
            raise ValueError(
                f"{len(wrong)} files in {images / city_id} are not GSV-Cities names of city "
                f"{city_id!r}, e.g. {wrong[:3]} (expected {FILENAME_FORMAT})"
            )
        df = pd.DataFrame({c: parts[c] for c in COLUMNS})
        for c in INT_COLUMNS:
            df[c] = df[c].astype(np.int64)
        for c in FLOAT_COLUMNS:
            df[c] = df[c].astype(np.float64)
        for c in ("city_id", "panoid"):
            df[c] = df[c].astype(str)
        if (df["place_id"] >= PLACE_STRIDE).any():
            raise ValueError(f"{images / city_id}: place_id >= {PLACE_STRIDE} in a file name")
        df["place"] = df["place_id"] + folders.index(city_id) * PLACE_STRIDE
        df["path"] = pd.Series([f"Images/{city_id}/{n}" for n in names], dtype=str)
        frames.append(df)
    return pd.concat(frames, ignore_index=True).sort_values("path", ignore_index=True)


# ---------------------------------------------------------------- pandas helpers


def _place_key(df: pd.DataFrame):
    return "place" if "place" in df.columns else ["city_id", "place_id"]


def filter_min_images(df: pd.DataFrame, n: int) -> pd.DataFrame:
    """Rows of places that have at least `n` images."""
    if int(n) < 1:
        raise ValueError(f"filter_min_images: n must be >= 1, got {n!r}")
    key = _place_key(df)
    sizes = df.groupby(key, sort=False)["place_id"].transform("size")
    return df[sizes >= int(n)]


def filter_dates(
    df: pd.DataFrame,
    years: int | Iterable[int] | None = None,
    months: int | Iterable[int] | None = None,
) -> pd.DataFrame:
    """Rows taken in the given years and/or months (ints or iterables, e.g.
    years=range(2015, 2019), months=[6, 7, 8]). Places may end up with fewer images:
    follow with filter_min_images."""
    mask = pd.Series(True, index=df.index)
    if years is not None:
        years = [years] if isinstance(years, (int, np.integer)) else list(years)
        mask &= df["year"].isin(years)
    if months is not None:
        months = [months] if isinstance(months, (int, np.integer)) else list(months)
        bad = [m for m in months if not 1 <= m <= 12]
        if bad:
            raise ValueError(f"filter_dates: months must be in 1..12, got {bad}")
        mask &= df["month"].isin(months)
    return df[mask]


def filter_hemisphere(df: pd.DataFrame, hemisphere: str) -> pd.DataFrame:
    """Rows in the "north" (lat > 0) or "south" (lat < 0) hemisphere."""
    if hemisphere == "north":
        return df[df["lat"] > 0]
    if hemisphere == "south":
        return df[df["lat"] < 0]
    raise ValueError(f"hemisphere must be 'north' or 'south', got {hemisphere!r}")


def city_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per city_id: places, images, images per place (mean/min/max), first/last year and
    the area (km^2) of the lat/lon bounding box."""
    key = "place" if "place" in df.columns else "place_id"
    sizes = df.groupby(["city_id", key]).size().groupby(level=0)
    g = df.groupby("city_id")
    lat_km = (g["lat"].max() - g["lat"].min()) * 111.32
    mid = np.radians((g["lat"].max() + g["lat"].min()) / 2)
    lon_km = (g["lon"].max() - g["lon"].min()) * 111.32 * np.cos(mid)
    return pd.DataFrame(
        {
            "places": sizes.size(),
            "images": g.size(),
            "img_per_place_mean": sizes.mean(),
            "img_per_place_min": sizes.min(),
            "img_per_place_max": sizes.max(),
            "year_min": g["year"].min(),
            "year_max": g["year"].max(),
            "area_km2": lat_km * lon_km,
        }
    )


# ---------------------------------------------------------------- dataset


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


def _looks_complete_jpeg(data: torch.Tensor) -> bool:
    """JPEG start and end markers present (a truncated file lacks the end marker)."""
    n = data.numel()
    return (
        n > 4
        and data[0] == 0xFF
        and data[1] == 0xD8
        and data[n - 2] == 0xFF
        and data[n - 1] == 0xD9
    )


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
    `fit` switch to "mixed" on a CUDA device (`for_device`). All modes give the same images
    on the CPU; on a GPU nvJPEG rounds a grey level or two differently. Use `collate_fn` in
    the DataLoader and `batch_to_device` on each batch.
    on_corrupt="error" raises on an unreadable image naming the file; "skip" takes another
    image of the same place instead. `dataframe` replaces reading the CSVs (e.g. a
    filtered read_gsv_dataframes table; needs `place` and `path`). Copies of the dataset in
    worker processes carry `dataframe=None` (they need only the packed paths).
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
        self.seed = int(seed)
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
        (the default) on a CUDA device: a copy with decode="mixed" (K // 2 images of each
        place decoded by nvJPEG, RandAugment on the GPU), 2.6x the images/s of "cpu" on an
        H200 with 16 CPU cores (bench/RESULTS.md). Otherwise (an explicit decode, a custom
        `transform`, or another device) this dataset itself."""
        if not self.auto_decode or self._custom_transform is not None:
            return self
        if torch.device(device).type != "cuda":
            return self
        fast = copy.copy(self)  # shares the packed arrays; __getstate__ drops the table:
        fast.dataframe = self.dataframe  # keep it (read-only, shared)
        fast.auto_decode = False
        fast._set_decode("mixed", None)
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
        decode = "'auto' (cpu; mixed under fit on CUDA)" if self.auto_decode else repr(self.decode)
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
        if encoded:
            if not _looks_complete_jpeg(data):
                raise ValueError(f"cannot decode image {path}: not a complete JPEG file")
            return data
        return decode_image_bytes(data, path)

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
            plans = draw_plans(seeds, *self.image_size, interpolation=self.interpolation)
        return EncodedImages(buffer, offsets, paths[k_cpu:], plans, (len(seeds),), decoded)

    # -- batching
    def collate_fn(self, items):
        """[(images, labels)] -> (images [P,K,3,H,W] uint8 or EncodedImages, labels [P,K])."""
        labels = torch.stack([lab for _, lab in items])
        if self.decode != "cpu":
            return EncodedImages.collate([enc for enc, _ in items], tuple(labels.shape)), labels
        return torch.stack([img for img, _ in items]), labels

    def batch_to_device(self, images, device, channels_last: bool = False) -> torch.Tensor:
        """A collated batch -> normalised float [P*K,3,H,W] on `device`. For decode="gpu" and
        "mixed" this decodes (nvJPEG on CUDA), resizes and RandAugments on the device.
        Equal to `augment_on_device(decode_on_device(...))`, its two halves."""
        return self.augment_on_device(self.decode_on_device(images, device), device, channels_last)

    def decode_on_device(self, images, device) -> DecodedImages | torch.Tensor:
        """First half of `batch_to_device`: EncodedImages -> DecodedImages (uint8 on
        `device`, decoded and resized, not yet augmented); a batch the workers finished is
        returned as it is. Decoding waits for the device (nvJPEG returns when done), so
        `train.device_batches(stages=2)` runs this half in a thread of its own."""
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
                batch = apply_plans(batch, images.plans, self.interpolation)
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


def _haversine_m(lat1, lon1, lat2, lon2):
    """Great-circle distance in metres (numpy broadcasting)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    a = (
        np.sin((p2 - p1) / 2) ** 2
        + np.cos(p1) * np.cos(p2) * np.sin(np.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * 6371008.8 * np.arcsin(np.sqrt(a))


def place_centres(df: pd.DataFrame) -> pd.DataFrame:
    """Mean lat/lon, city_id and image count per place (for maps and spacing checks)."""
    g = df.groupby(_place_key(df))
    out = g.agg(city_id=("city_id", "first"), lat=("lat", "mean"), lon=("lon", "mean"))
    out["images"] = g.size()
    return out


def min_place_distance_m(df: pd.DataFrame) -> float:
    """Smallest distance (metres) between two place centres of the same city (brute force
    per city; fine for a few thousand places)."""
    centres = place_centres(df)
    best = math.inf
    for _, c in centres.groupby("city_id"):
        lat, lon = c["lat"].to_numpy(), c["lon"].to_numpy()
        if len(lat) < 2:
            continue
        d = _haversine_m(lat[:, None], lon[:, None], lat[None, :], lon[None, :])
        np.fill_diagonal(d, np.inf)
        best = min(best, float(d.min()))
    return best
