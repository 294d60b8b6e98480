"""Evaluation sets in both common on-disk formats, with their ground truth.

A benchmark is a database of geo-tagged images and a set of queries; a query's positives are
the database images taken within `threshold_m` metres of it (or, for list-format sets, the
indices stored in `<name>_gt.npy`). Two layouts are read:

- folder format (gmberton's VPR-datasets-downloader): `<set>/database/*.jpg` and
  `<set>/queries/*.jpg` named `@utm_east@utm_north@zone@letter@lat@lon@panoid@...@.jpg`;
  positives come from an exact radius search on the UTM coordinates.
- list format: `<name>_dbImages.npy`, `<name>_qImages.npy` (image paths relative to an image
  root) and `<name>_gt.npy` (per query, the positive database indices); for MSLS the official
  740-query protocol is `msls_val_qIdx.npy` + `msls_val_pIdx.npy`.

Standard sets are found by name under a benchmarks root: the `root` argument, else the
environment variable `VPR_BENCHMARKS_ROOT`, else `$VPRLIB_DATA/benchmarks` (read at call time).
"""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# The standard positive radius; list-format ground truth files are computed with it.
STANDARD_THRESHOLD_M = 25.0
DOWNLOADER_URL = "https://github.com/gmberton/VPR-datasets-downloader"
MSLS_URL = "https://www.mapillary.com/dataset/places"
VPR_BENCH_URL = "https://github.com/MubarizZaffar/VPR-Bench"

# Published sizes (database images, queries) of the standard sets, used only to warn when a
# local copy differs. Pitts250k-test is ~83,950 in the literature (83,952 in the common split).
EXPECTED_SIZES: dict[str, tuple[int, int]] = {
    "pitts30k_val": (10_000, 7_608),
    "pitts30k_test": (10_000, 6_816),
    "pitts250k_test": (83_952, 8_280),
    "msls_val": (18_871, 740),
    "nordland": (27_592, 2_760),
    "sped": (607, 607),
    "tokyo247": (75_984, 315),
}

# Where each named set may live under the benchmarks root, in the folder format.
FOLDER_LAYOUTS: dict[str, tuple[str, ...]] = {
    "pitts30k_val": ("pitts30k/images/val",),
    "pitts30k_test": ("pitts30k/images/test",),
    "pitts250k_test": ("pitts250k/images/test",),
    "msls_val": ("msls/images/val", "msls/val"),
    "nordland": ("nordland/images/test",),
    "sped": ("sped/images/test",),
    "tokyo247": ("tokyo247/images/test",),
    "gsv_sample": ("gsv_sample",),
}

# Where the images of a named list-format set live under the benchmarks root: the folders the
# GSV-Cities / MixVPR evaluation code keeps them in (their stored paths, e.g. Nordland's and
# SPED's `ref/...`, are relative to these, so the sets cannot share one folder). The root
# itself is tried last.
LIST_IMAGE_FOLDERS: dict[str, tuple[str, ...]] = {
    "pitts30k_val": ("Pittsburgh",),
    "pitts30k_test": ("Pittsburgh",),
    "pitts250k_test": ("Pittsburgh",),
    "msls_val": ("msls_val",),
    "nordland": ("Nordland",),
    "sped": ("SPEDTEST",),
    "tokyo247": ("Tokyo247",),
}

HOW_TO_GET: dict[str, str] = {
    "pitts30k_val": f"Pittsburgh images are given by their authors on request; format them with {DOWNLOADER_URL}",
    "pitts30k_test": f"Pittsburgh images are given by their authors on request; format them with {DOWNLOADER_URL}",
    "pitts250k_test": f"Pittsburgh images are given by their authors on request; format them with {DOWNLOADER_URL}",
    "msls_val": f"download MSLS from {MSLS_URL} (login needed) and format it with {DOWNLOADER_URL}, "
    "or use the msls_val_*.npy lists with qIdx/pIdx for the official 740 queries",
    "nordland": f"VPR-Bench's Nordland split (ref/query folders + Nordland_*.npy lists): {VPR_BENCH_URL}; "
    f"the +-10 frames folder variant comes from {DOWNLOADER_URL} (download_nordland.py)",
    "sped": f"VPR-Bench's SPEDTEST (ref/query): {VPR_BENCH_URL}, or download_sped.py of {DOWNLOADER_URL}",
    "tokyo247": f"Tokyo 24/7 images are given by their authors on request; format them with {DOWNLOADER_URL}",
    "gsv_sample": "the committed sample: run `make sample-data` (data/make_sample.py)",
}


@dataclass
class Benchmark:
    """A database + queries with per-query positives (indices into `db_paths`)."""

    name: str
    db_paths: list[str] = field(repr=False)
    query_paths: list[str] = field(repr=False)
    ground_truth: list[np.ndarray] = field(repr=False)
    db_latlon: np.ndarray | None = field(default=None, repr=False)
    query_latlon: np.ndarray | None = field(default=None, repr=False)
    db_utm: np.ndarray | None = field(default=None, repr=False)
    query_utm: np.ndarray | None = field(default=None, repr=False)
    variant: str = ""
    root: str = ""
    threshold_m: float = STANDARD_THRESHOLD_M
    fmt: str = ""

    @property
    def num_db(self) -> int:
        return len(self.db_paths)

    @property
    def num_queries(self) -> int:
        return len(self.query_paths)

    @property
    def num_without_positives(self) -> int:
        """Queries whose ground truth is empty (counted as misses by `recall_at_k` by default)."""
        return int(sum(len(g) == 0 for g in self.ground_truth))

    def __repr__(self) -> str:
        return (
            f"Benchmark({self.name!r}, {self.num_db} db, {self.num_queries} queries, "
            f"fmt={self.fmt!r}, variant={self.variant!r})"
        )


# ---------------------------------------------------------------------------------------------
# Entry point


def load_benchmark(
    path_or_name: str | os.PathLike,
    root: str | os.PathLike | None = None,
    threshold_m: float = STANDARD_THRESHOLD_M,
) -> Benchmark:
    """Load a benchmark from a folder, a `<name>_dbImages.npy` file or a standard set's name.

    - an existing folder with `database/` and `queries/`: folder format (positives within
      `threshold_m` metres);
    - a `..._dbImages.npy` path, or `<folder>/<name>` where `<folder>/<name>_dbImages.npy`
      exists: list format; `root` is the folder the stored image paths are relative to
      (default: the parent of the npy folder);
    - otherwise a name (e.g. "pitts30k_test", "msls_val", "gsv_sample") looked up under the
      benchmarks root (`root`, else `$VPR_BENCHMARKS_ROOT`, else `$VPRLIB_DATA/benchmarks`):
      lists in `datasets_npy/` with their images in the set's folder of the reference code
      (`Pittsburgh/`, `msls_val/`, `Nordland/`, `SPEDTEST/`; `LIST_IMAGE_FOLDERS`) or in the
      root itself, else the folder layouts of `FOLDER_LAYOUTS`.
    Every image a list names must exist (checked at load time, one folder listing each).
    """
    if threshold_m <= 0:
        raise ValueError(f"threshold_m must be > 0 metres, got {threshold_m}")
    p = Path(path_or_name).expanduser()
    looks_like_path = p.is_absolute() or len(p.parts) > 1 or p.suffix == ".npy"
    if p.is_dir() and (p / "database").is_dir() and (p / "queries").is_dir():
        return load_folder_benchmark(p, threshold_m=threshold_m)
    if p.suffix == ".npy":
        if not p.is_file():
            raise FileNotFoundError(f"benchmark list file not found: {p}")
        return _with_threshold(load_list_benchmark(p, root=root), threshold_m)
    if p.parent.is_dir() and (db_file := _find_npy(p.parent, p.name, "dbImages")) is not None:
        return _with_threshold(load_list_benchmark(db_file, root=root), threshold_m)
    if looks_like_path and p.is_dir():
        below = [
            str(d.parent)
            for pattern in ("*/database", "*/*/database")
            for d in sorted(p.glob(pattern))
            if (d.parent / "queries").is_dir()
        ]
        hint = f"; benchmark folders below it: {below[:5]}" if below else ""
        raise FileNotFoundError(
            f"{p} is a folder but holds neither database/ + queries/ (folder format) nor "
            f"<name>_dbImages.npy (list format){hint}"
        )
    if looks_like_path:
        raise FileNotFoundError(
            f"benchmark path not found: {p} (expected a folder holding database/ + queries/, "
            "a <name>_dbImages.npy file, or <folder>/<name> beside <folder>/<name>_dbImages.npy; "
            "a standard set is named without a folder, e.g. 'pitts30k_test')"
        )
    # A bare name ("sped") is a standard set under the benchmarks root, even when the working
    # directory happens to hold a folder of that name.
    return _load_named(str(path_or_name), root, threshold_m)


def _with_threshold(bench: Benchmark, threshold_m: float) -> Benchmark:
    """Honour a non-default `threshold_m` for a list-format set: its stored ground truth is for
    the standard 25 m, so recompute from the UTM in the image names, or refuse when there is none."""
    if threshold_m == STANDARD_THRESHOLD_M:
        return bench
    if bench.db_utm is None or bench.query_utm is None:
        raise ValueError(
            f"threshold_m={threshold_m:g} cannot apply to benchmark {bench.name!r}: its positives "
            f"come from the list files ({bench.variant}) and its image names carry no UTM "
            "coordinates to recompute them; leave threshold_m at 25"
        )
    bench.ground_truth = radius_ground_truth(bench.db_utm, bench.query_utm, threshold_m)
    bench.threshold_m = float(threshold_m)
    bench.variant = f"list format, positives recomputed within {threshold_m:g} m (UTM)"
    return bench


def benchmarks_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the standard sets: `root`, `$VPR_BENCHMARKS_ROOT`, `$VPRLIB_DATA/benchmarks`."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("VPR_BENCHMARKS_ROOT"):
        return Path(os.environ["VPR_BENCHMARKS_ROOT"]).expanduser()
    if os.environ.get("VPRLIB_DATA"):
        return Path(os.environ["VPRLIB_DATA"]).expanduser() / "benchmarks"
    raise FileNotFoundError(
        "no benchmarks root: pass root=..., or set VPR_BENCHMARKS_ROOT (the folder holding "
        "datasets_npy/ and the dataset folders) or VPRLIB_DATA (whose benchmarks/ is used)"
    )


def _load_named(name: str, root: str | os.PathLike | None, threshold_m: float) -> Benchmark:
    """Find a named set under the benchmarks root, list format first, then folder layouts."""
    base = benchmarks_root(root).resolve()
    key = name.lower()
    looked = []
    for folder in (base / "datasets_npy", base / "datasets_npy" / name, base):
        db_file = _find_npy(folder, name, "dbImages")
        looked.append(str(folder / f"{name}_dbImages.npy"))
        if db_file is not None:
            folders = (_find_entry(base, f, is_dir=True) for f in LIST_IMAGE_FOLDERS.get(key, ()))
            image_roots = [f for f in folders if f is not None] + [base]
            bench = _read_list_benchmark(db_file, image_roots, key)
            return _with_threshold(bench, threshold_m)
    for rel in FOLDER_LAYOUTS.get(key, (name,)):
        folder = base / rel
        looked.append(f"{folder}/{{database,queries}}/")
        if (folder / "database").is_dir() and (folder / "queries").is_dir():
            bench = load_folder_benchmark(folder, threshold_m=threshold_m)
            bench.name = key
            return bench
    how = HOW_TO_GET.get(key, f"see {DOWNLOADER_URL}")
    known = ", ".join(FOLDER_LAYOUTS)
    raise FileNotFoundError(
        f"benchmark {name!r} not found under {base}. Looked for:\n  "
        + "\n  ".join(looked)
        + f"\n(plus {name}_qImages.npy and {name}_gt.npy beside the dbImages file).\n"
        f"How to obtain it: {how}.\n"
        f"Protocol: {_named_variant_hint(key)}\n"
        f"Known names: {known}; or pass a folder / *_dbImages.npy path."
    )


def _named_variant_hint(key: str) -> str:
    hints = {
        "msls_val": "MSLS-val official = 740 queries (msls_val_qIdx.npy/pIdx.npy) vs 18,871 db; "
        "the ~11k-query variant (all val queries) scores lower: results are labelled with it",
        "nordland": "Nordland VPR-Bench split = 27,592 refs / 2,760 queries, positive = same "
        "frame +-1 (Nordland_gt.npy); the downloader's folder variant uses +-10 frames",
        "sped": "SPED is one-to-one: 607 db / 607 queries",
    }
    return hints.get(key, "positives = database images within the distance threshold (25 m)")


def _find_entry(folder: Path, name: str, is_dir: bool = False) -> Path | None:
    """`folder/name` (a file, or a folder if `is_dir`) matched case-insensitively
    (Nordland_gt.npy for nordland_gt.npy, pittsburgh/ for Pittsburgh/), or None."""
    kind = Path.is_dir if is_dir else Path.is_file
    if kind(folder / name):
        return folder / name
    if not folder.is_dir():
        return None
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.lower() == name.lower() and kind(Path(entry.path)):
                return Path(entry.path)
    return None


def _find_npy(folder: Path, name: str, kind: str) -> Path | None:
    """`<folder>/<name>_<kind>.npy`, matching the name case-insensitively."""
    return _find_entry(folder, f"{name}_{kind}.npy")


# ---------------------------------------------------------------------------------------------
# Folder format


def parse_utm_filename(name: str) -> tuple[float, float, float, float]:
    """`@east@north@zone@letter@lat@lon@...@.jpg` -> (east, north, lat, lon); NaN lat/lon if empty."""
    parts = os.path.basename(name).split("@")
    if len(parts) < 4 or parts[0] != "":
        raise ValueError(
            f"image name {name!r} is not in the @utm_east@utm_north@zone@letter@lat@lon@...@.jpg format"
        )
    try:
        east, north = float(parts[1]), float(parts[2])
    except ValueError:
        raise ValueError(
            f"image name {name!r}: UTM east/north {parts[1:3]} are not numbers"
        ) from None
    lat = lon = float("nan")
    if len(parts) > 6 and parts[5].strip() and parts[6].strip():
        try:
            lat, lon = float(parts[5]), float(parts[6])
        except ValueError:
            raise ValueError(f"image name {name!r}: lat/lon {parts[5:7]} are not numbers") from None
    return east, north, lat, lon


def list_images(folder: Path) -> list[str]:
    """Image files directly inside `folder`, sorted by name (absolute path strings)."""
    names = sorted(
        e.name
        for e in os.scandir(folder)
        if e.name.lower().endswith(IMAGE_SUFFIXES) and not e.name.startswith(".")
    )
    return [str(folder / n) for n in names]


def _coords(paths: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """UTM [N,2] and lat/lon [N,2] (None when any lat/lon is missing) from folder-format names."""
    rows = np.array([parse_utm_filename(p) for p in paths], dtype=np.float64).reshape(-1, 4)
    latlon = rows[:, 2:]
    return rows[:, :2].copy(), (None if np.isnan(latlon).any() else latlon.copy())


def load_folder_benchmark(
    folder: str | os.PathLike, threshold_m: float = STANDARD_THRESHOLD_M
) -> Benchmark:
    """Read `<folder>/database` and `<folder>/queries`; positives within `threshold_m` metres."""
    folder = Path(folder).expanduser().resolve()
    for sub in ("database", "queries"):
        if not (folder / sub).is_dir():
            raise FileNotFoundError(f"folder-format benchmark needs {folder / sub}/")
    db_paths, q_paths = list_images(folder / "database"), list_images(folder / "queries")
    if not db_paths or not q_paths:
        raise FileNotFoundError(
            f"no images in {folder / 'database'} ({len(db_paths)}) or "
            f"{folder / 'queries'} ({len(q_paths)})"
        )
    db_utm, db_latlon = _coords(db_paths)
    q_utm, q_latlon = _coords(q_paths)
    gt = radius_ground_truth(db_utm, q_utm, threshold_m)
    name = _folder_name(folder)
    variant = f"folder format, positives within {threshold_m:g} m (UTM)"
    if name == "nordland":
        variant += " (downloader's Nordland: +-10 frames, not the VPR-Bench +-1 split)"
    if name == "msls_val" and len(q_paths) != EXPECTED_SIZES["msls_val"][1]:
        variant = (
            f"MSLS-val all {len(q_paths)} queries (folder format, positives within "
            f"{threshold_m:g} m): NOT the official 740-query protocol, scores are lower"
        )
    bench = Benchmark(
        name=name,
        db_paths=db_paths,
        query_paths=q_paths,
        ground_truth=gt,
        db_latlon=db_latlon,
        query_latlon=q_latlon,
        db_utm=db_utm,
        query_utm=q_utm,
        variant=variant,
        root=str(folder),
        threshold_m=float(threshold_m),
        fmt="folder",
    )
    _warn_sizes(bench)
    return bench


def _folder_name(folder: Path) -> str:
    """The standard name when `folder` matches a known layout (`pitts30k/images/test` ->
    "pitts30k_test"), else the folder's own name."""
    posix = folder.as_posix()
    for key, layouts in FOLDER_LAYOUTS.items():
        if any(posix.endswith("/" + rel) for rel in layouts):
            return key
    return folder.name


def radius_ground_truth(db_xy: np.ndarray, q_xy: np.ndarray, radius: float) -> list[np.ndarray]:
    """Per query, the sorted indices of database points within `radius` (<=, exact, float64).

    A uniform grid with cells slightly larger than `radius` means every pair within `radius`
    lies in the same or an adjacent cell; candidates from the 3x3 neighbouring cells are found
    with a sort + searchsorted (no Python loop over points) and filtered by exact distance.
    Memory is proportional to the number of candidate pairs.
    """
    db = np.asarray(db_xy, dtype=np.float64)
    q = np.asarray(q_xy, dtype=np.float64)
    if db.ndim != 2 or db.shape[1] != 2 or q.ndim != 2 or q.shape[1] != 2:
        raise ValueError(f"expected [N,2] coordinates, got db {db.shape} and queries {q.shape}")
    if not (np.isfinite(db).all() and np.isfinite(q).all()):
        raise ValueError("coordinates contain NaN or inf")
    nq = len(q)
    if len(db) == 0 or nq == 0:
        return [np.empty(0, np.int64) for _ in range(nq)]
    cell = radius * (1 + 1e-9)
    origin = np.minimum(db.min(0), q.min(0))
    cdb = np.floor((db - origin) / cell).astype(np.int64) + 1  # +1: neighbour -1 stays >= 0
    cq = np.floor((q - origin) / cell).astype(np.int64) + 1
    ncols = int(max(cdb[:, 0].max(), cq[:, 0].max())) + 2
    db_key = cdb[:, 0] + cdb[:, 1] * ncols
    order = np.argsort(db_key, kind="stable")
    sorted_key = db_key[order]
    qi_parts, di_parts = [], []
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            key = (cq[:, 0] + dx) + (cq[:, 1] + dy) * ncols
            lo = np.searchsorted(sorted_key, key, side="left")
            hi = np.searchsorted(sorted_key, key, side="right")
            counts = hi - lo
            total = int(counts.sum())
            if total == 0:
                continue
            qi = np.repeat(np.arange(nq, dtype=np.int64), counts)
            within = np.arange(total, dtype=np.int64) - np.repeat(
                np.cumsum(counts) - counts, counts
            )
            qi_parts.append(qi)
            di_parts.append(order[np.repeat(lo, counts) + within])
    if not qi_parts:
        return [np.empty(0, np.int64) for _ in range(nq)]
    qi = np.concatenate(qi_parts)
    di = np.concatenate(di_parts)
    d2 = ((db[di] - q[qi]) ** 2).sum(1)
    keep = d2 <= radius * radius
    qi, di = qi[keep], di[keep]
    srt = np.lexsort((di, qi))
    qi, di = qi[srt], di[srt]
    bounds = np.searchsorted(qi, np.arange(nq + 1))
    return [di[bounds[i] : bounds[i + 1]].astype(np.int64) for i in range(nq)]


# ---------------------------------------------------------------------------------------------
# List format


def load_list_benchmark(
    db_file: str | os.PathLike, root: str | os.PathLike | None = None, name: str | None = None
) -> Benchmark:
    """Read `<name>_dbImages.npy`, `<name>_qImages.npy` and `<name>_gt.npy` (or MSLS qIdx/pIdx).

    `root` is the folder the stored image paths are relative to (default: the parent of the
    folder holding the npy files). The npy files are object arrays by convention (pickled);
    `load_npy` unpickles only numpy arrays, numbers and strings, so a hostile file cannot run
    code.
    """
    db_file = Path(db_file).expanduser().resolve()
    image_root = Path(root).expanduser().resolve() if root is not None else db_file.parent.parent
    return _read_list_benchmark(db_file, [image_root], name)


def _read_list_benchmark(db_file: Path, image_roots: list[Path], name: str | None) -> Benchmark:
    """`load_list_benchmark` with candidate image roots: the first that holds the first
    database image is used; every listed image must exist under it."""
    suffix = "_dbImages.npy"
    if not db_file.name.lower().endswith(suffix.lower()):
        raise ValueError(f"list-format benchmark path must end with {suffix}, got {db_file.name}")
    stem = db_file.name[: -len(suffix)]
    folder = db_file.parent
    name = name or stem.lower()
    q_file = _find_npy(folder, stem, "qImages")
    gt_file = _find_npy(folder, stem, "gt")
    qidx_file = _find_npy(folder, stem, "qIdx")
    pidx_file = _find_npy(folder, stem, "pIdx")
    missing = [f"{stem}_qImages.npy"] if q_file is None else []
    if gt_file is None and pidx_file is None:
        missing.append(f"{stem}_gt.npy (or {stem}_pIdx.npy)")
    if pidx_file is not None and qidx_file is None and gt_file is None:
        missing.append(
            f"{stem}_qIdx.npy (beside {pidx_file.name}: the official protocol needs both)"
        )
    if missing:
        raise FileNotFoundError(
            f"list-format benchmark {name!r}: missing {', '.join(missing)} in {folder}. "
            f"How to obtain it: {HOW_TO_GET.get(name, DOWNLOADER_URL)}"
        )
    db_rel = _load_paths(db_file)
    q_rel = _load_paths(q_file)
    if qidx_file is not None:
        gt, q_rel, variant = _msls_official(qidx_file, pidx_file, gt_file, q_rel, len(db_rel))
    else:
        gt = _load_gt(gt_file, len(db_rel))
        variant = f"list format, ground truth from {gt_file.name}"
        if name.startswith("msls"):
            variant = (
                f"MSLS all {len(q_rel)} queries (no {stem}_qIdx.npy): NOT the official 740-query "
                "protocol, scores are lower"
            )
        elif name == "nordland":
            variant = f"Nordland list format ({gt_file.name}; VPR-Bench split: same frame +-1)"
        if len(gt) != len(q_rel):
            raise ValueError(
                f"benchmark {name!r}: {gt_file} has {len(gt)} entries but {q_file} has "
                f"{len(q_rel)} queries; they must match one to one"
            )
    image_root = next((r for r in image_roots if db_rel and (r / db_rel[0]).exists()), None)
    if image_root is None:
        tried = ", ".join(str(r) for r in image_roots)
        raise FileNotFoundError(
            f"first database image {db_rel[:1]} (from {db_file}) is under none of: {tried}; "
            "the image root must be the folder the stored paths are relative to (`root`)"
        )
    db_paths = [str(image_root / p) for p in db_rel]
    q_paths = [str(image_root / p) for p in q_rel]
    for kind, paths, src in (("database", db_paths, db_file), ("query", q_paths, q_file)):
        missing = missing_files(paths)
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the {len(paths)} {kind} images listed in {src} are missing "
                f"under {image_root}, e.g. {missing[:3]}"
            )
    db_utm, db_latlon = _maybe_coords(db_paths)
    q_utm, q_latlon = _maybe_coords(q_paths)
    bench = Benchmark(
        name=name,
        db_paths=db_paths,
        query_paths=q_paths,
        ground_truth=gt,
        db_latlon=db_latlon,
        query_latlon=q_latlon,
        db_utm=db_utm,
        query_utm=q_utm,
        variant=variant,
        root=str(image_root),
        threshold_m=float("nan"),
        fmt="list",
    )
    _warn_sizes(bench)
    return bench


# What an object-array .npy of arrays, numbers and strings needs to unpickle (numpy 1 and 2;
# _codecs.encode rebuilds bytes in the protocol-2 pickles of older numpy).
_NPY_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("builtins", "bytes"),  # the data of an empty array in a protocol-2 pickle
    ("__builtin__", "bytes"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, numbers and strings; refuses any other global (e.g. os.system)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused to unpickle {module}.{name}: benchmark lists may hold only numpy "
            "arrays, numbers and strings"
        )


def load_npy(file: str | os.PathLike) -> np.ndarray:
    """`np.load` for benchmark lists without the risk of allow_pickle=True: object arrays
    (the usual format of _gt.npy and path lists) are unpickled with `_ArrayUnpickler`."""
    with open(file, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            _, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            _, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{file}: unsupported .npy format version {version}")
        if not dtype.hasobject:
            return np.load(file, allow_pickle=False)
        try:
            arr = _ArrayUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{file}: {e}") from e
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{file}: expected a numpy array, found {type(arr).__name__}")
    return arr


def _load_paths(file: Path) -> list[str]:
    arr = load_npy(file)
    if arr.ndim != 1:
        raise ValueError(f"{file}: expected a 1-D array of image paths, got shape {arr.shape}")
    return [(p.decode() if isinstance(p, bytes) else str(p)).lstrip("/") for p in arr.tolist()]


GT_LAYOUT = "per query, the integer indices of its positive database images (object array)"


def _load_gt(file: Path, num_db: int) -> list[np.ndarray]:
    """Per-query positive indices as int64 arrays, sorted, checked against the database size.
    A dense [Q, N_db] mask, non-integer entries or a pickled object are refused (read as
    indices they would give made-up positives)."""
    arr = load_npy(file)
    if arr.ndim == 2:  # lists of equal length saved as objects: a 2-D int array
        arr = _ints_if_indices(arr)
    if arr.ndim == 0:
        raise ValueError(
            f"{file}: expected {GT_LAYOUT}; found a single {type(arr.item()).__name__}"
        )
    mask_like = arr.ndim == 2 and arr.shape[1] == num_db and num_db > 2 and arr.dtype != object
    if arr.dtype == bool or (mask_like and np.isin(arr, (0, 1)).all()):
        raise ValueError(
            f"{file}: looks like a dense [queries, database] mask of shape {arr.shape}; expected "
            f"{GT_LAYOUT}. Convert it with [np.flatnonzero(row) for row in mask]"
        )
    gt = []
    for i, entry in enumerate(arr):
        try:
            g = _ints_if_indices(np.asarray(entry))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{file}: query {i}: expected {GT_LAYOUT}; {e}") from e
        if g.size and g.dtype.kind not in "iu":
            raise ValueError(
                f"{file}: query {i} has positives of type {g.dtype} ({g.reshape(-1)[:3]}); "
                f"expected {GT_LAYOUT}"
            )
        gt.append(np.unique(g.astype(np.int64).reshape(-1)))
    for i, g in enumerate(gt):
        if len(g) and (g[0] < 0 or g[-1] >= num_db):
            raise ValueError(
                f"{file}: query {i} has positive index {g[0] if g[0] < 0 else g[-1]} outside "
                f"the database of {num_db} images"
            )
    return gt


def _ints_if_indices(arr: np.ndarray) -> np.ndarray:
    """An object array of integers (how np.save keeps lists) as int64; anything else as is."""
    if arr.dtype != object or not all(_is_index(v) for v in arr.reshape(-1)):
        return arr
    return arr.astype(np.int64)


def _is_index(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _msls_official(
    qidx_file: Path, pidx_file: Path | None, gt_file: Path | None, q_rel: list[str], num_db: int
) -> tuple[list[np.ndarray], list[str], str]:
    """Official MSLS-val: keep the queries listed in qIdx; positives from pIdx."""
    qidx = load_npy(qidx_file).astype(np.int64).reshape(-1)
    if len(qidx) and (qidx.min() < 0 or qidx.max() >= len(q_rel)):
        raise ValueError(f"{qidx_file}: query index out of range for {len(q_rel)} queries")
    src = pidx_file if pidx_file is not None else gt_file
    gt_all = _load_gt(src, num_db)
    if len(gt_all) == len(qidx):
        gt = gt_all
    elif len(gt_all) == len(q_rel):
        gt = [gt_all[i] for i in qidx]
    else:
        raise ValueError(
            f"{src} has {len(gt_all)} entries; expected {len(qidx)} (one per {qidx_file.name} "
            f"entry) or {len(q_rel)} (one per query)"
        )
    variant = f"MSLS official: {len(qidx)} queries from {qidx_file.name}, positives from {src.name}"
    return gt, [q_rel[i] for i in qidx], variant


def missing_files(paths: list[str]) -> list[str]:
    """The paths that do not exist, found by listing each folder once (a stat per image
    is slow on network file systems)."""
    names_by_folder: dict[str, list[str]] = {}
    for path in paths:
        folder, name = os.path.split(path)
        names_by_folder.setdefault(folder, []).append(name)
    missing = []
    for folder, names in names_by_folder.items():
        listed = folder or "."  # a bare file name lives in the working directory
        present = set(os.listdir(listed)) if os.path.isdir(listed) else set()
        for name in names:  # a stat only for names the listing lacks (case-insensitive disks)
            path = os.path.join(folder, name)
            if name not in present and not os.path.exists(path):
                missing.append(path)
    return missing


def _maybe_coords(paths: list[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """UTM/lat-lon from file names when every name is in the @utm@ convention, else None."""
    if not paths or not all(os.path.basename(p).startswith("@") for p in paths):
        return None, None
    return _coords(paths)


def _warn_sizes(bench: Benchmark) -> None:
    expected = EXPECTED_SIZES.get(bench.name)
    if expected is None:
        return
    got = (bench.num_db, bench.num_queries)
    if got != expected:
        warnings.warn(
            f"benchmark {bench.name!r} has {got[0]} db / {got[1]} queries; the published protocol "
            f"has {expected[0]} / {expected[1]} ({bench.variant}): results are not comparable "
            "to paper tables",
            stacklevel=3,
        )
