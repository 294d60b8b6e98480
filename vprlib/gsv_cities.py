"""GSV-Cities: file names, dataframes, filters and summaries.

On disk (see data/README.md)::

    <root>/Dataframes/<City>.csv         place_id, year, month, northdeg, city_id, lat, lon, panoid
    <root>/Images/<city_id>/<file>.jpg   {city_id}_{place_id:07d}_{year:04d}_{month:02d}_
                                         {northdeg:03d}_{lat}_{lon}_{panoid}.jpg

`read_gsv_dataframes` reads the CSVs into one table with a `place` id unique across cities
(city index * 10**5 + place_id, cities in sorted city_id order) and the image `path`
relative to the root, as it exists on disk (.jpg or .JPG); the reading of each city CSV and
the building of its paths (Arrow when pyarrow is installed, one thread per CSV) live in
`gsv_csv`.

The training dataset built on these tables, `GSVCitiesDataset`, lives in `gsv_dataset`.
"""

from __future__ import annotations

import csv
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from .gsv_csv import (
    COLUMNS,
    FLOAT_COLUMNS,
    INT_COLUMNS,
    PLACE_STRIDE,
    VALUE_RANGES,
    file_name,
    read_city,
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
_WHOLE_NAME_RE = re.compile(rf"\A(?:{_NAME_RE.pattern})\Z")  # str.extract searches; anchor it

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
    for col in ("month", "lat", "lon"):
        low, high = VALUE_RANGES[col]
        if not low <= out[col] <= high:
            raise ValueError(
                f"{col} {out[col]} out of {low}..{high} in GSV-Cities file name {base!r}"
            )
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
    return file_name(city_id, **ints, lat=lat, lon=lon, panoid=panoid, ext=ext)


# ---------------------------------------------------------------- dataframes


def _check_root(root) -> Path:
    root = Path(root)
    if not (root / "Dataframes").is_dir():
        what = "does not exist" if not root.exists() else "has no Dataframes/ folder"
        hint = ""
        if (root / "GSV-Cities" / "Dataframes").is_dir():
            hint = f" (did you mean {root / 'GSV-Cities'}?)"
        elif root.name == "Dataframes":
            hint = f" (did you mean {root.parent}?)"
        raise FileNotFoundError(
            f"GSV-Cities root {root} {what}{hint}; expected the layout {LAYOUT}"
        )
    return root


def _first_city_id(path: Path) -> str | None:
    """city_id of the first data row of a city CSV (None for a file without rows)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        row = next((r for r in reader if r), None)  # blank lines are skipped, as pandas does
    if header is None or row is None:
        return None
    if "city_id" not in header:
        raise ValueError(f"{path}: missing column 'city_id' (needs {list(COLUMNS)})")
    column = header.index("city_id")
    if len(row) <= column:
        raise ValueError(
            f"{path}: the first data row has {len(row)} fields, no value in column 'city_id' "
            f"(field {column + 1} of the header {header})"
        )
    return row[column]


def _refuse_shared_images(chosen: list[str], ids: dict, frames: list, csvs: dict) -> None:
    """Chosen CSVs of one city_id share its places; one listing the other's images (a copied
    or overlapping file) would count each of those images twice: refused, naming the files.
    A city split into CSVs of different images is fine."""
    stems_of: dict[str, list[int]] = {}
    for i, stem in enumerate(chosen):
        stems_of.setdefault(ids[stem], []).append(i)
    for cid, rows in stems_of.items():
        if cid is None or len(rows) < 2:
            continue
        paths = pd.concat([frames[i]["path"] for i in rows], keys=[chosen[i] for i in rows])
        twice = paths[paths.duplicated(keep=False)]
        if len(twice):
            files = " and ".join(
                str(csvs[s]) for s in dict.fromkeys(twice.index.get_level_values(0))
            )
            raise ValueError(
                f"{files} (city_id {cid!r}) both list {twice.iloc[0]}: the image would count "
                "twice in its place; keep one of the CSVs or choose cities= without the copy"
            )


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
    read at once (None: one per CPU core); with pyarrow installed the parsing and path
    building run in Arrow (`gsv_csv`), outside Python's GIL.
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
    _refuse_shared_images(chosen, ids, frames, csvs)
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
        parts = pd.Series(names, dtype=object).str.extract(_WHOLE_NAME_RE)
        bad = parts["city_id"].isna() | (parts["city_id"] != city_id)
        for col in ("month", "lat", "lon"):  # the range checks of parse_gsv_filename
            bad |= ~pd.to_numeric(parts[col]).between(*VALUE_RANGES[col])
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
    sizes = df.groupby(_place_key(df), sort=False).transform("size")
    return df[sizes >= int(n)]


def filter_dates(
    df: pd.DataFrame,
    years: int | Iterable[int] | None = None,
    months: int | Iterable[int] | None = None,
) -> pd.DataFrame:
    """Rows taken in the given years and/or months (ints or iterables, e.g.
    years=range(2015, 2019), months=[6, 7, 8]). Places may end up with fewer images:
    follow with filter_min_images."""
    for name, value in (("years", years), ("months", months)):
        if isinstance(value, (str, bytes)):
            raise TypeError(f"filter_dates: {name} must be an int or ints, got {value!r}")
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


def _haversine_m(lat1, lon1, lat2, lon2):
    """Great-circle distance in metres (numpy broadcasting)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    a = (
        np.sin((p2 - p1) / 2) ** 2
        + np.cos(p1) * np.cos(p2) * np.sin(np.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * 6371008.8 * np.arcsin(np.sqrt(a))


def place_centres(df: pd.DataFrame) -> pd.DataFrame:
    """Mean lat/lon, city_id and image count per place (for maps and spacing checks).
    Indexed by `place`, or by (city_id, place_id) for a table without `place`."""
    key = _place_key(df)
    g = df.groupby(key)
    columns = {"lat": ("lat", "mean"), "lon": ("lon", "mean")}
    if key == "place":  # else city_id is already an index level
        columns = {"city_id": ("city_id", "first"), **columns}
    out = g.agg(**columns)
    out["images"] = g.size()
    return out


def min_place_distance_m(df: pd.DataFrame) -> float:
    """Smallest distance (metres) between two place centres of the same city (brute force
    per city; fine for a few thousand places)."""
    centres = place_centres(df).dropna(subset=["lat", "lon"])  # no position, no distance
    best = math.inf
    for _, c in centres.groupby("city_id"):
        lat, lon = c["lat"].to_numpy(), c["lon"].to_numpy()
        if len(lat) < 2:
            continue
        d = _haversine_m(lat[:, None], lon[:, None], lat[None, :], lon[None, :])
        np.fill_diagonal(d, np.inf)
        best = min(best, float(d.min()))
    return best
