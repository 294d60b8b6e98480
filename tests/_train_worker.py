"""A tiny `fit` run for the interruption tests (tests/test_interrupt.py), run as a subprocess.

    python tests/_train_worker.py CKPT_DIR --epochs 4 [--resume auto|true] [--pause-batch E:B]
                                           [--pause-save E]

It prints `BATCH <epoch> <batch>` before each training batch and `SAVING <epoch>` when a
checkpoint write is half done, so the test knows where the run is. `--pause-batch E:B` stops
(sleeps) just before batch B of epoch E, after that epoch has taken B optimizer steps: a kill
then lands mid-epoch. `--pause-save E` writes the first half of epoch E's checkpoint into its
temporary file and stops there: a kill then lands during the write. `build()` and FIT_KW are
shared with the test, which repeats the run in-process for the reference weights.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GSV_ROOT = REPO / "data" / "sample" / "GSV-Cities"
EPOCHS = 4
FIT_KW = dict(
    places_per_batch=3,
    max_steps_per_epoch=2,
    lr=0.05,
    warmup_steps=2,
    precision="fp32",
    device="cpu",
    num_workers=0,
    progress=False,
    seed=0,
)
PAUSE_S = 120  # longer than any test waits: the test kills the process first


def build():
    """(dataset, model): 64x64 images of the sample, resnet18 without layer4, 64-d Conv-AP."""
    from vprlib import GSVCitiesDataset, VPRModel

    dataset = GSVCitiesDataset(GSV_ROOT, image_size=(64, 64), seed=0)
    torch.manual_seed(0)
    model = VPRModel("resnet18", layers_to_crop=[4], agg="convap", agg_config={"out_channels": 16})
    return dataset, model


class Marked(torch.utils.data.Dataset):
    """Passes everything through to the dataset; prints a marker (and may pause) per batch."""

    def __init__(self, dataset, pause_at: tuple[int, int] | None = None):
        self.dataset, self.pause_at = dataset, pause_at
        self.epoch, self.batch = 0, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.batch = 0
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def batch_to_device(self, *args, **kw):
        return self.dataset.batch_to_device(*args, **kw)

    def collate_fn(self, items):
        # num_workers=0: collating batch b of an epoch happens after its b optimizer steps
        print(f"BATCH {self.epoch} {self.batch}", flush=True)
        if self.pause_at == (self.epoch, self.batch):
            time.sleep(PAUSE_S)
        self.batch += 1
        return self.dataset.collate_fn(items)


def pause_checkpoint_write(epoch: int) -> None:
    """Make torch.save of the checkpoint of `epoch` write half its bytes, then stop."""
    real_save = torch.save

    def save(obj, f, *args, **kw):
        if not (isinstance(obj, dict) and obj.get("epoch") == epoch) or isinstance(f, (str, Path)):
            return real_save(obj, f, *args, **kw)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kw)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        print(f"SAVING {epoch}", flush=True)
        time.sleep(PAUSE_S)
        f.write(data[len(data) // 2 :])

    torch.save = save


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint_dir")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--resume", choices=("no", "true", "auto"), default="no")
    p.add_argument("--pause-batch", default=None, help="E:B")
    p.add_argument("--pause-save", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from vprlib import fit

    pause_at = None
    if args.pause_batch:
        e, b = args.pause_batch.split(":")
        pause_at = (int(e), int(b))
    if args.pause_save is not None:
        pause_checkpoint_write(args.pause_save)
    dataset, model = build()
    resume = {"no": False, "true": True, "auto": "auto"}[args.resume]
    fit(
        model,
        Marked(dataset, pause_at),
        epochs=args.epochs,
        checkpoint_dir=args.checkpoint_dir,
        resume=resume,
        **FIT_KW,
    )
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
