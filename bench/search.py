"""vprlib.search + recall_at_k against bare faiss on a Pitts250k-sized problem.

Each method runs in a fresh subprocess on the same deterministic random data (84k x 4096
L2-normalised float32 database, 8.3k queries near known database rows). Reported: wall time
ratio (goal <= 1.1x) and peak extra resident memory during the search, as a multiple of the
database descriptor bytes (goal <= 1.5x; faiss's flat index holds one copy, i.e. ~1x).
Peak memory is the process's ru_maxrss after the run minus its RSS before it, so memory that
faiss allocates in C++ is counted too (tracemalloc would miss it).

    python bench/search.py            # full size (a few GB of RAM, minutes on 2 cores)
    python bench/search.py --small    # smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METHODS = ("faiss", "vprlib")


def make_data(
    n_db: int, n_q: int, dim: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random unit database; each query = a database row + noise (its one positive)."""
    rng = np.random.default_rng(seed)
    db = np.empty((n_db, dim), dtype=np.float32)
    for s in range(0, n_db, 1024):  # chunked so the peak stays at the array itself
        block = rng.standard_normal((min(1024, n_db - s), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        db[s : s + len(block)] = block
    positives = rng.integers(0, n_db, n_q)
    q = db[positives] + 0.7 / np.sqrt(dim) * rng.standard_normal((n_q, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return db, q, positives


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() // 1024


def child(method: str, n_db: int, n_q: int, dim: int, k: int, out: Path) -> None:
    """Run one method in this (fresh) process and print a JSON line of measurements."""
    import faiss

    sys.path.insert(0, str(REPO))
    from vprlib.evaluate import recall_at_k, search

    db, q, positives = make_data(n_db, n_q, dim)
    ground_truth = [np.array([p]) for p in positives]
    rss_before = _rss_kib()
    t0 = time.perf_counter()
    if method == "faiss":
        index = faiss.IndexFlatL2(dim)
        index.add(db)
        dist, pred = index.search(q, k)
        recalls = None
    else:
        pred, dist = search(db, q, k, return_distances=True)
        recalls = recall_at_k(pred, ground_truth, ks=(1, 5, k))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    np.save(out / f"{method}_indices.npy", pred)
    np.save(out / f"{method}_distances.npy", dist)
    print(
        json.dumps(
            {
                "method": method,
                "seconds": seconds,
                "extra_bytes": max(0, peak - rss_before) * 1024,
                "db_bytes": db.nbytes,
                "recalls": recalls,
            }
        )
    )


def same_ranking(out: Path) -> tuple[bool, int]:
    """Indices equal to bare faiss's, except positions whose distances tie to float rounding."""
    i0, i1 = np.load(out / "faiss_indices.npy"), np.load(out / "vprlib_indices.npy")
    d0, d1 = np.load(out / "faiss_distances.npy"), np.load(out / "vprlib_distances.npy")
    # rank by rank the distances agree, so any differing index is a swap within a tie
    return bool(np.allclose(d0, d1, rtol=1e-5, atol=1e-6)), int((i0 != i1).sum())


def run_child(method: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--out", str(out)]
    cmd += ["--db", str(args.db), "--queries", str(args.queries), "--dim", str(args.dim)]
    cmd += ["--k", str(args.k)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} child failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="smoke-test size (2,000 x 256)")
    parser.add_argument("--db", type=int, default=84_000)
    parser.add_argument("--queries", type=int, default=8_300)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--k", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=1, help="runs per method; best time kept")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.small:
        args.db, args.queries, args.dim = 2_000, 300, 256
    if args.child:
        child(args.child, args.db, args.queries, args.dim, args.k, args.out)
        return 0

    print(f"database {args.db} x {args.dim} float32, {args.queries} queries, k={args.k}")
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for _ in range(args.repeats):
            for method in METHODS:
                res = run_child(method, args, out)
                if method not in best or res["seconds"] < best[method]["seconds"]:
                    best[method] = res
        same, swapped = same_ranking(out)
    base, ours = best["faiss"], best["vprlib"]
    ratio = ours["seconds"] / base["seconds"]
    for res in (base, ours):
        print(
            f"{res['method']:>7}: {res['seconds']:.3f} s, peak extra memory "
            f"{res['extra_bytes'] / 2**20:.1f} MiB = {res['extra_bytes'] / res['db_bytes']:.2f}x "
            "the database descriptors"
        )
    print(f"recall (vprlib): {ours['recalls']}")
    print(f"same predictions as bare faiss: {same} ({swapped} swaps of float32-rounding ties)")
    mem = ours["extra_bytes"] / ours["db_bytes"]
    print(
        f"time ratio vprlib/faiss: {ratio:.2f}x (goal <= 1.1x: {'met' if ratio <= 1.1 else 'MISSED'})"
    )
    print(
        f"extra memory: {mem:.2f}x descriptor bytes (goal <= 1.5x: {'met' if mem <= 1.5 else 'MISSED'})"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
