"""Make the small synthetic sample dataset: `python data/make_sample.py --out data/sample`.

Why: tests, notebooks and CI need data in the exact on-disk layouts of GSV-Cities and of the
evaluation benchmarks, without shipping real Street View images (GSV-Cities is CC BY-NC-ND)
and without network access. Everything here is drawn from fixed seeds, so every run writes
the same bytes.

What it writes under --out:
- GSV-Cities/Dataframes/<City>.csv and GSV-Cities/Images/<city_id>/<gsv file name>.jpg:
  5 cities (Paris uses the code folder PRS; BuenosAires is in the southern hemisphere), 26
  places each at real city-centre coordinates, places >= 100 m apart, 4..12 views per place.
- benchmarks/gsv_sample/{database,queries}/@utm_e@utm_n@zone@letter@lat@lon@...@.jpg (folder
  format) and benchmarks/datasets_npy/gsv_sample_{dbImages,qImages,gt}.npy (list format) over
  the same image files: 40 Pittsburgh places (2-3 database views + 1 query each), database
  distractors, and 2 queries without any database image within 25 m.

Each place is a distinct street scene (sky, facades with place-specific colours and window
grids, trees, signs, road) drawn once on a 320x240 canvas; each view is an affine crop of it
(shift, zoom, small rotation) with its own lighting, season tint and occluders (cars,
pedestrians), saved as a 160x120 JPEG.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shutil
import string
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CANVAS = (320, 240)
VIEW = (160, 120)
JPEG_QUALITY = 72
PLACES_PER_CITY = 26
MIN_PLACE_DIST_M = 130.0  # > 100 m, with room for the few metres of per-view jitter
THRESHOLD_M = 25.0

# (CSV stem, city_id used for the image folder and file prefix, centre lat, centre lon)
CITIES = [
    ("Boston", "Boston", 42.3601, -71.0589),
    ("BuenosAires", "BuenosAires", -34.6037, -58.3816),
    ("London", "London", 51.5074, -0.1278),
    ("MexicoCity", "MexicoCity", 19.4326, -99.1332),
    ("Paris", "PRS", 48.8566, 2.3522),
]
EVAL_CENTRE = (40.4406, -79.9959)  # Pittsburgh
EVAL_PLACES = 40
EVAL_DISTRACTOR_PLACES = 3
EVAL_LONELY_QUERIES = 2
PANOID_CHARS = string.ascii_letters + string.digits + "_-"

# ---------------------------------------------------------------- geometry


def haversine_m(lat1, lon1, lat2, lon2):
    """Great-circle distance in metres (arrays broadcast)."""
    r = 6371008.8
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * r * np.arcsin(np.sqrt(a))


def utm_zone(lat: float, lon: float) -> tuple[int, str]:
    """UTM zone number and latitude band letter (with the Norway/Svalbard exceptions)."""
    if not -80.0 <= lat <= 84.0:
        raise ValueError(f"latitude {lat} outside the UTM range [-80, 84]")
    zone = int((lon + 180.0) // 6.0) % 60 + 1
    if 56.0 <= lat < 64.0 and 3.0 <= lon < 12.0:
        zone = 32
    if 72.0 <= lat < 84.0 and lon >= 0.0:
        for lo, hi, z in ((0, 9, 31), (9, 21, 33), (21, 33, 35), (33, 42, 37)):
            if lo <= lon < hi:
                zone = z
    letters = "CDEFGHJKLMNPQRSTUVWX"
    letter = letters[min(int((lat + 80.0) // 8.0), len(letters) - 1)]
    return zone, letter


def latlon_to_utm(lat: float, lon: float) -> tuple[float, float, int, str]:
    """WGS84 lat/lon (degrees) -> (easting, northing, zone, letter) by the transverse Mercator
    series (Snyder, "Map Projections: A Working Manual", USGS 1987, eqs. 8-9..8-10)."""
    zone, letter = utm_zone(lat, lon)
    a, f, k0 = 6378137.0, 1 / 298.257223563, 0.9996
    e2 = f * (2 - f)
    ep2 = e2 / (1 - e2)
    phi = math.radians(lat)
    lam0 = math.radians((zone - 1) * 6 - 180 + 3)
    n = a / math.sqrt(1 - e2 * math.sin(phi) ** 2)
    t = math.tan(phi) ** 2
    c = ep2 * math.cos(phi) ** 2
    aa = math.cos(phi) * (math.radians(lon) - lam0)
    m = a * (
        (1 - e2 / 4 - 3 * e2**2 / 64 - 5 * e2**3 / 256) * phi
        - (3 * e2 / 8 + 3 * e2**2 / 32 + 45 * e2**3 / 1024) * math.sin(2 * phi)
        + (15 * e2**2 / 256 + 45 * e2**3 / 1024) * math.sin(4 * phi)
        - (35 * e2**3 / 3072) * math.sin(6 * phi)
    )
    east = 500000.0 + k0 * n * (
        aa + (1 - t + c) * aa**3 / 6 + (5 - 18 * t + t**2 + 72 * c - 58 * ep2) * aa**5 / 120
    )
    north = k0 * (
        m
        + n
        * math.tan(phi)
        * (
            aa**2 / 2
            + (5 - t + 9 * c + 4 * c**2) * aa**4 / 24
            + (61 - 58 * t + t**2 + 600 * c - 330 * ep2) * aa**6 / 720
        )
    )
    if lat < 0:
        north += 10000000.0
    return east, north, zone, letter


def offset_latlon(lat: float, lon: float, east_m: float, north_m: float) -> tuple[float, float]:
    """Move a point by small metric offsets (local flat-earth approximation)."""
    dlat = north_m / 111320.0
    dlon = east_m / (111320.0 * math.cos(math.radians(lat)))
    return lat + dlat, lon + dlon


def spread_places(rng, centre, count, radius_m, min_dist_m, avoid=()):
    """`count` points within `radius_m` of `centre`, pairwise >= `min_dist_m` apart and
    >= `min_dist_m` from every point of `avoid` (rejection sampling)."""
    pts = list(avoid)
    out = []
    while len(out) < count:
        e, n = rng.uniform(-radius_m, radius_m, size=2)
        lat, lon = offset_latlon(centre[0], centre[1], e, n)
        if pts:
            arr = np.array(pts)
            if haversine_m(lat, lon, arr[:, 0], arr[:, 1]).min() < min_dist_m:
                continue
        pts.append((lat, lon))
        out.append((lat, lon))
    return out


def jitter(rng, lat, lon, max_m, decimals):
    """A view position within `max_m` of the place, rounded as GSV coordinates are."""
    r = max_m * math.sqrt(rng.uniform())
    a = rng.uniform(0, 2 * math.pi)
    jlat, jlon = offset_latlon(lat, lon, r * math.cos(a), r * math.sin(a))
    return round(jlat, decimals), round(jlon, decimals)


def make_panoid(rng) -> str:
    """22 characters of [A-Za-z0-9_-], usually with at least one `_` or `-` inside."""
    chars = list(rng.choice(list(PANOID_CHARS), size=22))
    if rng.uniform() < 0.6:
        chars[int(rng.integers(1, 21))] = "_" if rng.uniform() < 0.5 else "-"
    if rng.uniform() < 0.4:
        chars[int(rng.integers(0, 22))] = "-" if rng.uniform() < 0.5 else "_"
    return "".join(chars)


# ---------------------------------------------------------------- scenes


def _colour(rng, lo=40, hi=230):
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))


def render_place(rng) -> Image.Image:
    """One street scene on the CANVAS: sky, facades, trees, signs and road."""
    w, h = CANVAS
    img = Image.new("RGB", CANVAS)
    d = ImageDraw.Draw(img)
    sky_top = np.array([rng.integers(60, 140), rng.integers(110, 180), rng.integers(190, 255)])
    sky_bot = np.minimum(sky_top + rng.integers(30, 80), 255)
    for y in range(h):
        c = sky_top + (sky_bot - sky_top) * (y / h)
        d.line([(0, y), (w, y)], fill=tuple(int(v) for v in c))
    horizon = int(rng.integers(150, 180))
    x = -int(rng.integers(0, 30))
    while x < w:
        bw = int(rng.integers(45, 110))
        top = int(rng.integers(25, 110))
        wall = _colour(rng, 50, 235)
        d.rectangle([x, top, x + bw, horizon], fill=wall)
        if rng.uniform() < 0.5:  # a roof band or cornice
            d.rectangle([x - 2, top - 6, x + bw + 2, top], fill=_colour(rng, 20, 120))
        win = _colour(rng, 10, 255)
        cols, rows = int(rng.integers(2, 6)), int(rng.integers(2, 7))
        ww, wh = int(rng.integers(5, 12)), int(rng.integers(6, 14))
        gx = (bw - cols * ww) / (cols + 1)
        gy = (horizon - 25 - top - rows * wh) / (rows + 1)
        if gx > 2 and gy > 2:
            for i in range(cols):
                for j in range(rows):
                    x0 = x + gx + i * (ww + gx)
                    y0 = top + gy + j * (wh + gy)
                    d.rectangle([x0, y0, x0 + ww, y0 + wh], fill=win)
        door_x = x + int(rng.integers(5, max(6, bw - 18)))
        d.rectangle([door_x, horizon - 22, door_x + 12, horizon], fill=_colour(rng, 10, 140))
        if rng.uniform() < 0.35:  # a shop sign
            sy = horizon - int(rng.integers(28, 40))
            d.rectangle([x + 4, sy, x + bw - 4, sy + 7], fill=_colour(rng, 0, 255))
        x += bw + int(rng.integers(0, 12))
    d.rectangle([0, horizon, w, h], fill=tuple(int(v) for v in rng.integers(70, 120, size=3)))
    d.rectangle([0, horizon, w, horizon + 8], fill=_colour(rng, 140, 200))  # sidewalk
    for x0 in range(int(rng.integers(0, 30)), w, int(rng.integers(40, 70))):
        d.rectangle([x0, horizon + 40, x0 + 18, horizon + 44], fill=(230, 230, 220))
    for _ in range(int(rng.integers(0, 4))):  # trees
        tx, ty = int(rng.integers(10, w - 10)), horizon + 4
        r = int(rng.integers(14, 30))
        d.rectangle([tx - 3, ty - 2 * r, tx + 3, ty], fill=(90, 60, 30))
        green = (int(rng.integers(20, 90)), int(rng.integers(100, 180)), int(rng.integers(20, 80)))
        d.ellipse([tx - r, ty - 3 * r, tx + r, ty - r], fill=green)
    for _ in range(int(rng.integers(0, 3))):  # poles with round or square signs
        px = int(rng.integers(5, w - 5))
        d.rectangle([px - 1, horizon - 45, px + 1, horizon + 6], fill=(60, 60, 60))
        box = [px - 7, horizon - 58, px + 7, horizon - 44]
        if rng.uniform() < 0.5:
            d.ellipse(box, fill=_colour(rng, 0, 255))
        else:
            d.rectangle(box, fill=_colour(rng, 0, 255))
    return img


def season_tint(month: int, southern: bool) -> np.ndarray:
    """RGB multipliers for the season of `month` (winter bluish, autumn warm, summer bright)."""
    if southern:
        month = (month + 5) % 12 + 1
    if month in (12, 1, 2):
        return np.array([0.88, 0.93, 1.08])
    if month in (9, 10, 11):
        return np.array([1.08, 0.96, 0.85])
    if month in (6, 7, 8):
        return np.array([1.03, 1.05, 0.95])
    return np.array([1.0, 1.0, 1.0])


def render_view(rng, canvas: Image.Image, month: int, southern: bool) -> Image.Image:
    """One view of a place: affine crop, lighting and season tint, then occluders."""
    cw, ch = CANVAS
    vw, vh = VIEW
    crop_w = rng.uniform(190, 290)
    k = crop_w / vw
    theta = math.radians(rng.uniform(-4, 4))
    half_w, half_h = crop_w / 2, crop_w * vh / vw / 2
    cx = rng.uniform(half_w + 4, cw - half_w - 4)
    cy = rng.uniform(half_h + 4, ch - half_h - 4)
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    coeffs = (
        k * cos_t,
        -k * sin_t,
        cx - k * (cos_t * vw / 2 - sin_t * vh / 2),
        k * sin_t,
        k * cos_t,
        cy - k * (sin_t * vw / 2 + cos_t * vh / 2),
    )
    view = canvas.transform(VIEW, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    light = rng.uniform(0.7, 1.2) * season_tint(month, southern)
    arr = np.asarray(view, dtype=np.float32) * light.astype(np.float32)
    view = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(view)
    for _ in range(int(rng.integers(0, 3))):
        x0 = int(rng.integers(-20, vw - 10))
        y0 = int(rng.integers(80, 105))
        if rng.uniform() < 0.6:  # a car: body, window band, wheels
            body = _colour(rng, 0, 255)
            d.rounded_rectangle([x0, y0, x0 + 42, y0 + 14], radius=4, fill=body)
            d.rectangle([x0 + 8, y0 - 7, x0 + 32, y0], fill=(40, 50, 60))
            d.ellipse([x0 + 4, y0 + 10, x0 + 12, y0 + 18], fill=(15, 15, 15))
            d.ellipse([x0 + 30, y0 + 10, x0 + 38, y0 + 18], fill=(15, 15, 15))
        else:  # a pedestrian: head and body
            d.ellipse([x0, y0 - 28, x0 + 6, y0 - 22], fill=(200, 160, 130))
            d.rectangle([x0 - 1, y0 - 22, x0 + 7, y0], fill=_colour(rng, 0, 255))
    return view


def jpeg_bytes(img: Image.Image) -> bytes:
    """Encode as baseline JPEG with fixed settings (no metadata, so bytes are reproducible)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, subsampling=2)
    return buf.getvalue()


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ---------------------------------------------------------------- GSV-Cities


def gsv_name(city_id, place_id, year, month, northdeg, lat, lon, panoid) -> str:
    """The GSV-Cities image file name (lat/lon as Python's shortest float repr)."""
    return (
        f"{city_id}_{place_id:07d}_{year:04d}_{month:02d}_{northdeg:03d}_"
        f"{float(lat)!s}_{float(lon)!s}_{panoid}.jpg"
    )


def make_gsv_cities(root: Path, seed: int = 0) -> list[tuple[float, float]]:
    """Write Dataframes/ and Images/; return every training place centre."""
    all_places: list[tuple[float, float]] = []
    for ci, (stem, city_id, lat0, lon0) in enumerate(CITIES):
        rng = np.random.default_rng([seed, 1, ci])
        centres = spread_places(rng, (lat0, lon0), PLACES_PER_CITY, 1500.0, MIN_PLACE_DIST_M)
        all_places += centres
        lines = ["place_id,year,month,northdeg,city_id,lat,lon,panoid"]
        for pid, (plat, plon) in enumerate(centres):
            prng = np.random.default_rng([seed, 2, ci, pid])
            canvas = render_place(prng)
            # mostly 4-7 views, some 8-12 (the real data has 4 to 20 per place)
            k = int(prng.choice([4, 4, 5, 5, 6, 6, 7, 8, 9, 10, 12]))
            dates = sorted(
                (int(prng.integers(2007, 2022)), int(prng.integers(1, 13))) for _ in range(k)
            )
            for year, month in dates:
                northdeg = int(prng.integers(0, 360))
                if prng.uniform() < 0.12:
                    northdeg += 360 if northdeg < 240 else 0  # the real data has e.g. 584
                lat, lon = jitter(prng, plat, plon, 5.0, int(prng.integers(5, 8)))
                panoid = make_panoid(prng)
                view = render_view(prng, canvas, month, lat < 0)
                name = gsv_name(city_id, pid, year, month, northdeg, lat, lon, panoid)
                write_bytes(root / "Images" / city_id / name, jpeg_bytes(view))
                lines.append(
                    f"{pid},{year},{month},{northdeg},{city_id},{float(lat)!r},{float(lon)!r},{panoid}"
                )
        write_bytes(root / "Dataframes" / f"{stem}.csv", ("\n".join(lines) + "\n").encode())
    return all_places


# ---------------------------------------------------------------- evaluation set


def folder_name(lat: float, lon: float, panoid: str, heading: int, year: int, month: int) -> str:
    """Folder-format name `@utm_e@utm_n@zone@letter@lat@lon@panoid@tile@heading@pitch@roll@
    height@timestamp@note@.jpg` (UTM with 2 decimals)."""
    east, north, zone, letter = latlon_to_utm(lat, lon)
    fields = [
        f"{east:010.2f}",
        f"{north:010.2f}",
        f"{zone:02d}",
        letter,
        f"{lat:.7f}",
        f"{lon:.7f}",
        panoid,
        "",
        f"{heading:03d}",
        "",
        "",
        "",
        f"{year:04d}{month:02d}",
        "",
    ]
    return "@" + "@".join(fields) + "@.jpg"


def utm_from_folder_name(name: str) -> tuple[float, float]:
    """(east, north) as written in a folder-format name."""
    parts = name.split("@")
    return float(parts[1]), float(parts[2])


def brute_force_gt(db_names, q_names, threshold_m=THRESHOLD_M) -> list[np.ndarray]:
    """Per query: indices of database images within `threshold_m` (UTM metres)."""
    db = np.array([utm_from_folder_name(n) for n in db_names])
    out = []
    for name in q_names:
        q = np.array(utm_from_folder_name(name))
        dist = np.sqrt(((db - q) ** 2).sum(axis=1))
        out.append(np.flatnonzero(dist <= threshold_m).astype(np.int64))
    return out


def make_eval_set(bench_root: Path, avoid: list[tuple[float, float]], seed: int = 0) -> None:
    """Write gsv_sample in the folder format and the list format (same image files)."""
    rng = np.random.default_rng([seed, 3])
    n_total = EVAL_PLACES + EVAL_DISTRACTOR_PLACES + EVAL_LONELY_QUERIES
    centres = spread_places(rng, EVAL_CENTRE, n_total, 1300.0, MIN_PLACE_DIST_M, avoid=avoid)
    db_names, q_names = [], []
    files: dict[str, bytes] = {}
    for i, (plat, plon) in enumerate(centres):
        prng = np.random.default_rng([seed, 4, i])
        canvas = render_place(prng)
        if i < EVAL_PLACES:
            n_db, n_q = int(prng.integers(2, 4)), 1
        elif i < EVAL_PLACES + EVAL_DISTRACTOR_PLACES:
            n_db, n_q = 2, 0  # database distractors: no query anywhere near
        else:
            n_db, n_q = 0, 1  # a query without any database image within 25 m
        for kind, count in (("database", n_db), ("queries", n_q)):
            for _ in range(count):
                year, month = int(prng.integers(2007, 2022)), int(prng.integers(1, 13))
                lat, lon = jitter(prng, plat, plon, 10.0, 7)
                name = folder_name(
                    lat, lon, make_panoid(prng), int(prng.integers(0, 360)), year, month
                )
                files[f"gsv_sample/{kind}/{name}"] = jpeg_bytes(
                    render_view(prng, canvas, month, False)
                )
                (db_names if kind == "database" else q_names).append(name)
    for rel, data in files.items():
        write_bytes(bench_root / rel, data)
    db_names, q_names = sorted(db_names), sorted(q_names)  # the folder loader's order
    gt = brute_force_gt(db_names, q_names)
    gt_obj = np.empty(len(gt), dtype=object)
    for i, g in enumerate(gt):
        gt_obj[i] = g
    npy = bench_root / "datasets_npy"
    npy.mkdir(parents=True, exist_ok=True)
    np.save(
        npy / "gsv_sample_dbImages.npy", np.array([f"gsv_sample/database/{n}" for n in db_names])
    )
    np.save(npy / "gsv_sample_qImages.npy", np.array([f"gsv_sample/queries/{n}" for n in q_names]))
    np.save(npy / "gsv_sample_gt.npy", gt_obj, allow_pickle=True)


# ---------------------------------------------------------------- main


def make_sample(out: str | os.PathLike, seed: int = 0) -> Path:
    """Generate the whole sample into a temporary folder beside `out`, then swap it in, so
    `out` is never left half-written."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        places = make_gsv_cities(tmp / "GSV-Cities", seed)
        make_eval_set(tmp / "benchmarks", places, seed)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/sample", help="output folder (replaced)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_sample(args.out, args.seed)
    files = [p for p in out.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} files, {size / 1e6:.2f} MB, under {out}")


if __name__ == "__main__":
    main()
