"""Training throughput: end to end (JPEG files -> batches -> train step) vs the step alone.

    python bench/train_throughput.py              # full size: CUDA if available
    python bench/train_throughput.py --small      # CPU smoke run (~15 s)

Builds (in a temporary folder, or --data-dir) a GSV-Cities tree of 640x480 JPEGs of ~106 KB
(copies of a pool of distinct noisy images, see synthetic.py), then in one run measures:

- model-only: images/s of `vprlib.train.train_step` (the step `fit` runs: forward, miner,
  Multi-Similarity loss, backward, SGD) on a batch already on the device;
- for each input path (--modes): images/s of the input pipeline alone (GSVCitiesDataset +
  DataLoader + `device_batches`, what `fit` iterates) and end to end (the same + train_step),
  with the ratio end-to-end / model-only last (goal >= 0.85 on a GPU).

Input paths: "cpu" (workers decode, resize and RandAugment; the device normalises),
"mixed:N" (workers decode and resize K - N images per place, nvJPEG decodes N on the device,
RandAugment runs on the device; "mixed:0" = CPU decode + device augmentation), "gpu" (workers
read bytes; the device decodes, resizes, augments). The default CUDA path (what fit does
with decode="auto") is "gpu/2s"; the verdict is given for it. A path may carry options: "/wN" (N workers),
"/pN" (prefetch depth N), "/noaug" (no RandAugment), "/hp" (high-priority prefetch stream),
"/2s" (decoding and augmenting in two prefetch threads), "/si" (Python's thread switch interval
at 0.5 ms instead of 5 ms while the path runs), "/dense" (the step with
losses.DenseMultiSimilarity, which never makes the host wait, instead of the library's miner +
loss: its ratio is against model-only with the same loss, measured too), e.g.
--modes "mixed:2/w14/p2,gpu/noaug,gpu/2s/dense".
A second table breaks each batch down (see `Probe`). Full-size defaults: ResNet50 cropped at
layer4 + Conv-AP, 320x320, 100 places x 4 images, bf16 autocast, channels_last and
torch.compile on CUDA. Model-only is measured before and after the input paths and the ratio
uses the faster of the two (so drift cannot flatter the pipeline).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import (  # noqa: E402
    jpeg_pool,
    link_or_copy,
    machine_summary,
    synchronize,
    write_pool,
)

from vprlib.batching import default_stages, device_batches, make_loader  # noqa: E402
from vprlib.gsv_cities import gsv_filename  # noqa: E402
from vprlib.gsv_dataset import GSVCitiesDataset  # noqa: E402
from vprlib.losses import get_loss, get_miner  # noqa: E402
from vprlib.models import VPRModel  # noqa: E402
from vprlib.train import (  # noqa: E402
    default_num_workers,
    make_optimizer,
    resolve_precision,
    train_step,
)

CITY = "Bench"
FULL_MODES = "gpu/2s,gpu/2s/dense,gpu/dense,mixed:3/dense,gpu/2s/si/dense,cpu"
SWITCH_INTERVAL = 0.0005  # "/si": seconds (Python's default is 0.005)
SMALL_MODES = "cpu,cpu/dense,mixed:2,gpu,gpu/2s/p1"
LOSS_SUFFIX = {"library": "", "dense": "/dense"}  # how the table names model-only per loss


# ----------------------------------------------------------------------------------------------
# Data


def make_gsv_tree(root: Path, places: int, img_per_place: int, pool: list[bytes]) -> None:
    """A GSV-Cities layout (one city) of places x img_per_place JPEGs linked (or copied) from
    `pool`, whose files are written once under root/pool."""
    rows = []
    folder = root / "Images" / CITY
    folder.mkdir(parents=True)
    pool_files = write_pool(root / "pool", pool)
    for p in range(places):
        for j in range(img_per_place):
            row = {
                "place_id": p,
                "year": 2010 + j % 10,
                "month": 1 + j % 12,
                "northdeg": (37 * j) % 360,
                "city_id": CITY,
                "lat": round(45.0 + p * 1e-3, 7),
                "lon": round(7.0 + j * 1e-5, 7),
                "panoid": f"b{p:07d}_{j:03d}".ljust(22, "x"),
            }
            link_or_copy(pool_files, p * img_per_place + j, folder / gsv_filename(row))
            rows.append(row)
    (root / "Dataframes").mkdir()
    pd.DataFrame(rows).to_csv(root / "Dataframes" / f"{CITY}.csv", index=False)


def ensure_gsv_tree(root: Path, places: int, img_per_place: int, pool_size: int) -> None:
    """Build the tree in `root` unless a tree of the same size is already there. Only a
    folder this script made (with its bench_tree.json) is ever emptied."""
    spec = {"places": places, "img_per_place": img_per_place, "pool": pool_size, "v": 2}
    marker = root / "bench_tree.json"
    if marker.is_file():
        if json.loads(marker.read_text()) == spec:
            return
        for sub in ("Images", "Dataframes", "pool"):
            shutil.rmtree(root / sub, ignore_errors=True)
    elif root.is_dir() and any(root.iterdir()):
        raise SystemExit(f"--data-dir {root} is not empty and was not made by this script")
    root.mkdir(parents=True, exist_ok=True)
    make_gsv_tree(root, places, img_per_place, jpeg_pool(pool_size))
    marker.write_text(json.dumps(spec))


# ----------------------------------------------------------------------------------------------
# Measurements


class Trainer:
    """Model, loss, miner, optimizer and scaler set up as `fit` does; `step` = train_step."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.model = VPRModel(
            args.backbone, pretrained=False, layers_to_crop=args.layers_to_crop, agg="convap"
        )
        self.model.to(device).train()
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # "library": fit's default miner + loss; "dense": the same in one sync-free module
        self.losses = {
            "library": (get_loss("MultiSimilarityLoss").to(device), get_miner()),
            "dense": (get_loss("DenseMultiSimilarity").to(device), None),
        }
        params = [p for p in self.model.parameters() if p.requires_grad]
        # a small lr: random data must not blow the weights up during the timing
        self.optimizer = make_optimizer(params, "sgd", 1e-3, 0.9, 1e-3)
        self.precision = args.precision
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
        self.forward = torch.compile(self.model) if args.compile else self.model

    def step(
        self, images: torch.Tensor, labels: torch.Tensor, loss: str = "library"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss_fn, miner = self.losses[loss]
        return train_step(
            self.forward,
            images,
            labels,
            loss_fn,
            miner,
            self.optimizer,
            self.scaler,
            self.precision,
        )


def model_only(trainer: Trainer, args, device: torch.device, loss: str = "library") -> float:
    """Images/s of train_step on one in-memory batch (uint8 noise, normalised on the device)."""
    p, k = args.places_per_batch, args.img_per_place
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (p * k, 3, *args.image_size), dtype=torch.uint8, generator=g)
    from vprlib.transforms import to_model_input

    x = to_model_input(images, device, channels_last=args.channels_last)
    labels = torch.arange(p).repeat_interleave(k).to(device)
    step = partial(trainer.step, loss=loss)
    try:
        step(x, labels)  # the first step compiles
    except Exception as e:  # a broken compiler stack must not cost the whole GPU run
        if trainer.forward is trainer.model:
            raise
        print(f"torch.compile failed ({type(e).__name__}: {e}); measuring eager instead")
        trainer.forward, args.compile = trainer.model, False
    for _ in range(args.warmup_steps):
        step(x, labels)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(x, labels)
    synchronize(device)
    return args.steps * p * k / (time.perf_counter() - t0)


def parse_mode(spec: str) -> dict:
    """An input path, 'cpu' | 'gpu' | 'mixed:N', optionally followed by '/wW' (W DataLoader
    workers), '/pD' (device prefetch depth D), '/noaug' (no RandAugment), '/hp' (the
    prefetch stream at high CUDA priority) and '/2s' (decode and augment in two prefetch
    threads: device_batches(stages=2)) and '/si' (a shorter Python thread switch interval:
    the step's thread and the prefetch thread both launch CUDA work holding the GIL, and a
    thread waiting for it gets it only after the holder's interval) and '/dense' (the step
    with DenseMultiSimilarity), e.g. 'mixed:2/w14/p2' -> {"dataset": GSVCitiesDataset kwargs,
    "workers": 14, "prefetch": 2, "priority": 0, "stages": 1, "switch_interval": None,
    "loss": "library"}."""
    mode, *options = spec.split("/")
    out: dict = {
        "dataset": {},
        "workers": None,
        "prefetch": None,
        "priority": 0,
        "stages": 1,
        "switch_interval": None,
        "loss": "library",
    }
    if mode in ("cpu", "gpu"):
        out["dataset"]["decode"] = mode
    elif mode.startswith("mixed:") and mode[6:].isdigit():
        out["dataset"].update(decode="mixed", gpu_images=int(mode[6:]))
    else:
        raise ValueError(f"unknown mode {spec!r}: use cpu, gpu or mixed:N (N images per place)")
    for option in options:
        if option == "noaug":
            out["dataset"]["augment"] = False
        elif option == "hp":
            out["priority"] = -1
        elif option == "2s":
            out["stages"] = 2
        elif option == "si":
            out["switch_interval"] = SWITCH_INTERVAL
        elif option == "dense":
            out["loss"] = "dense"
        elif option[:1] in ("w", "p") and option[1:].isdigit():
            out["workers" if option[0] == "w" else "prefetch"] = int(option[1:])
        else:
            raise ValueError(
                f"unknown option {option!r} in {spec!r}: "
                "use /wN, /pN, /noaug, /hp, /2s, /si, /dense"
            )
    return out


class Probe:
    """fit's input pipeline (`device_batches`) instrumented: it stands in for both the
    DataLoader (timing how long the prefetch thread waits for the workers) and the dataset
    (timing its device halves `decode_on_device` and `augment_on_device`, as host time and as
    span on the device's stream with CUDA events)."""

    def __init__(self, loader, dataset, device: torch.device):
        self.iterator = iter(loader)  # made here: a DataLoader iterator wants the main thread
        self.dataset = dataset
        self.device = device
        self.wait: list[float] = []
        self.host: dict[str, list[float]] = {}
        self.events: dict[str, list] = {}
        if hasattr(dataset, "decode_on_device"):  # what batch_stages calls
            self.decode_on_device = self.timed("decode_on_device")
            self.augment_on_device = self.timed("augment_on_device")
        else:
            self.batch_to_device = self.timed("batch_to_device")

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        batch = next(self.iterator)
        self.wait.append(time.perf_counter() - t)
        return batch

    def timed(self, name: str):
        """The dataset's method `name`, timed per call."""
        method = getattr(self.dataset, name)
        host, events = self.host.setdefault(name, []), self.events.setdefault(name, [])

        def call(*args, **kwargs):
            t = time.perf_counter()
            cuda = self.device.type == "cuda"
            if cuda:
                begin = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                begin.record()
            out = method(*args, **kwargs)
            if cuda:
                end.record()
                events.append((begin, end))
            host.append(time.perf_counter() - t)
            return out

        return call

    def summary(self, first: int, count: int) -> dict:
        """Mean milliseconds per batch over batches first .. first + count - 1 (the device
        halves added up)."""

        def ms(values):
            part = values[first : first + count]
            return 1e3 * float(np.mean(part)) if part else float("nan")

        used = [name for name, times in self.host.items() if times]
        host = sum(ms(self.host[name]) for name in used) if used else float("nan")
        gpu = float("nan")
        if self.device.type == "cuda" and used:
            gpu = sum(ms([b.elapsed_time(e) / 1e3 for b, e in self.events[n]]) for n in used)
        return {"wait_ms": ms(self.wait), "host_ms": host, "gpu_ms": gpu}


def pipeline_warmup(args, workers: int, prefetch: int) -> int:
    """Untimed batches before a pipeline measurement: all workers start together and each
    holds up to 2 batches (DataLoader's prefetch_factor), + the device prefetch. Timing only
    after that backlog is consumed keeps it from flattering the pipeline."""
    return max(args.warmup_steps, 2 * workers + prefetch + 1)


def run_pipeline(
    args,
    device,
    dataset,
    loader,
    sampler,
    epoch,
    warmup,
    trainer=None,
    profiler=None,
    *,
    prefetch: int,
    priority: int = 0,
    stages: int = 1,
    loss: str = "library",
):
    """Images/s over args.steps batches after `warmup` batches of one epoch of `loader`,
    through fit's DataLoader -> device_batches path (`stages` threads preparing), with
    train_step (with `loss`, a Trainer.losses key) when `trainer` is given; plus the Probe's
    breakdown and the main process's CPU use (cores busy: its threads' CPU time / wall time)
    over the timed batches. A
    `profiler` (torch.profiler.profile, not started) records the timed batches."""
    sampler.set_epoch(epoch)
    probe = Probe(loader, dataset, device)
    batches = device_batches(
        probe, probe, device, args.channels_last, prefetch, stages=stages, priority=priority
    )
    images, t0, cpu0 = 0, None, None
    with contextlib.closing(batches), contextlib.ExitStack() as recording:
        for i, (x, labels) in enumerate(batches):
            if i == warmup:
                synchronize(device)
                if profiler is not None:
                    recording.enter_context(profiler)
                t0, cpu0 = time.perf_counter(), time.process_time()
            if trainer is not None:
                trainer.step(x, labels, loss)
            if i >= warmup:
                images += labels.numel()
        synchronize(device)
    wall = time.perf_counter() - t0
    cores = (time.process_time() - cpu0) / wall
    return {"img_s": images / wall, "cores": cores, **probe.summary(warmup, args.steps)}


@contextlib.contextmanager
def mode_loader(args, device, root: Path, spec: str, index: int):
    """The dataset and DataLoader (persistent workers, as in fit) of one input path, its
    warm-up and its device_batches options (prefetch, priority, stages); the workers end
    on leaving."""
    mode = parse_mode(spec)
    workers = args.num_workers if mode["workers"] is None else mode["workers"]
    prefetch = args.prefetch if mode["prefetch"] is None else mode["prefetch"]
    warmup = pipeline_warmup(args, workers, prefetch)
    dataset = GSVCitiesDataset(
        root, img_per_place=args.img_per_place, image_size=args.image_size, **mode["dataset"]
    )
    loader, sampler = make_loader(
        dataset,
        args.places_per_batch,
        index,
        workers,
        device,
        max_steps_per_epoch=warmup + args.steps,
    )
    interval = sys.getswitchinterval()
    try:
        if mode["switch_interval"] is not None:
            sys.setswitchinterval(mode["switch_interval"])
        options = {key: mode[key] for key in ("priority", "stages", "loss")}
        options["prefetch"] = prefetch
        yield (args, device, dataset, loader, sampler), warmup, options
    finally:
        sys.setswitchinterval(interval)
        del loader, sampler
        gc.collect()  # shuts the persistent workers down


def measure_mode(args, device, root: Path, spec: str, index: int, trainer: Trainer) -> dict:
    """Pipeline-only and end-to-end images/s of one input path. One DataLoader serves both,
    one epoch each."""
    with mode_loader(args, device, root, spec, index) as (common, warmup, options):
        pipeline = run_pipeline(*common, 0, warmup, **options)
        e2e = run_pipeline(*common, 1, warmup, trainer, **options)
    return {
        "mode": spec,
        "pipeline": pipeline["img_s"],
        "e2e": e2e["img_s"],
        "pipeline_probe": pipeline,
        "e2e_probe": e2e,
    }


def trace_mode(args, device, root: Path, spec: str, index: int, trainer: Trainer, out: Path):
    """A torch.profiler record of args.trace_steps end-to-end steps of one input path (after
    its warm-up; all threads, CPU and CUDA): a Chrome trace `out`/trace_<spec>.json.gz (open
    in ui.perfetto.dev) and the ops that take the most device and host time, printed. What
    it answers: where the prefetch thread and the step wait on each other."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    profiler = profile(activities=activities)
    steps = argparse.Namespace(**{**vars(args), "steps": args.trace_steps})
    with mode_loader(steps, device, root, spec, index) as (common, warmup, options):
        result = run_pipeline(*common, 1, warmup, trainer, profiler, **options)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("trace_" + "".join(c if c.isalnum() else "_" for c in spec) + ".json.gz")
    profiler.export_chrome_trace(str(path))  # gzipped for the .gz suffix
    print(f"trace of {spec}: {args.trace_steps} steps at {result['img_s']:.0f} img/s (profiled) ->")
    print(f"  {path}")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=48)
    print(table)
    if device.type == "cuda":
        table = profiler.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=48
        )
        print(table)
    return path


def default_mode(args) -> str:
    """What fit trains a GSVCitiesDataset(decode="auto") with on args.device, as a mode
    spec: decode="gpu" in two preparation threads on CUDA (with a prefetch), else "cpu"."""
    if args.device.type != "cuda":
        return "cpu"
    return "gpu/2s" if default_stages(args.device, args.prefetch) == 2 else "gpu"


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny CPU smoke run (~15 s)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--data-dir", type=Path, default=None, help="build/reuse the tree here")
    p.add_argument("--backbone", default=None, help="default resnet50 (resnet18 with --small)")
    p.add_argument("--layers-to-crop", type=int, nargs="*", default=None, help="default [4] (R50+)")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--places-per-batch", type=int, default=None)
    p.add_argument("--img-per-place", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="untimed steps first (pipelines: at least 2 x workers + prefetch + 1)",
    )
    p.add_argument("--num-workers", type=int, default=None, help="default: fit's default")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--prefetch", type=int, default=None, help="batches prepared ahead")
    p.add_argument("--modes", default=None, help=f"comma list (default {FULL_MODES})")
    p.add_argument("--pool", type=int, default=None, help="distinct JPEGs to copy from")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--trace",
        type=Path,
        default=None,
        metavar="DIR",
        help="after the table, profile --trace-mode end to end into DIR (torch.profiler)",
    )
    p.add_argument("--trace-mode", default=None, help="default: the default path of the device")
    p.add_argument("--trace-steps", type=int, default=None, help="default 6 (2 with --small)")
    args = p.parse_args(argv)
    small = args.small
    args.device = torch.device(args.device or ("cuda" if cuda and not small else "cpu"))
    on_cuda = args.device.type == "cuda"
    defaults = {
        "backbone": "resnet18" if small else "resnet50",
        "image_size": [64, 64] if small else [320, 320],
        "places_per_batch": 4 if small else 100,
        "steps": 2 if small else 40,
        "warmup_steps": 1 if small else 8,
        "modes": SMALL_MODES if small else FULL_MODES,
        "pool": 8 if small else 256,
        "trace_steps": 2 if small else 6,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.layers_to_crop is None:  # the paper's training config crops layer4 of ResNet50
        args.layers_to_crop = [4] if args.backbone in ("resnet50", "resnet101", "resnet152") else []
    args.image_size = tuple(args.image_size)
    args.num_workers = default_num_workers() if args.num_workers is None else args.num_workers
    args.precision = resolve_precision(args.precision, args.device)
    args.compile = args.compile == "on" or (args.compile == "auto" and on_cuda)
    args.channels_last = args.channels_last == "on" or (args.channels_last == "auto" and on_cuda)
    args.prefetch = (1 if on_cuda else 0) if args.prefetch is None else args.prefetch
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.trace_mode = args.trace_mode or default_mode(args)
    args.pipeline_warmup = 0  # the most any mode needs: the tree must hold that many batches
    for spec in args.modes + [args.trace_mode]:
        mode = parse_mode(spec)
        workers = args.num_workers if mode["workers"] is None else mode["workers"]
        prefetch = args.prefetch if mode["prefetch"] is None else mode["prefetch"]
        args.pipeline_warmup = max(args.pipeline_warmup, pipeline_warmup(args, workers, prefetch))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device
    p, k = args.places_per_batch, args.img_per_place
    places = (args.pipeline_warmup + max(args.steps, args.trace_steps)) * p
    print(f"device: {machine_summary(device)}")
    print(
        f"settings: {args.backbone} crop {args.layers_to_crop}, "
        f"{args.image_size[0]}x{args.image_size[1]}, {p} places x {k} images, "
        f"<= {args.pipeline_warmup} warm-up + {args.steps} timed steps, "
        f"precision {args.precision}, "
        f"compile {args.compile}, channels_last {args.channels_last}, "
        f"workers {args.num_workers}, prefetch {args.prefetch}",
        flush=True,
    )
    tmp = None
    root = args.data_dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="vprlib_train_bench_")
        root = Path(tmp.name)
    try:
        t = time.perf_counter()
        ensure_gsv_tree(root, places, k, args.pool)
        sizes = [f.stat().st_size for f in list((root / "Images" / CITY).iterdir())[:200]]
        print(
            f"data: {places * k} JPEGs 640x480, ~{np.mean(sizes) / 1e3:.0f} KB each "
            f"({time.perf_counter() - t:.1f} s to build or check)",
            flush=True,
        )
        trainer = Trainer(args, device)
        # model-only with each loss some path uses, before and after the paths
        loss_kinds = sorted({parse_mode(spec)["loss"] for spec in args.modes}, reverse=True)
        first = {}
        for kind in loss_kinds:
            t = time.perf_counter()
            first[kind] = model_only(trainer, args, device, kind)
            print(
                f"model-only{LOSS_SUFFIX[kind]}: {first[kind]:.0f} img/s "
                f"({time.perf_counter() - t:.1f} s incl. warm-up)"
            )
        rows = []
        for i, mode in enumerate(args.modes):
            row = measure_mode(args, device, root, mode, i, trainer)
            rows.append(row)
            print(
                f"{mode}: pipeline {row['pipeline']:.0f} img/s, end-to-end {row['e2e']:.0f} img/s",
                flush=True,
            )
        last = {}
        for kind in loss_kinds:
            last[kind] = model_only(trainer, args, device, kind)
            print(f"model-only{LOSS_SUFFIX[kind]} again: {last[kind]:.0f} img/s")
        result = report(args, first, last, rows)
        if args.trace is not None:  # last: a failure here loses no measurement
            trace_mode(args, device, root, args.trace_mode, len(rows), trainer, args.trace)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return result


def report(args, first: dict, last: dict, rows: list[dict]) -> dict:
    """Print the ratio table and the per-batch breakdown, write --json; the results.
    first / last: model-only img/s per loss kind ("library", "dense"); each path's ratio is
    against the faster of the two with its own loss."""
    device = args.device
    reference = {kind: max(first[kind], last[kind]) for kind in first}
    print()
    print(f"{'path':<16} {'pipeline img/s':>15} {'end-to-end img/s':>17} {'ratio e2e/model':>16}")
    for kind, img_s in reference.items():
        print(f"{'model' + LOSS_SUFFIX[kind]:<16} {'-':>15} {img_s:>17.0f} {1.0:>16.2f}")
    for row in rows:
        row["ratio"] = row["e2e"] / reference[parse_mode(row["mode"])["loss"]]
        print(
            f"{row['mode']:<16} {row['pipeline']:>15.0f} {row['e2e']:>17.0f} {row['ratio']:>16.2f}"
        )
    print()
    print("per batch, timed part (pipeline alone | end to end): wait = prefetch thread waiting")
    print("for the workers, host/gpu = preparing the batch on the device (host time | span on its")
    print("stream), cores = main-process CPU time / wall time")
    print(f"{'path':<16} {'wait ms':>15} {'host ms':>15} {'gpu ms':>15} {'cores':>11}")
    for row in rows:
        a, b = row["pipeline_probe"], row["e2e_probe"]
        cells = [f"{a[key]:>6.1f} |{b[key]:>6.1f}" for key in ("wait_ms", "host_ms", "gpu_ms")]
        cores = f"{a['cores']:>4.1f} |{b['cores']:>4.1f}"
        print(f"{row['mode']:<16} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} {cores:>11}")
    by_mode = {row["mode"]: row for row in rows}
    for row in rows:  # a /dense row's ratio has its own model-only: compare images/s too
        base = "/".join(part for part in row["mode"].split("/") if part != "dense")
        if base != row["mode"] and base in by_mode:
            gain = row["e2e"] / by_mode[base]["e2e"]
            print(
                f"{row['mode']} vs {base}, end to end: {gain:.2f}x "
                f"({row['e2e']:.0f} vs {by_mode[base]['e2e']:.0f} img/s)"
            )
    best = max(rows, key=lambda r: r["ratio"])  # each against model-only with its own loss
    default = default_mode(args)
    judged = [r["ratio"] for r in rows if r["mode"] == default]
    if judged:
        verdict = "met" if min(judged) >= 0.85 else "MISSED"
        if device.type != "cuda":
            verdict += "; the goal is for a GPU, this ran on the CPU"
        ratios = ", ".join(f"{r:.2f}" for r in judged)
        default_text = f"the default path ({default}) at {ratios} (goal >= 0.85: {verdict})"
    else:
        default_text = f"the default path ({default}) was not measured"
    print(f"best: {best['mode']} at {best['ratio']:.2f} of model-only; {default_text}")
    result = {
        "device": machine_summary(device),
        "settings": {
            key: (str(v) if isinstance(v, (Path, torch.device)) else v)
            for key, v in vars(args).items()
        },
        "model_only": {kind: [first[kind], last[kind]] for kind in first},
        "rows": rows,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
