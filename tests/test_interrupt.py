"""Interrupted training loses nothing: SIGKILL mid-epoch or mid-checkpoint-write, then resume.

A real `fit` runs in a subprocess (tests/_train_worker.py: resnet18 without layer4, 64x64
images of the sample, 2 steps per epoch) and is killed with SIGKILL at points it announces:
during the very first checkpoint write, in the middle of an epoch, and during a later
checkpoint write. After each kill the last complete checkpoint must be intact and loadable
(torch.load weights_only=True and load_pretrained), the half-written temporary file must not be
taken for a checkpoint, and the run resumed to the end must have exactly the weights of an
uninterrupted run with the same seed (CPU, one thread in every process).
"""

import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from _train_worker import EPOCHS, FIT_KW, build

from vprlib import fit, load_pretrained

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("_train_worker.py")
WAIT_S = 180  # generous: the machine is shared and a cold `import torch` can take 10 s


@pytest.fixture
def one_thread():
    """One intra-op thread here, as in the worker: same arithmetic order, and much faster on a
    busy 2-core machine than two contending threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Worker:
    """The training worker in a subprocess; its stdout lines arrive on a queue."""

    def __init__(self, ckpt_dir: Path, log: Path, *args: str):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), str(ckpt_dir), "--threads", "1", *args],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)  # end of output: the process exited

    def wait_for(self, marker: str) -> None:
        """Block until the worker prints `marker` (fail with its stderr if it exits first)."""
        while True:
            try:
                line = self.lines.get(timeout=WAIT_S)
            except queue.Empty:
                self.kill()
                pytest.fail(f"worker did not print {marker!r} within {WAIT_S}s; saw {self.seen}")
            if line is None:
                self.proc.wait()
                pytest.fail(
                    f"worker exited (rc {self.proc.returncode}) before {marker!r}; saw "
                    f"{self.seen}\n{self.log.read_text()[-3000:]}"
                )
            self.seen.append(line)
            if line == marker:
                return

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        assert self.proc.returncode == -signal.SIGKILL


def run_until_killed(ckpt_dir: Path, log: Path, marker: str, *args: str) -> list[str]:
    """Start the worker, SIGKILL it once it prints `marker`; return the lines it printed."""
    worker = Worker(ckpt_dir, log, *args)
    try:
        worker.wait_for(marker)
    finally:
        worker.kill()
    return worker.seen


def temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".tmp"))


def assert_complete_checkpoint(path: Path, epoch: int) -> None:
    """`path` is a whole checkpoint of `epoch`: loads with weights_only and as a model."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == epoch
    assert ckpt["global_step"] == (epoch + 1) * FIT_KW["max_steps_per_epoch"]
    assert [row["epoch"] for row in ckpt["history"]] == list(range(epoch + 1))
    model = load_pretrained(path)
    state = model.state_dict()
    assert state.keys() == ckpt["state_dict"].keys()
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(state[key], value), key


def assert_partial_file_refused(path: Path) -> None:
    """A half-written temporary file is not a loadable checkpoint, by either loader."""
    with pytest.raises((RuntimeError, EOFError, pickle.UnpicklingError)):
        torch.load(path, map_location="cpu", weights_only=True)
    with pytest.raises((ValueError, pickle.UnpicklingError)):
        load_pretrained(path)


def test_killed_runs_resume_to_the_weights_of_an_uninterrupted_run(tmp_path, one_thread):
    ckpt = tmp_path / "ckpt"
    log = tmp_path / "worker.log"
    last = ckpt / "last.ckpt"

    # 1. Killed while writing the first checkpoint: only a temporary file is left, and it
    #    is not taken for a checkpoint (resume=True finds nothing to resume from).
    run_until_killed(ckpt, log, "SAVING 0", "--pause-save", "0")
    tmps = temp_files(ckpt)
    assert [p.name for p in ckpt.iterdir()] == [tmps[0].name]
    assert tmps[0].name.startswith(".last.ckpt.") and tmps[0].stat().st_size > 0
    assert_partial_file_refused(tmps[0])
    dataset, model = build()
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        fit(model, dataset, epochs=EPOCHS, checkpoint_dir=ckpt, resume=True, **FIT_KW)

    # 2. resume="auto" starts afresh; killed mid-epoch 1 (after one of its two steps):
    #    last.ckpt of epoch 0 is complete.
    seen = run_until_killed(ckpt, log, "BATCH 1 1", "--resume", "auto", "--pause-batch", "1:1")
    assert seen == ["BATCH 0 0", "BATCH 0 1", "BATCH 1 0", "BATCH 1 1"]
    assert_complete_checkpoint(last, epoch=0)

    # 3. resume=True continues with epoch 1; killed half-way through writing epoch 2's
    #    checkpoint: last.ckpt still holds epoch 1, whole; the new temporary file is partial.
    seen = run_until_killed(ckpt, log, "SAVING 2", "--resume", "true", "--pause-save", "2")
    assert seen == ["BATCH 1 0", "BATCH 1 1", "BATCH 2 0", "BATCH 2 1", "SAVING 2"]
    assert_complete_checkpoint(last, epoch=1)
    tmps = temp_files(ckpt)
    assert len(tmps) == 2
    for tmp in tmps:
        assert_partial_file_refused(tmp)

    # 4. Resume in-process to the end; compare with an uninterrupted run of the same seed.
    dataset, model = build()
    history = fit(model, dataset, epochs=EPOCHS, checkpoint_dir=ckpt, resume=True, **FIT_KW)
    assert history["epoch"].tolist() == list(range(EPOCHS))
    assert_complete_checkpoint(last, epoch=EPOCHS - 1)

    dataset, reference = build()
    ref_history = fit(reference, dataset, epochs=EPOCHS, **FIT_KW)
    ref_state, state = reference.state_dict(), model.state_dict()
    assert state.keys() == ref_state.keys()
    worst = max((state[k].double() - ref_state[k].double()).abs().max().item() for k in state)
    assert worst <= 1e-6
    # epochs 0-1 were trained by killed subprocesses, 2-3 here: same losses all along
    for col in ("steps", "loss", "b_acc", "lr"):
        assert history[col].tolist() == pytest.approx(ref_history[col].tolist(), abs=1e-6), col
    # the training really moved the weights (the comparison above is not vacuous)
    _, init = build()
    moved = max((state[k] - init.state_dict()[k]).abs().max().item() for k in state)
    assert moved > 1e-3
