"""Time read_gsv_dataframes against bare pandas.read_csv + concat of the same CSVs.

    python bench/dataframes.py [--small] [--rows N] [--cities C] [--repeats R]

Writes C city CSVs totalling N rows (default 23 cities, 530k rows: the size of GSV-Cities)
to a temporary folder and reads them both ways. read_gsv_dataframes runs with
check_files=False (no image folders: 530k empty files would dominate), so the difference
is column checks, the `place` id and building the `path` of every row. read_gsv_dataframes
reads the CSVs in a thread pool (Arrow works outside the GIL), pandas in one thread: the
one-thread time is printed too. Prints the times and their ratio (goal <= 1.5x).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vprlib.gsv_cities import read_gsv_dataframes  # noqa: E402


def make_csvs(root: Path, rows: int, cities: int, seed: int = 0) -> None:
    """`cities` CSVs in the GSV-Cities column layout, ~8.5 images per place."""
    rng = np.random.default_rng(seed)
    (root / "Dataframes").mkdir(parents=True)
    per_city = np.full(cities, rows // cities)
    per_city[: rows % cities] += 1
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"))
    for c, n in enumerate(per_city):
        lat0, lon0 = rng.uniform(-40, 60), rng.uniform(-120, 140)
        df = pd.DataFrame(
            {
                "place_id": np.sort(rng.integers(0, max(1, n // 8.5), size=n)),
                "year": rng.integers(2007, 2022, size=n),
                "month": rng.integers(1, 13, size=n),
                "northdeg": rng.integers(0, 600, size=n),
                "city_id": f"City{c:02d}",
                "lat": np.round(lat0 + rng.uniform(-0.1, 0.1, size=n), 7),
                "lon": np.round(lon0 + rng.uniform(-0.1, 0.1, size=n), 7),
                "panoid": ["".join(p) for p in rng.choice(alphabet, size=(n, 22))],
            }
        )
        df.to_csv(root / "Dataframes" / f"City{c:02d}.csv", index=False)


def bare(root: Path) -> pd.DataFrame:
    files = sorted((root / "Dataframes").glob("*.csv"))
    return pd.concat([pd.read_csv(f) for f in files], ignore_index=True)


def best_time(fn, repeats: int) -> float:
    """Best wall time of `repeats` runs (the machine may be shared: best is least noisy)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="quick smoke run")
    parser.add_argument("--rows", type=int, default=530_000)
    parser.add_argument("--cities", type=int, default=23)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows, cities, repeats = (5_000, 3, 1) if args.small else (args.rows, args.cities, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_csvs(root, rows, cities)
        df = read_gsv_dataframes(root, check_files=False)
        assert len(df) == rows == len(bare(root))
        t_bare = best_time(lambda: bare(root), repeats)
        t_one = best_time(lambda: read_gsv_dataframes(root, check_files=False, threads=1), repeats)
        t_ours = best_time(lambda: read_gsv_dataframes(root, check_files=False), repeats)
    print(f"{rows} rows in {cities} city CSVs, {os.cpu_count()} CPU cores")
    print(f"pandas read_csv + concat (one thread): {t_bare:.3f} s")
    print(
        f"read_gsv_dataframes(check_files=False, threads=1): {t_one:.3f} s ({t_one / t_bare:.2f}x)"
    )
    print(f"ratio read_gsv_dataframes/bare: {t_ours / t_bare:.2f}x (goal <= 1.5x; default threads)")


if __name__ == "__main__":
    main()
