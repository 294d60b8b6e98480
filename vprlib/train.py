"""Training: `fit()` runs the paper's recipe in one loop you can read top to bottom.

One step: a batch of P places x K images -> descriptors -> the miner picks the informative
pairs -> Multi-Similarity loss -> SGD step -> per-step learning-rate schedule. After each
epoch: optional validation (Recall@1/5/10 per benchmark), `last.ckpt` and `best.ckpt`.

Checkpoints are plain dicts of tensors and primitive containers, so they load with
`torch.load(path, weights_only=True)`; their "state_dict" is `model.state_dict()` in the
released key layout, so `vprlib.load_pretrained("last.ckpt")` reads them too.

Resume works at epoch granularity: checkpoints are written at the end of each epoch, so a run
killed mid-epoch loses at most that epoch. A resumed run ends with the same weights as an
uninterrupted one, because every random choice (place order, image choice, augmentation) is a
function of (seed, epoch) and the optimizer, schedule, scaler and RNG states are restored.

Several GPUs: launched by `torchrun --nproc_per_node=N -m vprlib.train ...`, fit trains with
DistributedDataParallel (process group, place sharding and rank-0 work in distributed.py).

Run from the shell: `python -m vprlib.train --help`.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .batching import check_seed, default_stages, device_batches, make_loader
from .distributed import DistContext
from .evaluate import default_num_workers, preprocess_config
from .fileio import atomic_torch_save, atomic_write_text, safe_torch_load
from .losses import DenseMultiSimilarity, batch_accuracy_tensor, get_loss, get_miner
from .progress import progress_bar
from .transforms import _size

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# lr and weight decay when fit is given None: SGD as in the paper (lr from later work), AdamW
# as in the later variant of the recipe (REFERENCE)
OPTIMIZER_DEFAULTS = {
    "sgd": {"lr": 0.05, "weight_decay": 1e-3},
    "adamw": {"lr": 2e-4, "weight_decay": 0.0},
}
OPTIMIZERS = tuple(OPTIMIZER_DEFAULTS)
RECALL_KS = (1, 5, 10)
# Arguments that must be the same when a run is resumed: they shape the optimisation itself.
RESUME_MUST_MATCH = (
    "places_per_batch",
    "lr",
    "optimizer",
    "momentum",
    "weight_decay",
    "warmup_steps",
    "milestones",
    "gamma",
    "loss",
    "miner",
    "precision",
    "seed",
    "max_steps_per_epoch",
    "num_places",
)
# Dataset settings recorded in fit_args["dataset"] (those the dataset has); a resume compares
# those both runs recorded (a wrapper dataset may hide some).
DATASET_SETTINGS = (
    "image_size",
    "img_per_place",
    "min_img_per_place",
    "random_sample",
    "augment",
    "interpolation",
    "seed",
)


# ----------------------------------------------------------------------------------------------
# Small pieces: device, seeds, schedule, checkpoints


def setup_device(device: str | torch.device | None = None) -> torch.device:
    """The device to train on: `device` if given, else CUDA when available, else CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto" -> bf16 on CUDA GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's random."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def train_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: torch.nn.Module,
    miner: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    precision: str,
    *,
    gather: bool = False,
    keep: int | None = None,
    ctx: DistContext | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch already on the device; returns (loss, b_acc).

    Forward under autocast (`precision` "bf16"/"fp16"; "fp32" none), descriptors in fp32,
    miner, loss, backward through the (fp16) scaler, optimizer step. loss and b_acc come
    back as 0-d tensors on the device, not read: reading one (`float()`) makes the host wait
    for the GPU, so fit reads them only every `log_every` steps. b_acc is NaN when there is no
    miner and the loss does not mine itself (`DenseMultiSimilarity`). Under DDP, `gather`
    all-gathers the global batch before mining (`keep`: only its first rows, dropping the
    padding of an epoch's last batch) and `ctx` averages the gradients of the loss's own
    parameters over ranks. The learning-rate schedule is the caller's.
    bench/train_throughput.py times this function as the "model-only" reference.
    """
    amp_dtype = AMP_DTYPES.get(precision)
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        descriptors = model(images)
    descriptors = descriptors.float()  # loss and mining in fp32
    if gather:  # the whole global batch on every rank, gradients flowing back
        descriptors, labels = distributed.gather_batch(descriptors, labels)
        if keep is not None:
            descriptors, labels = descriptors[:keep], labels[:keep]
    mined = miner(descriptors, labels) if miner is not None else None
    loss_value = loss_fn(descriptors, labels, mined)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss_value).backward()
    if ctx is not None:  # the loss is not inside DDP
        distributed.average_gradients(list(loss_fn.parameters()), ctx)
    scaler.step(optimizer)
    scaler.update()
    if mined is not None:
        b_acc = batch_accuracy_tensor(mined, labels.numel())
    elif isinstance(loss_fn, DenseMultiSimilarity):
        b_acc = loss_fn.last_b_acc
    else:
        b_acc = descriptors.new_full((), math.nan)  # a fill, not a copy the host waits for
    return loss_value.detach(), b_acc


def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    steps_per_epoch: int,
    milestones: Sequence[int] = (5, 10, 15, 25),
    gamma: float = 0.3,
) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based).

    Linear warm-up: (step + 1) / warmup_steps until it reaches 1, times
    gamma ** (number of milestone epochs reached by the epoch this step belongs to).
    """
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    epoch = step // steps_per_epoch
    return warm * gamma ** sum(epoch >= m for m in milestones)


def make_optimizer(
    params, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD with momentum (the paper) or AdamW (later work; momentum unused)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def _rng_state() -> dict:
    """All global RNG states as tensors and primitives (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write a training checkpoint atomically (under DDP only rank 0 should call this)."""
    atomic_torch_save(state, path)


FIT_CHECKPOINT_KEYS = (
    "state_dict",
    "epoch",
    "global_step",
    "optimizer",
    "scheduler",
    "rng",
    "history",
    "fit_args",
)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by `fit` (weights_only: tensors and primitives only).

    A file holding any other pickled object is refused without running it; a truncated file
    or one that `fit` did not write (e.g. released weights) raises naming the file.
    """
    path = Path(path)
    ckpt = safe_torch_load(path)
    missing = [k for k in FIT_CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(
            f"{path} is not a training checkpoint written by fit (missing {missing}); to start "
            "from its weights, load them into the model (load_pretrained) and fit without resume"
        )
    return ckpt


def _mining_places(fit_args: dict) -> int | None:
    """How many places the miner and the loss see together in a run: the global batch with
    one process or gather_for_mining, else each process's share. This, not the flags
    themselves, must match on resume (gather_for_mining does nothing for one process)."""
    places = fit_args.get("places_per_batch")
    world = fit_args.get("world_size", 1)
    if places is None or world == 1 or fit_args.get("gather_for_mining", False):
        return places
    return places // world


def _check_resume_args(
    ckpt: dict, fit_args: dict, model_config: Any, path: Path, val_size: Any = None
) -> None:
    """Raise naming every argument that differs from the checkpoint's run. `val_size`: the
    image size this run validates at (None: no validation); it must be the size the
    checkpoint's run validated at, as best.ckpt compares R@1 over all epochs."""
    saved = ckpt.get("fit_args", {})
    diffs = [  # keys a checkpoint of an older vprlib lacks (e.g. "dataset") are not compared
        f"{k}: checkpoint {saved[k]!r}, now {fit_args[k]!r}"
        for k in RESUME_MUST_MATCH
        if k in saved and saved[k] != fit_args[k]
    ]
    mined_then, mined_now = _mining_places(saved), _mining_places(fit_args)
    if mined_then != mined_now:
        diffs.append(
            f"places mined together: checkpoint {mined_then} ({saved.get('world_size', 1)} "
            f"process(es), gather_for_mining={saved.get('gather_for_mining', False)}), now "
            f"{mined_now} ({fit_args['world_size']}, "
            f"gather_for_mining={fit_args['gather_for_mining']})"
        )
    was, now = saved.get("dataset") or {}, fit_args["dataset"]
    diffs += [
        f"dataset {k}: checkpoint {was[k]!r}, now {now[k]!r}"
        for k in sorted(set(was) & set(now))
        if was[k] != now[k]
    ]
    saved_config = ckpt.get("model_config")
    if saved_config != model_config:
        if isinstance(saved_config, dict) and isinstance(model_config, dict):
            diffs += [
                f"model_config[{k!r}]: checkpoint {saved_config.get(k)!r}, "
                f"now {model_config.get(k)!r}"
                for k in sorted(set(saved_config) | set(model_config))
                if saved_config.get(k) != model_config.get(k)
            ]
        else:
            diffs.append(f"model_config: checkpoint {saved_config!r}, now {model_config!r}")
    was_size = (ckpt.get("preprocess") or {}).get("image_size")
    validated = any(k.endswith("_R@1") for row in ckpt.get("history", []) for k in row)
    if val_size is not None and was_size is not None and validated:
        if tuple(was_size) != tuple(val_size):
            diffs.append(
                f"validation image size: checkpoint {tuple(was_size)}, now {tuple(val_size)} "
                "(best.ckpt compares R@1 over epochs)"
            )
    if diffs:
        raise ValueError(
            f"cannot resume from {path}: arguments differ from the checkpointed run:\n  "
            + "\n  ".join(diffs)
        )


def _as_benchmarks(val) -> list:
    """`val` (None, a Benchmark, a name/path, or a list of them) -> list of Benchmarks."""
    if val is None:
        return []
    items = list(val) if isinstance(val, (list, tuple)) else [val]
    from .benchmarks import load_benchmark

    return [load_benchmark(v) if isinstance(v, (str, os.PathLike)) else v for v in items]


def _dataset_settings(dataset) -> dict:
    """The settings of `dataset` that shape its batches (`DATASET_SETTINGS`): those it has as
    plain values (numbers, text, lists of them), so the checkpoint stays weights_only-loadable."""
    settings = {}
    for key in DATASET_SETTINGS:
        value = _plain(getattr(dataset, key, None))
        if isinstance(value, (tuple, list)):
            value = [_plain(v) for v in value]
            if all(isinstance(v, (bool, int, float, str)) for v in value):
                settings[key] = value
        elif isinstance(value, (bool, int, float, str)):
            settings[key] = value
    return settings


def _plain(value: Any) -> Any:
    """numpy scalars -> python numbers, so history rows load with weights_only=True."""
    return value.item() if isinstance(value, np.generic) else value


# ----------------------------------------------------------------------------------------------
# The training loop


def fit(
    model: torch.nn.Module,
    train_dataset,
    *,
    epochs: int,
    places_per_batch: int = 100,
    lr: float | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float | None = None,
    warmup_steps: int = 650,
    milestones: Sequence[int] = (5, 10, 15, 25),
    gamma: float = 0.3,
    loss: str | torch.nn.Module = "MultiSimilarityLoss",
    miner: str | torch.nn.Module | None = "MultiSimilarityMiner",
    precision: str = "auto",
    compile: bool | str = "auto",
    channels_last: bool | None = None,
    prefetch: int | None = None,
    val=None,
    val_image_size: int | Sequence[int] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool | str = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    max_steps_per_epoch: int | None = None,
    log_every: int = 10,
    gather_for_mining: bool = False,
):
    """Train `model` on `train_dataset` (P places x K images per batch); return the history.

    Knobs (defaults follow the paper's recipe, lr from later work):
    - epochs, places_per_batch (P; K comes from the dataset), lr, optimizer ("sgd" | "adamw"),
      momentum (SGD only), weight_decay. lr / weight_decay None: 0.05 / 1e-3 for SGD, 2e-4 / 0
      for AdamW (`OPTIMIZER_DEFAULTS`); on resume, the checkpoint's. Under torchrun P is the
      GLOBAL batch, split evenly over the processes (see "Several GPUs" below).
    - warmup_steps: linear warm-up from ~0 to lr. The paper used ~500-650 steps on the full
      data (about one epoch; 650 here); the warm-up is clipped to one epoch, so short runs on small
      data reach the full lr after their first epoch (and the schedule does not depend on
      `epochs`, which keeps resuming with a larger `epochs` exact).
    - milestones, gamma: lr x gamma at each milestone epoch (0-based), as MultiStepLR.
    - loss, miner: pytorch-metric-learning class names or instances (miner None: all pairs).
      loss="DenseMultiSimilarity" with miner=None is the default pair (same values) in one
      module that never makes the host wait for the GPU (`losses.DenseMultiSimilarity`).
    - precision: "auto" = bf16 autocast on CUDA if supported, else fp16 with a GradScaler;
      fp32 on CPU. Or "fp32" / "bf16" / "fp16". The loss is always computed in fp32.
    - compile: True wraps the model in torch.compile; "auto" (default) does so on CUDA only
      (on CPU the compile time rarely pays off). channels_last: None = True on CUDA.
      prefetch: batches prepared ahead on a side CUDA stream while the step runs (None: 1
      on CUDA, 0 elsewhere; see `device_batches`); on CUDA two threads prepare them, one
      decoding, one augmenting (`device_batches(stages=2)`). On a CUDA device a
      GSVCitiesDataset with decode="auto" (its default) is trained with decode="gpu": the
      JPEGs decoded by nvJPEG, resized and RandAugmented on the GPU
      (`GSVCitiesDataset.for_device`; bench/RESULTS.md).
    - val: a Benchmark, a name/path for `load_benchmark`, or a list of them; after each epoch
      each gets R@1/5/10 columns named `<benchmark>_R@k`. val_image_size: evaluation resize
      (None: the model's `preprocess`, as `evaluate` does).
    - checkpoint_dir: writes `last.ckpt` and `history.csv` each epoch and `best.ckpt` when the
      first benchmark's R@1 improves. Checkpoints hold the model's `preprocess` with the
      validation image size, so `load_pretrained(best.ckpt)` evaluates as validation did.
      resume: True continues from `last.ckpt` (error if it is missing),
      "auto" continues if it exists and starts fresh otherwise (handy on Colab); False (a
      fresh run) refuses a checkpoint_dir that holds a last.ckpt, which it would overwrite.
    - seed: seeds torch, numpy and random at start; the place order of epoch e depends only
      on (seed, e). Which images of a place are drawn and how they are augmented follow the
      dataset's own seed (`GSVCitiesDataset(seed=...)`, default 0), not this one: for a seed
      sweep set both (`python -m vprlib.train --seed` does). Initialising the model before
      calling fit is the caller's business.
    - device: None = CUDA if available. num_workers: None = `default_num_workers()` (CPU
      cores - 2, between 1 and 12; 0 on a single core).
    - progress: per-epoch tqdm bar with loss, b_acc and images/s, updated every `log_every`
      steps. max_steps_per_epoch: cut epochs short (smoke runs).

    Several GPUs: launched by `torchrun --nproc_per_node=N` (WORLD_SIZE > 1), fit trains with
    DistributedDataParallel on cuda:LOCAL_RANK (backend nccl; gloo on the CPU). Each global
    batch of P places is the one a single process would see, split into N shards of P / N
    places (error if P is not divisible by N); gradients are averaged over the processes.
    Mining and the loss run on each process's own shard by default: Multi-Similarity mining
    then sees only P / N places, which is close to but not the same as a single process.
    gather_for_mining=True all-gathers descriptors and labels (gradients flow) and computes
    the loss on the whole global batch: the same result as one process with batch P, up to
    float rounding (and BatchNorm layers being trained, which use per-process statistics).
    (An epoch's last, partial batch is padded with places from the epoch's start so that it
    splits evenly; with gather_for_mining the padding is dropped after the gather.) A loss
    with its own parameters starts from rank 0's values on every rank.
    Rank 0 alone validates and writes checkpoints; every rank returns the same history.
    Random streams other than the data's are seeded with seed + rank. checkpoint_dir must be
    visible to every rank (resume: each rank reads last.ckpt; a folder only some ranks see is
    an error). In a process group you created yourself, its timeout must cover rank 0's
    validation, during which the other ranks wait (fit's own group waits up to 3 hours).
    A resume must mine as many places together as the checkpoint's run did (the global
    batch with one process or gather_for_mining, else P / N).

    Returns a DataFrame with one row per epoch: epoch (0-based), steps (optimizer steps so
    far), loss and b_acc (epoch means), lr (of the epoch's last step), seconds and
    images_per_s (training part of the epoch), then `<benchmark>_R@1/5/10` in [0, 1].
    b_acc is the share of images that produced no hard positive pair (see losses.py); NaN
    without a miner (unless the loss mines itself, as DenseMultiSimilarity does).
    """
    import pandas as pd

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if optimizer not in OPTIMIZER_DEFAULTS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    check_seed(seed)
    dense = loss == "DenseMultiSimilarity" or isinstance(loss, DenseMultiSimilarity)
    if dense and miner is not None:
        raise ValueError(
            "loss DenseMultiSimilarity mines its own pairs: pass miner=None "
            f"(--miner none on the command line); got miner={miner!r}"
        )
    lr_given, decay_given = lr is not None, weight_decay is not None
    lr = OPTIMIZER_DEFAULTS[optimizer]["lr"] if lr is None else lr
    if weight_decay is None:
        weight_decay = OPTIMIZER_DEFAULTS[optimizer]["weight_decay"]
    if places_per_batch < 2:
        raise ValueError(f"places_per_batch must be >= 2, got {places_per_batch}")
    if resume not in (False, True, "auto"):
        raise ValueError(f"resume must be False, True or 'auto', got {resume!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume needs checkpoint_dir (where last.ckpt is)")
    if max_steps_per_epoch is not None and max_steps_per_epoch < 1:
        raise ValueError(f"max_steps_per_epoch must be >= 1 or None, got {max_steps_per_epoch}")
    if log_every < 1:
        raise ValueError(
            f"log_every must be >= 1 (steps between progress updates), got {log_every}"
        )
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0 (the lr factor at each milestone), got {gamma}")
    if any(int(m) != m or m < 0 for m in milestones):
        raise ValueError(f"milestones must be epoch numbers >= 0, got {list(milestones)}")
    if len(train_dataset) < places_per_batch:
        raise ValueError(
            f"places_per_batch={places_per_batch} but the training dataset has "
            f"{len(train_dataset)} places: every batch would hold {len(train_dataset)}; "
            "lower places_per_batch"
        )
    benchmarks = _as_benchmarks(val)
    val_size = None  # the image size validation resizes to
    if benchmarks:  # a bad size would otherwise surface only after the first epoch
        val_size = preprocess_config(model, val_image_size)["image_size"]
        train_size = getattr(train_dataset, "image_size", None)
        train_size = _size(train_size) if train_size is not None else None
        if val_image_size is None and train_size is not None and train_size != val_size:
            warnings.warn(
                f"validating at {val_size[0]}x{val_size[1]} (the model's preprocess) while "
                f"training at {train_size[0]}x{train_size[1]}; checkpoints record the "
                "validation size for load_pretrained. Pass val_image_size= (or set "
                "model.preprocess) to choose",
                stacklevel=2,
            )
    # torchrun (WORLD_SIZE > 1): join the process group, one device per rank (distributed.py).
    world_size, rank, local_rank = distributed.torchrun_ranks()
    per_rank = distributed.places_per_rank(places_per_batch, world_size)  # raises before joining
    if per_rank < 2 and not gather_for_mining:
        raise ValueError(
            f"places_per_batch={places_per_batch} over {world_size} processes leaves {per_rank} "
            "place per process: mining within a process finds no negative pairs (the loss "
            "would be 0 and nothing would train); raise places_per_batch or set "
            "gather_for_mining=True"
        )
    ctx, device = distributed.init_distributed(setup_device(device), world_size, rank, local_rank)
    try:  # the group is left also when training raises, so a later fit can join again
        progress = progress and ctx.is_main
        precision = resolve_precision(precision, device)
        channels_last = device.type == "cuda" if channels_last is None else channels_last
        prefetch = (1 if device.type == "cuda" else 0) if prefetch is None else prefetch
        # decoding (nvJPEG makes the host wait) and augmenting in two threads; same batches.
        # With decode="gpu": 0.74-0.80 of the step's speed on an H200 (0.76 in one thread,
        # within noise; the old default mixed:2 gave 0.68): bench/RESULTS.md
        stages = default_stages(device, prefetch)
        num_workers = default_num_workers() if num_workers is None else num_workers
        ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        fit_args = {
            "epochs": epochs,
            "places_per_batch": places_per_batch,
            "lr": lr,
            "optimizer": optimizer,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "warmup_steps": warmup_steps,
            "milestones": [int(m) for m in milestones],
            "gamma": gamma,
            "loss": loss if isinstance(loss, str) else type(loss).__name__,
            "miner": miner if isinstance(miner, str) or miner is None else type(miner).__name__,
            "precision": precision,
            "seed": seed,
            "max_steps_per_epoch": max_steps_per_epoch,
            "num_places": len(train_dataset),
            "world_size": ctx.world_size,
            "gather_for_mining": gather_for_mining,
            "dataset": _dataset_settings(train_dataset),
        }
        seed_everything(seed + ctx.rank)
        if hasattr(train_dataset, "for_device"):  # decode="auto": nvJPEG + GPU RandAugment on CUDA
            train_dataset = train_dataset.for_device(device)

        # Model, loss, miner, optimizer, schedule, scaler.
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        loss_fn = (get_loss(loss) if isinstance(loss, str) else loss).to(device)
        distributed.broadcast_module(loss_fn, ctx)  # a loss's own parameters start equal too
        miner_fn = get_miner(miner) if isinstance(miner, str) else miner
        params = [p for p in [*model.parameters(), *loss_fn.parameters()] if p.requires_grad]
        opt = make_optimizer(params, optimizer, lr, momentum, weight_decay)
        loader, sampler = make_loader(
            train_dataset,
            places_per_batch,
            seed,
            num_workers,
            device,
            max_steps_per_epoch,
            world_size=ctx.world_size,
            rank=ctx.rank,
        )
        steps_per_epoch = len(loader)
        schedule = partial(
            lr_factor,
            warmup_steps=min(warmup_steps, steps_per_epoch),
            steps_per_epoch=steps_per_epoch,
            milestones=tuple(milestones),
            gamma=gamma,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        model_config = getattr(model, "config", None)
        # what validation feeds the model, saved with the weights for load_pretrained
        has_preprocess = isinstance(getattr(model, "preprocess", None), dict)  # a VPRModel
        saved_preprocess = preprocess_config(model, val_image_size) if has_preprocess else None

        # Resume: weights, optimizer, schedule, scaler, RNG and history from last.ckpt.
        start_epoch, global_step, history = 0, 0, []
        last_path = ckpt_dir / "last.ckpt" if ckpt_dir is not None else None
        if last_path is not None:  # every rank must see the same folder, or they would start apart
            seen = distributed.gather_objects(last_path.is_file(), ctx)
            if any(seen) and not all(seen):
                blind = [r for r, s in enumerate(seen) if not s]
                raise FileNotFoundError(
                    f"{last_path} exists for some processes but not for ranks {blind}: "
                    "checkpoint_dir must be a folder every process sees (a shared disk)"
                )
            if all(seen) and not resume:  # a fresh run would overwrite it after one epoch
                raise FileExistsError(
                    f"{last_path} holds an earlier run: resume=True or 'auto' (--resume) "
                    "continues it; to start over, choose another checkpoint_dir or delete that one"
                )
        if resume == "auto" and not last_path.is_file():
            warnings.warn(
                f"resume='auto': no checkpoint at {last_path}, starting fresh", stacklevel=2
            )
        elif resume:
            if not last_path.is_file():
                raise FileNotFoundError(
                    f"resume=True but there is no checkpoint at {last_path}; "
                    "use resume='auto' to start fresh when it is missing"
                )
            ckpt = load_checkpoint(last_path)
            for key, given in (("lr", lr_given), ("weight_decay", decay_given)):
                saved = ckpt.get("fit_args", {}).get(key)
                if not given and saved is not None:  # None: the run's own (its optimizer state)
                    fit_args[key] = saved
            _check_resume_args(ckpt, fit_args, model_config, last_path, val_size)
            model.load_state_dict(ckpt["state_dict"])
            opt.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            if ckpt.get("loss"):
                loss_fn.load_state_dict(ckpt["loss"])
            rngs = ckpt.get("rng_per_rank") or [ckpt["rng"]]
            if ctx.rank < len(rngs):
                _set_rng_state(rngs[ctx.rank])
            else:  # more processes than the checkpointed run: a fresh stream for this rank
                seed_everything(seed + ctx.rank)
            start_epoch, global_step = ckpt["epoch"] + 1, ckpt["global_step"]
            history = list(ckpt["history"])
        key_metric = f"{benchmarks[0].name}_R@1" if benchmarks else None
        # rows of a resumed run saved before validation was added have no such column
        best = (
            max((row.get(key_metric, -1.0) for row in history), default=-1.0)
            if key_metric
            else None
        )

        use_compile = compile is True or (compile == "auto" and device.type == "cuda")
        train_model = distributed.wrap_model(model, ctx, device)  # DDP under torchrun
        forward = torch.compile(train_model) if use_compile else train_model
        gather = gather_for_mining and ctx.enabled
        tail_real, tail_padded = distributed.tail_padding(
            sampler.num_samples, places_per_batch, ctx.world_size
        )

        for epoch in range(start_epoch, epochs):
            sampler.set_epoch(epoch)
            if hasattr(train_dataset, "set_epoch"):
                train_dataset.set_epoch(epoch)
            model.train()
            bar = progress_bar(
                progress,
                total=steps_per_epoch,
                desc=f"epoch {epoch + 1}/{epochs}",
                dynamic_ncols=True,
            )
            # sums stay on the device: reading a step's loss makes the host wait for the GPU
            sum_dtype = torch.float32 if device.type == "mps" else torch.float64  # no fp64 there
            loss_sum = torch.zeros((), dtype=sum_dtype, device=device)
            bacc_sum = torch.zeros((), dtype=sum_dtype, device=device)
            steps, images, step_lr = 0, 0, math.nan
            t0 = time.perf_counter()
            batches = device_batches(
                loader, train_dataset, device, channels_last, prefetch, stages=stages
            )
            with contextlib.closing(batches):
                for x, labels in batches:
                    images += labels.numel()  # this rank's images
                    step_lr = opt.param_groups[0]["lr"]
                    keep = None  # gathered: drop the padding of the epoch's last batch
                    if gather and tail_padded and steps == steps_per_epoch - 1:
                        per_rank = (tail_real + tail_padded) // ctx.world_size
                        keep = tail_real * (labels.numel() // per_rank)
                    loss_value, b_acc = train_step(
                        forward,
                        x,
                        labels,
                        loss_fn,
                        miner_fn,
                        opt,
                        scaler,
                        precision,
                        gather=gather,
                        keep=keep,
                        ctx=ctx,
                    )
                    scheduler.step()

                    steps += 1
                    global_step += 1
                    loss_sum += loss_value
                    bacc_sum += b_acc
                    if bar is not None:
                        bar.update(1)
                        if steps % log_every == 0 or steps == steps_per_epoch:
                            shown = f"{float(loss_value):.4f}", f"{float(b_acc):.3f}"  # waits
                            rate = images / (time.perf_counter() - t0)
                            bar.set_postfix(loss=shown[0], b_acc=shown[1], img_s=f"{rate:.0f}")
            loss_sum, bacc_sum = loss_sum.item(), bacc_sum.item()  # waits for the last step
            seconds = time.perf_counter() - t0
            # Under DDP: means over all ranks' steps, images of all ranks; rank 0 validates and
            # its row goes to every rank (the others wait in `from_main` meanwhile).
            loss_sum, bacc_sum, images = distributed.sum_over_ranks(
                [loss_sum, bacc_sum, images], ctx, device
            )
            row = {
                "epoch": epoch,
                "steps": global_step,
                "loss": loss_sum / (max(steps, 1) * ctx.world_size),
                "b_acc": bacc_sum / (max(steps, 1) * ctx.world_size),
                "lr": step_lr,
                "seconds": seconds,
                "images_per_s": images / seconds if seconds > 0 else math.nan,
            }
            if ctx.is_main:
                row.update(validate(model, benchmarks, device, num_workers, val_image_size))
            row = distributed.from_main(row, ctx)
            model.train()
            if bar is not None:
                shown = {
                    k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "b_acc") or "R@1" in k
                }
                bar.set_postfix(shown)
                bar.close()
            history.append({k: _plain(v) for k, v in row.items()})

            if ckpt_dir is not None:  # every rank's RNG state; rank 0 writes, the others wait
                rngs = distributed.gather_objects(_rng_state(), ctx)
            if ckpt_dir is not None and ctx.is_main:
                state = {
                    "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "model_config": model_config,
                    "preprocess": saved_preprocess,
                    "epoch": epoch,
                    "global_step": global_step,
                    "optimizer": opt.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "loss": loss_fn.state_dict() if list(loss_fn.parameters()) else None,
                    "rng": rngs[0],
                    "rng_per_rank": rngs,
                    "history": history,
                    "fit_args": fit_args,
                }
                save_checkpoint(ckpt_dir / "last.ckpt", state)
                atomic_write_text(
                    ckpt_dir / "history.csv", pd.DataFrame(history).to_csv(index=False)
                )
                if key_metric is not None and row[key_metric] > best:
                    best = row[key_metric]
                    save_checkpoint(ckpt_dir / "best.ckpt", state)
            distributed.barrier(ctx)
        return pd.DataFrame(history)
    finally:
        distributed.cleanup(ctx)


def validate(
    model: torch.nn.Module,
    benchmarks: list,
    device: torch.device,
    num_workers: int,
    image_size: int | Sequence[int] | None = None,
) -> dict:
    """Recall@1/5/10 of `model` on each benchmark, as `{"<name>_R@k": fraction}`."""
    if not benchmarks:
        return {}
    from .evaluate import evaluate

    out = {}
    for bench in benchmarks:
        res = evaluate(
            model,
            bench,
            device=device,
            num_workers=num_workers,
            ks=RECALL_KS,
            progress=False,
            image_size=image_size,
        )
        for k in RECALL_KS:
            out[f"{bench.name}_R@{k}"] = float(res.recalls[k])
    return out


if __name__ == "__main__":  # python -m vprlib.train: the command line lives in train_cli.py
    from vprlib.train_cli import main

    main(sys.argv[1:])
