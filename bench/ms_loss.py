"""Multi-Similarity mining + loss: the library pair vs DenseMultiSimilarity, in one run.

    python bench/ms_loss.py            # on CUDA if available, else the CPU
    python bench/ms_loss.py --small    # CPU smoke run (~5 s)

Times forward + backward of the miner + loss alone on a fit-sized batch of descriptors
(100 places x 4 images, 8192-d: ResNet50 + Conv-AP 2048x2x2), prints steps/s of each, the
ratio dense/library, and how far apart their losses are. On CUDA it also counts the ops that
make the host wait for the GPU (torch.cuda sync debug mode "warn"): the library's index lists
have data-dependent lengths, so each of them is one such wait.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import machine_summary, synchronize  # noqa: E402

from vprlib.losses import get_loss, get_miner  # noqa: E402


def library_pair():
    loss_fn, miner = get_loss(), get_miner()
    return lambda x, labels: loss_fn(x, labels, miner(x, labels))


def make_batch(places: int, per_place: int, dim: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    # descriptors of a model early in training: same-place images a little closer (cosine
    # ~0.14 against ~0 +- 0.01): mining keeps some pairs and drops others
    centres = torch.randn(places, dim, generator=g).repeat_interleave(per_place, 0)
    x = F.normalize(centres + 2.5 * torch.randn(places * per_place, dim, generator=g), dim=1)
    labels = torch.arange(places).repeat_interleave(per_place)
    return x.to(device), labels.to(device)


def time_steps(fn, x, labels, steps: int, device) -> float:
    """Steps/s of fn(x, labels).backward() after two warm-up steps."""
    x = x.clone().requires_grad_()
    for _ in range(2):
        fn(x, labels).backward()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(x, labels).backward()
    synchronize(device)
    return steps / (time.perf_counter() - t0)


def count_syncs(fn, x, labels) -> int:
    """Ops of one forward + backward that make the host wait for the GPU (CUDA only)."""
    x = x.clone().requires_grad_()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(x, labels).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny CPU smoke run")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.small
    device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    places, per_place, dim = (16, 4, 256) if args.small else (100, 4, 8192)
    steps = args.steps or (5 if args.small else (200 if device.type == "cuda" else 20))
    x, labels = make_batch(places, per_place, dim, device)
    print(f"device: {machine_summary(device)}")
    print(f"batch: {places} places x {per_place} images, {dim}-d descriptors, {steps} steps")
    dense = get_loss("DenseMultiSimilarity")
    library = library_pair()
    diff = abs(float(library(x, labels)) - float(dense(x, labels)))
    rates = {name: time_steps(fn, x, labels, steps, device) for name, fn in
             [("library", library), ("dense", dense)]}  # fmt: skip
    syncs = {}
    if device.type == "cuda":
        syncs = {"library": count_syncs(library, x, labels), "dense": count_syncs(dense, x, labels)}
    print()
    print(f"{'miner + loss':<14} {'steps/s':>10} {'host waits':>11}")
    for name, rate in rates.items():
        print(f"{name:<14} {rate:>10.1f} {syncs.get(name, '-'):>11}")
    print()
    print(
        f"ratio dense/library: {rates['dense'] / rates['library']:.2f}x "
        f"(|loss difference| {diff:.1e})"
    )
    return {"rates": rates, "syncs": syncs, "loss_difference": diff}


if __name__ == "__main__":
    main()
