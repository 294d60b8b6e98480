"""Descriptor extraction, nearest-neighbour search, recall@K and per-query results.

The standard VPR protocol: each query's L2 nearest neighbours among the database
descriptors (L2 on L2-normalised descriptors ranks like cosine similarity); a query is correct
at K when any of its top-K is a positive. Recall@K = share of correct queries.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from .benchmarks import Benchmark, load_benchmark
from .fileio import atomic_open, atomic_path
from .progress import progress_bar
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_jpeg_batch,
    eval_transform,
    load_image,
    pack_bytes,
    prefetch_to_device,
    read_image_bytes,
    to_model_input,
    unpack_bytes,
)

KS = (1, 5, 10, 15, 20, 25)
DEFAULT_IMAGE_SIZE = (320, 320)
SEARCH_CHUNK = 4096

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


# ---------------------------------------------------------------------------------------------
# Descriptor extraction


def preprocess_config(
    model: torch.nn.Module,
    image_size: int | Sequence[int] | None = None,
    interpolation: str | None = None,
) -> dict[str, Any]:
    """Evaluation preprocessing: arguments, else `model.preprocess`, else 320x320 bilinear ImageNet."""
    pre = dict(getattr(model, "preprocess", None) or {})
    size = image_size if image_size is not None else pre.get("image_size", DEFAULT_IMAGE_SIZE)
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size must be an int or (H, W) of positive ints, got {size}")
    interp = interpolation if interpolation is not None else pre.get("interpolation", "bilinear")
    if interp not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interp!r}")
    mean = tuple(pre.get("mean", IMAGENET_MEAN))
    std = tuple(pre.get("std", IMAGENET_STD))
    return {"image_size": size, "interpolation": interp, "mean": mean, "std": std}


class ImageFiles(Dataset):
    """Image paths -> (uint8 [3,H,W] image resized for evaluation, index).

    With `raw`, items are the undecoded file bytes instead (decoded later on the device).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        image_size: tuple[int, int],
        interpolation: str,
        raw: bool = False,
    ):
        self.paths = [str(p) for p in paths]
        self.transform = eval_transform(image_size, interpolation)
        self.raw = raw

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.raw:
            return read_image_bytes(self.paths[i]), i
        return self.transform(load_image(self.paths[i])), i


def _collate_raw(
    items: list[tuple[torch.Tensor, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(file bytes, index)] -> (packed bytes, offsets, indices): one buffer per batch."""
    buffer, offsets = pack_bytes([b for b, _ in items])
    return buffer, offsets, torch.tensor([i for _, i in items], dtype=torch.int64)


MAX_DEFAULT_WORKERS = 12


def default_num_workers() -> int:
    """DataLoader worker processes for this machine (training and evaluation): the usable
    CPU cores minus 2, kept for the main process and its pin-memory/prefetch threads, at most
    12 and at least 1; 0 (load in the main process) on a single core.
    Why: on 16 cores feeding one H200, 12 decoding workers gave the best throughput and 15
    starved the main process (2.8x slower); see bench/RESULTS.md."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return 0 if cores <= 1 else max(1, min(MAX_DEFAULT_WORKERS, cores - 2))


def auto_gpu_decode(gpu_decode: bool | None, device: torch.device, paths: Sequence[str]) -> bool:
    """gpu_decode=None -> decode on the device when it is CUDA and every path is a JPEG
    (nvJPEG decodes JPEG only); True/False are kept."""
    if gpu_decode is not None:
        return bool(gpu_decode)
    return device.type == "cuda" and all(p.lower().endswith((".jpg", ".jpeg")) for p in paths)


def _resolve_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(iter(model.parameters()), None)
    if param is not None and param.device.type == "cuda":
        return param.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


EVAL_PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def resolve_eval_precision(precision: str, device: torch.device) -> str:
    """ "auto" -> "bf16" on CUDA (fp16 where bf16 is unsupported), "fp32" elsewhere;
    reduced precision applies on CUDA only (the CPU runs fp32)."""
    if precision not in EVAL_PRECISIONS:
        raise ValueError(f"precision must be one of {EVAL_PRECISIONS}, got {precision!r}")
    if device.type != "cuda":
        return "fp32"
    if precision in ("auto", "bf16") and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16" if precision == "auto" else precision


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    """Autocast on CUDA for a resolved "bf16"/"fp16"; nothing for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _descriptor_problem(desc: torch.Tensor, half: bool) -> str | None:
    """Why a batch of float32 descriptors cannot be stored, or None."""
    if not torch.isfinite(desc).all():
        return "non-finite (NaN/inf) descriptors"
    if half and desc.abs().max() > torch.finfo(torch.float16).max:
        return "descriptors beyond float16's range (65504; half=True would make them inf)"
    return None


def extract_descriptors(
    model: torch.nn.Module,
    paths_or_dataset: Sequence[str | os.PathLike] | Dataset,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    image_size: int | Sequence[int] | None = None,
    interpolation: str | None = None,
    progress: bool = True,
    half: bool = False,
    out_path: str | os.PathLike | None = None,
    gpu_decode: bool | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Run `model` over images and return descriptors [N, D] (float32, float16 if `half`).

    `paths_or_dataset`: image paths (decoded + resized on DataLoader workers, uint8), or a
    Dataset whose items are an image tensor or a tuple starting with one (uint8 images are
    normalised on the device; float images are taken as normalised). Preprocessing comes from
    `model.preprocess` unless `image_size` / `interpolation` are given. The model is moved to
    `device` (default: CUDA when available); its train/eval mode is restored afterwards.
    `out_path` (.npy) streams the descriptors into a memory-mapped file and returns it opened
    read-only, so a database larger than RAM needs bounded memory. `gpu_decode` reads JPEG
    bytes on the workers and decodes them on the device (nvJPEG on CUDA); None (default) does
    so on CUDA when every path is a .jpg/.jpeg (on an H200, in bf16, it extracted 5,600 img/s
    against 3,550 with CPU decoding; 3,700 at the default fp32; bench/RESULTS.md). On CUDA
    the next batch is decoded/copied/normalised on a side stream while the model runs on this
    one. `precision`: "fp32"
    (default: the numbers papers report), or on CUDA "bf16" / "fp16" autocast ("auto": bf16;
    faster; descriptors within ~0.2% cosine of fp32); the CPU always runs fp32.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if out_path is not None and Path(out_path).suffix != ".npy":
        raise ValueError(f"out_path must end with .npy, got {out_path}")
    pre = preprocess_config(model, image_size, interpolation)
    device = _resolve_device(model, device)
    precision = resolve_eval_precision(precision, device)
    if isinstance(paths_or_dataset, Dataset):
        dataset, paths = paths_or_dataset, None
        if gpu_decode:
            raise ValueError("gpu_decode needs image paths, not a Dataset")
    elif isinstance(paths_or_dataset, (str, os.PathLike)):
        raise TypeError("paths_or_dataset must be a sequence of image paths, not a single path")
    else:
        paths = [str(p) for p in paths_or_dataset]
        gpu_decode = auto_gpu_decode(gpu_decode, device, paths)
        dataset = ImageFiles(paths, pre["image_size"], pre["interpolation"], raw=gpu_decode)
    n = len(dataset)
    if n == 0:
        raise ValueError("extract_descriptors: no images given")
    workers = default_num_workers() if num_workers is None else int(num_workers)
    workers = min(workers, -(-n // batch_size))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        collate_fn=_collate_raw if gpu_decode else None,
    )
    out_dtype = np.float16 if half else np.float32
    was_training = model.training
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    model.eval()

    def prepare(batch) -> torch.Tensor:
        """A loader batch -> normalised float images on the device."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        if gpu_decode:
            buffer, offsets, index = batch
            names = [paths[i] for i in index.tolist()]
            size, interp = pre["image_size"], pre["interpolation"]
            images = decode_jpeg_batch(unpack_bytes(buffer, offsets), device, size, interp, names)
        channels_last = device.type == "cuda"
        return to_model_input(images, device, pre["mean"], pre["std"], channels_last)

    depth = 1 if device.type == "cuda" else 0
    out, start = None, 0
    try:
        with contextlib.ExitStack() as files:
            # With out_path the memmap lives in a temporary file, renamed onto out_path
            # (fsynced) only when every descriptor is written.
            tmp = files.enter_context(atomic_path(out_path)) if out_path is not None else None
            with (
                torch.inference_mode(),
                _autocast(precision),
                contextlib.closing(prefetch_to_device(loader, prepare, device, depth)) as inputs,
            ):
                for x in progress_bar(
                    progress, inputs, total=len(loader), desc="descriptors", leave=False
                ):
                    desc = model(x)
                    if desc.dim() != 2 or desc.shape[0] != x.shape[0]:
                        raise ValueError(
                            f"model returned shape {tuple(desc.shape)} for {x.shape[0]} images; "
                            "expected descriptors [N, D]"
                        )
                    desc = desc.float()
                    stop = start + desc.shape[0]
                    if stop > n:
                        raise ValueError(
                            f"got more descriptors ({stop}) than dataset items ({n}): items "
                            "must be single images [3,H,W] (or tuples starting with one)"
                        )
                    problem = _descriptor_problem(desc, half)
                    if problem is not None:
                        bad = (
                            paths[start:stop] if paths is not None else f"items {start}..{stop - 1}"
                        )
                        raise ValueError(f"{problem} in the batch of images {bad}")
                    if out is None:
                        out = _allocate(tmp, (n, desc.shape[1]), out_dtype)
                    out[start:stop] = desc.cpu().numpy()
                    start = stop
            if start != n:
                raise RuntimeError(f"extracted {start} descriptors for {n} images")
            if tmp is not None:
                out.flush()
                out = None  # close the memmap before the rename
    finally:
        model.train(was_training)
    if out_path is not None:
        return np.load(out_path, mmap_mode="r")
    return out


def _allocate(tmp: Path | None, shape: tuple[int, int], dtype: type) -> np.ndarray:
    """In-memory array, or a .npy memmap in the temporary file `tmp`."""
    if tmp is None:
        return np.empty(shape, dtype=dtype)
    return np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)


# ---------------------------------------------------------------------------------------------
# Search and recall


def _as_2d(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """A 2-D numpy view of `x` (torch tensors shared, memmaps kept; nothing copied)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asanyarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {x.shape}")
    return x


def _float32_rows(x: np.ndarray) -> np.ndarray:
    """float32 C-contiguous rows: the same memory when they already are, else a converted copy."""
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_finite(x: np.ndarray, name: str, offset: int = 0) -> None:
    """Raise naming the first row with NaN or inf: faiss would silently rank such rows
    anywhere (or return -1). Checked in row chunks, so no full-size temporary is built."""
    for s in range(0, len(x), SEARCH_CHUNK):
        finite = np.isfinite(x[s : s + SEARCH_CHUNK]).all(axis=1)
        if not finite.all():
            row = offset + s + int(np.flatnonzero(~finite)[0])
            raise ValueError(
                f"{name} has NaN or inf values (first in row {row}); descriptors must be finite"
            )


def _flat_index(dim: int, use_gpu: bool | None) -> tuple[faiss.Index, Any]:
    """Exact L2 index, on the GPU when faiss has one (and `use_gpu` is not False).

    Returns (index, resources): keep the GPU resources alive as long as the index.
    """
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu is None:
        use_gpu = gpus > 0
    if use_gpu:
        if gpus == 0 or not hasattr(faiss, "StandardGpuResources"):
            raise RuntimeError("use_gpu=True but this faiss build sees no GPU (install faiss-gpu)")
        resources = faiss.StandardGpuResources()
        return faiss.GpuIndexFlatL2(resources, dim), resources
    return faiss.IndexFlatL2(dim), None


def search(
    db_desc: np.ndarray,
    q_desc: np.ndarray,
    k: int,
    return_distances: bool = False,
    chunk_size: int = SEARCH_CHUNK,
    use_gpu: bool | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Exact L2 nearest neighbours: int64 db indices [Q, k], nearest first.

    With `return_distances`, also the squared L2 distances [Q, k] (float32). The index holds
    one float32 copy of the database (float32 C-contiguous input is not copied before that);
    queries are converted and searched `chunk_size` rows at a time, so float16 or memory-mapped
    queries never need a full float32 copy. Distances that tie to float32 rounding may come out
    in either order.
    """
    db = _as_2d(db_desc, "db_desc")
    q = _as_2d(q_desc, "q_desc")
    if db.shape[1] != q.shape[1]:
        raise ValueError(
            f"descriptor dims differ: database {db.shape[1]}-d vs queries {q.shape[1]}-d"
        )
    if not 1 <= k <= len(db):
        raise ValueError(f"k must be between 1 and the database size {len(db)}, got k={k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_finite(db, "db_desc")
    index, _resources = _flat_index(db.shape[1], use_gpu)
    index.add(_float32_rows(db))
    indices = np.empty((len(q), k), dtype=np.int64)
    distances = np.empty((len(q), k), dtype=np.float32)
    for s in range(0, len(q), chunk_size):
        e = min(s + chunk_size, len(q))
        rows = _float32_rows(q[s:e])
        _check_finite(rows, "q_desc", offset=s)
        index.search(rows, k, D=distances[s:e], I=indices[s:e])
    index.reset()
    return (indices, distances) if return_distances else indices


def correct_matrix(predictions: np.ndarray, ground_truth: Sequence[np.ndarray]) -> np.ndarray:
    """bool [Q, K]: whether predictions[i, j] is one of query i's positives (vectorised)."""
    pred = np.asarray(predictions)
    if pred.ndim != 2:
        raise ValueError(f"predictions must be [Q, K], got shape {pred.shape}")
    if len(ground_truth) != len(pred):
        raise ValueError(
            f"ground_truth has {len(ground_truth)} queries but predictions has {len(pred)}"
        )
    if pred.size and not np.issubdtype(pred.dtype, np.integer):
        raise ValueError(f"predictions must be integer database indices, got dtype {pred.dtype}")
    gts = [np.asarray(g) for g in ground_truth]
    for i, g in enumerate(gts):  # a float NaN would silently cast to a huge integer
        if g.size and not np.issubdtype(g.dtype, np.integer):
            raise ValueError(
                f"ground_truth[{i}] must hold integer database indices, got {g.dtype} "
                f"{g.reshape(-1)[:5].tolist()}"
            )
    lengths = np.array([g.size for g in gts], dtype=np.int64)
    flat = (
        np.concatenate([g.astype(np.int64).reshape(-1) for g in gts])
        if len(gts)
        else np.empty(0, np.int64)
    )
    if len(flat) == 0:
        return np.zeros(pred.shape, dtype=bool)
    if flat.min() < 0:
        bad = next(i for i, g in enumerate(gts) if g.size and g.min() < 0)
        raise ValueError(
            f"ground_truth[{bad}] holds a negative database index "
            f"({int(gts[bad].min())}); indices must be >= 0"
        )
    span = int(max(flat.max(), pred.max(initial=0))) + 1
    gt_keys = np.repeat(np.arange(len(pred), dtype=np.int64), lengths) * span + flat
    pred_keys = np.arange(len(pred), dtype=np.int64)[:, None] * span + pred.astype(np.int64)
    return np.isin(pred_keys, gt_keys) & (pred >= 0)


def recall_at_k(
    predictions: np.ndarray,
    ground_truth: Sequence[np.ndarray],
    ks: Sequence[int] = KS,
    skip_empty: bool = False,
) -> dict[int, float]:
    """{k: share of queries with a positive among their top-k predictions}.

    Queries without any positive count as misses (as in the standard Pitts/Nordland code);
    `skip_empty=True` drops them from the denominator instead (as MSLS's official code does).
    """
    pred = np.asarray(predictions)
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1 or max(ks) > pred.shape[-1]:
        raise ValueError(f"ks must lie in 1..{pred.shape[-1]} (predictions per query), got {ks}")
    correct = correct_matrix(pred, ground_truth)
    return _recalls(correct, ground_truth, ks, skip_empty)


def _recalls(
    correct: np.ndarray, ground_truth: Sequence[np.ndarray], ks: Sequence[int], skip_empty: bool
) -> dict[int, float]:
    keep = np.ones(len(correct), dtype=bool)
    if skip_empty:
        keep = np.array([len(g) > 0 for g in ground_truth], dtype=bool)
    if keep.sum() == 0:
        raise ValueError("no queries to score (none given, or none has a positive with skip_empty)")
    hits = np.logical_or.accumulate(correct[keep], axis=1)
    return {int(k): float(hits[:, k - 1].mean()) for k in ks}


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class EvalResults:
    """Recall@K and per-query retrievals on one benchmark."""

    benchmark: str
    recalls: dict[int, float]
    predictions: np.ndarray  # int64 [Q, kmax] db indices, nearest first
    distances: np.ndarray  # float32 [Q, kmax] squared L2 descriptor distances
    correct: np.ndarray  # bool [Q, kmax]
    ground_truth: list[np.ndarray]
    db_paths: list[str]
    query_paths: list[str]
    variant: str = ""
    db_utm: np.ndarray | None = None
    query_utm: np.ndarray | None = None
    skip_empty: bool = False
    precision: str = ""  # of the descriptors, when `evaluate` made them ("" = not known)
    images: str = ""  # how `evaluate` fed the images, e.g. "320x320 bilinear" ("" = not known)

    @property
    def num_without_positives(self) -> int:
        return int(sum(len(g) == 0 for g in self.ground_truth))

    def table(self) -> pd.DataFrame:
        """One row: benchmark, #db, #queries, R@K in percent (1 decimal), and the protocol
        (the benchmark's variant, the image size and resizing, whether queries without
        positives were dropped, reduced-precision descriptors), so rows scored differently
        never look alike."""
        row: dict[str, Any] = {
            "benchmark": self.benchmark,
            "#db": len(self.db_paths),
            "#queries": len(self.query_paths),
        }
        row.update({f"R@{k}": round(100 * v, 1) for k, v in sorted(self.recalls.items())})
        empty = self.num_without_positives
        dropped = (
            f"; {empty} queries without positives dropped" if self.skip_empty and empty else ""
        )
        reduced = f"; {self.precision} descriptors" if self.precision not in ("", "fp32") else ""
        images = f"; {self.images} images" if self.images else ""
        row["protocol"] = f"{self.variant}{images}{dropped}{reduced}"
        return pd.DataFrame([row])

    def summary(self) -> str:
        """One line: recalls, set sizes, queries without positives and how they count."""
        recalls = "  ".join(f"R@{k} {100 * v:.1f}" for k, v in sorted(self.recalls.items()))
        empty = self.num_without_positives
        policy = "dropped" if self.skip_empty else "counted as misses"
        text = (
            f"{self.benchmark}: {recalls}  ({len(self.db_paths)} db, {len(self.query_paths)} "
            f"queries, {empty} without positives {policy})"
        )
        return text + (f" [{self.variant}]" if self.variant else "")

    def __repr__(self) -> str:
        return f"EvalResults({self.summary()})"

    def failures(self, k: int = 1) -> pd.DataFrame:
        """Queries with no positive in their top-k: paths, top-1 retrieval, its distances.

        `top1_metres` is the ground distance between the query and its top-1 database image
        (NaN without UTM coordinates); `first_correct_rank` is 1-based (NaN if none in top-kmax).
        """
        if not 1 <= k <= self.predictions.shape[1]:
            raise ValueError(f"k must be in 1..{self.predictions.shape[1]}, got {k}")
        rows = np.nonzero(~self.correct[:, :k].any(1))[0]
        top1 = self.predictions[rows, 0]
        metres = np.full(len(rows), np.nan)
        if self.db_utm is not None and self.query_utm is not None:
            metres = np.linalg.norm(self.query_utm[rows] - self.db_utm[top1], axis=1)
        any_hit = self.correct[rows].any(1)
        first = np.where(any_hit, self.correct[rows].argmax(1) + 1.0, np.nan)
        return pd.DataFrame(
            {
                "query": rows,
                "query_path": [self.query_paths[i] for i in rows],
                "top1": top1,
                "top1_path": [self.db_paths[j] for j in top1],
                "top1_distance": self.distances[rows, 0],
                "top1_metres": metres,
                "num_positives": [len(self.ground_truth[i]) for i in rows],
                "first_correct_rank": first,
                "positive_path": [self._a_positive(i) for i in rows],
            }
        )

    def _a_positive(self, i: int) -> str:
        """A true match for query i (the nearest in metres when UTM is known), or ''."""
        gt = self.ground_truth[i]
        if len(gt) == 0:
            return ""
        j = gt[0]
        if self.db_utm is not None and self.query_utm is not None:
            j = gt[np.argmin(np.linalg.norm(self.db_utm[gt] - self.query_utm[i], axis=1))]
        return self.db_paths[int(j)]

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz (atomically) that `EvalResults.load` reads back without pickle."""
        lengths = np.array([len(g) for g in self.ground_truth], dtype=np.int64)
        arrays = {
            "benchmark": np.array(self.benchmark),
            "variant": np.array(self.variant),
            "skip_empty": np.array(self.skip_empty),
            "precision": np.array(self.precision),
            "images": np.array(self.images),
            "ks": np.array(sorted(self.recalls), dtype=np.int64),
            "recall_values": np.array([self.recalls[k] for k in sorted(self.recalls)]),
            "predictions": self.predictions,
            "distances": self.distances,
            "correct": self.correct,
            "gt_flat": np.concatenate([np.asarray(g, np.int64) for g in self.ground_truth])
            if self.ground_truth
            else np.empty(0, np.int64),
            "gt_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "db_paths": np.array(self.db_paths, dtype=str),
            "query_paths": np.array(self.query_paths, dtype=str),
        }
        if self.db_utm is not None and self.query_utm is not None:
            arrays["db_utm"] = self.db_utm
            arrays["query_utm"] = self.query_utm
        with atomic_open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalResults:
        """Read a file written by `save` (no pickle)."""
        with np.load(path, allow_pickle=False) as z:
            offsets = z["gt_offsets"]
            flat = z["gt_flat"]
            return cls(
                benchmark=str(z["benchmark"]),
                recalls={
                    int(k): float(v) for k, v in zip(z["ks"], z["recall_values"], strict=True)
                },
                predictions=z["predictions"],
                distances=z["distances"],
                correct=z["correct"],
                ground_truth=[flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)],
                db_paths=z["db_paths"].tolist(),
                query_paths=z["query_paths"].tolist(),
                variant=str(z["variant"]),
                db_utm=z["db_utm"] if "db_utm" in z else None,
                query_utm=z["query_utm"] if "query_utm" in z else None,
                skip_empty=bool(z["skip_empty"]),
                precision=str(z["precision"]) if "precision" in z else "",
                images=str(z["images"]) if "images" in z else "",
            )


def evaluate_descriptors(
    db_desc: np.ndarray,
    q_desc: np.ndarray,
    benchmark: Benchmark,
    ks: Sequence[int] = KS,
    skip_empty: bool = False,
) -> EvalResults:
    """Score precomputed descriptors on `benchmark` (search + recall@K + per-query results)."""
    ks = sorted(int(k) for k in ks)
    if len(db_desc) != benchmark.num_db or len(q_desc) != benchmark.num_queries:
        raise ValueError(
            f"descriptors ({len(db_desc)} db, {len(q_desc)} queries) do not match benchmark "
            f"{benchmark.name!r} ({benchmark.num_db} db, {benchmark.num_queries} queries)"
        )
    if not ks or ks[0] < 1 or ks[-1] > benchmark.num_db:
        raise ValueError(f"ks must lie in 1..{benchmark.num_db} (database size), got {ks}")
    predictions, distances = search(db_desc, q_desc, ks[-1], return_distances=True)
    correct = correct_matrix(predictions, benchmark.ground_truth)
    return EvalResults(
        benchmark=benchmark.name,
        recalls=_recalls(correct, benchmark.ground_truth, ks, skip_empty),
        predictions=predictions,
        distances=distances,
        correct=correct,
        ground_truth=list(benchmark.ground_truth),
        db_paths=list(benchmark.db_paths),
        query_paths=list(benchmark.query_paths),
        variant=benchmark.variant,
        db_utm=benchmark.db_utm,
        query_utm=benchmark.query_utm,
        skip_empty=skip_empty,
    )


def evaluate(
    model: torch.nn.Module,
    benchmark: Benchmark | str | os.PathLike,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    ks: Sequence[int] = KS,
    progress: bool = True,
    image_size: int | Sequence[int] | None = None,
    interpolation: str | None = None,
    root: str | os.PathLike | None = None,
    skip_empty: bool = False,
    gpu_decode: bool | None = None,
    precision: str = "fp32",
) -> EvalResults:
    """Extract database and query descriptors with `model` and score them on `benchmark`.

    `benchmark` is a Benchmark or anything `load_benchmark` accepts (with `root`). Queries
    without positives count as misses unless `skip_empty`; the summary says how many there are.
    `gpu_decode` and `precision` as in `extract_descriptors` (None: nvJPEG on CUDA for JPEG
    benchmarks; "fp32" by default, the table's protocol column names any other).
    """
    if not isinstance(benchmark, Benchmark):
        benchmark = load_benchmark(benchmark, root=root)
    device = _resolve_device(model, device)
    precision = resolve_eval_precision(precision, device)  # once, for both sets and the table
    pre = preprocess_config(model, image_size, interpolation)  # what extraction will use
    kw = dict(
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        image_size=image_size,
        interpolation=interpolation,
        progress=progress,
        gpu_decode=gpu_decode,
        precision=precision,
    )
    db_desc = extract_descriptors(model, benchmark.db_paths, **kw)
    q_desc = extract_descriptors(model, benchmark.query_paths, **kw)
    results = evaluate_descriptors(db_desc, q_desc, benchmark, ks=ks, skip_empty=skip_empty)
    results.precision = precision
    results.images = f"{pre['image_size'][0]}x{pre['image_size'][1]} {pre['interpolation']}"
    return results
