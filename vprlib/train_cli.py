"""Command line for long training runs: `python -m vprlib.train --help`.

Builds a GSVCitiesDataset and a VPRModel from the arguments, runs `fit`, prints the history
and writes history.csv beside the checkpoints. Under `torchrun --nproc_per_node=N` only rank 0
prints and writes (see README, "Several GPUs").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import distributed
from .train import OPTIMIZERS, PRECISIONS, fit, seed_everything


def _resume_arg(text: str) -> bool | str:
    if text == "auto":
        return "auto"
    raise argparse.ArgumentTypeError(f"--resume takes no value or 'auto', got {text!r}")


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to help texts, except where the default is None (the text
    says what None means) or the text already names the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "(default" in text:
            return text
        return super()._get_help_string(action)


def _miner_arg(text: str) -> str | None:
    return None if text.lower() == "none" else text


def _gsv_root(data_root: str | None) -> Path:
    """The GSV-Cities folder: --data-root (itself or its GSV-Cities/), else the env variables."""
    if data_root is None:
        data_root = os.environ.get("GSV_CITIES_ROOT") or os.environ.get("VPRLIB_DATA")
        if data_root is None:
            raise FileNotFoundError("give --data-root (or set GSV_CITIES_ROOT or VPRLIB_DATA)")
    root = Path(data_root)
    for candidate in (root, root / "GSV-Cities"):
        if (candidate / "Dataframes").is_dir():
            return candidate
    raise FileNotFoundError(f"no Dataframes/ folder in {root} or {root / 'GSV-Cities'}")


def _benchmarks_root(val: str, given: str | None, gsv_root: Path) -> str | None:
    """The root for one --val entry: --benchmarks-root, else for a set's name (not a path)
    the env variables (load_benchmark reads them), else the `benchmarks/` folder beside the
    GSV-Cities folder when there is one. A path keeps load_benchmark's own default."""
    if given is not None or Path(val).expanduser().exists():
        return given
    if os.environ.get("VPR_BENCHMARKS_ROOT") or os.environ.get("VPRLIB_DATA"):
        return None
    beside = gsv_root.parent / "benchmarks"
    return str(beside) if beside.is_dir() else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vprlib.train",
        description="Train a VPR model on GSV-Cities (P places x K images, Multi-Similarity loss).",
        formatter_class=_DefaultsHelp,
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data-root",
        help="GSV-Cities folder or a folder holding GSV-Cities/ "
        "(default: $GSV_CITIES_ROOT, else $VPRLIB_DATA)",
    )
    d.add_argument("--cities", nargs="+", default=None, help="city names (default: all)")
    d.add_argument(
        "--image-size",
        nargs=2,
        type=int,
        default=[320, 320],
        metavar=("H", "W"),
        help="training resize",
    )
    d.add_argument("--img-per-place", type=int, default=4, help="K images per place in a batch")
    d.add_argument(
        "--min-img-per-place", type=int, default=4, help="places with fewer are left out"
    )
    d.add_argument(
        "--decode",
        choices=("auto", "cpu", "gpu", "mixed"),
        default="auto",
        help="where JPEGs are decoded and augmented (auto: gpu on CUDA, else cpu)",
    )
    m = p.add_argument_group("model")
    m.add_argument("--backbone", default="resnet50", help="a torchvision ResNet name")
    m.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ImageNet weights for the backbone (downloaded by torchvision)",
    )
    m.add_argument(
        "--layers-to-freeze",
        type=int,
        default=2,
        help="conv1+bn1 and layer1..N get no gradient (-1: train everything)",
    )
    m.add_argument(
        "--layers-to-crop",
        nargs="*",
        type=int,
        default=[4],
        help="ResNet layers to drop (the paper's training default drops layer4; "
        "give the flag with no value to keep all)",
    )
    m.add_argument("--agg", default="convap", help="convap, gem, cosplace, mixvpr, netvlad or avg")
    m.add_argument("--agg-config", type=json.loads, default=None, help="JSON dict")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=30, help="the paper: 30")
    t.add_argument("--places-per-batch", type=int, default=100, help="P places per (global) batch")
    t.add_argument(
        "--lr",
        type=float,
        default=None,
        help="base lr (default 0.05 for SGD: the paper used 0.03; 2e-4 for AdamW)",
    )
    t.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD only")
    t.add_argument(
        "--weight-decay", type=float, default=None, help="default 1e-3 for SGD, 0 for AdamW"
    )
    t.add_argument(
        "--warmup-steps", type=int, default=650, help="linear warm-up (clipped to one epoch)"
    )
    t.add_argument(
        "--milestones", nargs="*", type=int, default=[5, 10, 15, 25], help="epochs where lr x gamma"
    )
    t.add_argument("--gamma", type=float, default=0.3, help="lr factor at each milestone")
    t.add_argument(
        "--loss",
        default="MultiSimilarityLoss",
        help="a pytorch-metric-learning loss, or DenseMultiSimilarity (with --miner none: the "
        "default pair in one module that never makes the host wait for the GPU)",
    )
    t.add_argument(
        "--miner",
        type=_miner_arg,
        default="MultiSimilarityMiner",
        help="a pytorch-metric-learning miner name, or 'none' for the loss on all pairs",
    )
    t.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 on CUDA (fp16 where unsupported), fp32 on CPU",
    )
    t.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile the model (auto: on CUDA only)",
    )
    t.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format (default: on CUDA only)",
    )
    t.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="batches prepared ahead on a side stream (default: 1 on CUDA, else 0)",
    )
    t.add_argument("--log-every", type=int, default=10, help="progress-bar refresh, in steps")
    t.add_argument("--seed", type=int, default=0, help="place order and augmentation")
    t.add_argument("--device", default=None, help="None: CUDA when available")
    t.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers (None: cores - 2, at most 12)",
    )
    t.add_argument(
        "--max-steps-per-epoch", type=int, default=None, help="cut epochs short (smoke runs)"
    )
    t.add_argument(
        "--gather-for-mining",
        action="store_true",
        help="under torchrun: mine and compute the loss on the whole global batch "
        "(all ranks' descriptors), as a single process would",
    )
    t.add_argument("--no-progress", action="store_true")
    o = p.add_argument_group("validation and checkpoints")
    o.add_argument("--val", nargs="*", default=[], help="benchmark names or folders")
    o.add_argument(
        "--val-image-size",
        nargs=2,
        type=int,
        default=None,
        metavar=("H", "W"),
        help="evaluation resize (default: the training --image-size)",
    )
    o.add_argument(
        "--benchmarks-root",
        default=None,
        help="where named benchmarks live (default: $VPR_BENCHMARKS_ROOT, "
        "else $VPRLIB_DATA/benchmarks, else benchmarks/ beside --data-root's GSV-Cities)",
    )
    o.add_argument(
        "--checkpoint-dir",
        default=None,
        help="where last.ckpt, best.ckpt and history.csv go "
        "(None: no checkpoints; --resume needs it)",
    )
    o.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        type=_resume_arg,
        help="continue from <checkpoint-dir>/last.ckpt; 'auto': only if it exists",
    )
    return p


def main(argv: Sequence[str] | None = None):
    """CLI entry: build dataset and model from the arguments, train, print and save history."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .benchmarks import load_benchmark
    from .gsv_dataset import GSVCitiesDataset
    from .models import VPRModel

    try:  # data that is not where the arguments say: a usage error, not a traceback
        gsv_root = _gsv_root(args.data_root)
        roots = [_benchmarks_root(v, args.benchmarks_root, gsv_root) for v in args.val]
        val = [load_benchmark(v, root=root) for v, root in zip(args.val, roots, strict=True)]
    except FileNotFoundError as e:
        parser.error(str(e))
    dataset = GSVCitiesDataset(
        gsv_root,
        cities=args.cities,
        img_per_place=args.img_per_place,
        min_img_per_place=args.min_img_per_place,
        image_size=tuple(args.image_size),
        seed=args.seed,
        decode=args.decode,
    )
    seed_everything(args.seed)  # the same initial weights for the same --seed
    model = VPRModel(
        backbone=args.backbone,
        pretrained=args.pretrained,
        layers_to_freeze=args.layers_to_freeze,
        layers_to_crop=tuple(args.layers_to_crop),
        agg=args.agg,
        agg_config=args.agg_config,
    )
    kw = dict(
        epochs=args.epochs,
        places_per_batch=args.places_per_batch,
        lr=args.lr,
        optimizer=args.optimizer,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        milestones=tuple(args.milestones),
        gamma=args.gamma,
        loss=args.loss,
        miner=args.miner,
        precision=args.precision,
        compile={"on": True, "off": False}.get(args.compile, "auto"),
        channels_last=args.channels_last,
        prefetch=args.prefetch,
        val=val or None,
        val_image_size=tuple(args.val_image_size or args.image_size),
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        seed=args.seed,
        device=args.device,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        max_steps_per_epoch=args.max_steps_per_epoch,
        log_every=args.log_every,
        gather_for_mining=args.gather_for_mining,
    )
    try:
        history = fit(model, dataset, **kw)
    except FileExistsError as e:  # a fresh run into a folder holding one: the user's call
        parser.error(str(e))
    if distributed.is_main_process():  # under torchrun only rank 0 prints (fit wrote history.csv)
        print(history.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return history


if __name__ == "__main__":
    main(sys.argv[1:])
