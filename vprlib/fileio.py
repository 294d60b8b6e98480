"""Atomic file writes: a reader never sees a half-written file.

Every file vprlib writes (checkpoints, downloads, results, sample data) goes through
these helpers: write to a temporary file in the same folder, fsync, then rename.
A crash leaves either the old file or the new one, never a truncated mix.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for writers that need a file name (e.g. a numpy
    memmap); on success fsync it and rename it onto `path`, on failure remove it. A symlink
    at `path` is replaced by the new file (the file it pointed to is left as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _apply_mode(tmp, path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on success fsync it and rename it onto `path`."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode must be 'wb' or 'w', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` through a temporary file, so an interrupted save never replaces a good file."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def safe_torch_load(path: str | os.PathLike) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, with errors that name the file.

    Only tensors and plain containers are unpickled: a file holding anything else (which
    could run code on an unsafe load) is refused with pickle.UnpicklingError and its payload
    never runs; a truncated or foreign file raises ValueError.
    """
    import errno
    import pickle
    import struct

    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = [ln for ln in lines if not ln.startswith("Check the documentation")][-1:]
        raise pickle.UnpicklingError(
            f"refused to load {path}: torch.load(weights_only=True) accepts only tensors and "
            "plain containers, and this file holds something else (pickled objects, which "
            "could run code on an unsafe load, or it is not a PyTorch checkpoint at all). "
            f"Loader said: {' '.join(detail)}"
        ) from e
    except (
        RuntimeError, EOFError, KeyError, IndexError, ValueError, struct.error, OSError
    ) as e:  # fmt: skip
        # what torch.load raises on an empty, truncated or foreign file, depending on where
        # the bytes stop making sense (OSError "Invalid argument": a small cut zip file;
        # IndexError "pop from empty list": a CSV file)
        if isinstance(e, OSError) and e.errno != errno.EINVAL:
            raise  # a disk or permission problem, not a bad file
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint (truncated?): {type(e).__name__}: {e}"
        ) from e


def _apply_mode(tmp: str | os.PathLike, target: Path) -> None:
    # mkstemp creates 0600 files; give the result the mode a plain open() would have: the
    # existing file's mode when overwriting, else 0666 less the umask.
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)


def _fsync_dir(folder: Path) -> None:
    # Make the rename itself durable; not every filesystem allows opening a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
