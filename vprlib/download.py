"""Released Conv-AP weights: names, the download cache and integrity checks.

The four released checkpoints live in a public Google Drive folder. `fetch_released(name)`
downloads one, once, into `torch.hub.get_dir()/checkpoints/` (the folder torch.hub and
torchvision use), through a temporary file renamed only when complete, so an interrupted
download never leaves a truncated file in the cache.

Integrity: a fresh download's size and SHA-256 are recorded in a sidecar `<file>.json`
(replacing any older record); a file found in the cache without a record is recorded once it
reads as a checkpoint. Every later use checks the file against its record and a mismatch
raises, naming the file. (Trust on first use: no hashes of the released files are
published.) A read-only cache is used as it is: without a record, with a warning.
Temporary files of downloads killed more than a day ago are removed before a new download.

Tests and mirrors: pass `url=` to download with plain urllib from any HTTP server instead of
Drive, or `downloader=` for a custom fetcher. gdown is only needed for the Drive path and is
imported inside the function.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import pickle
import time
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .fileio import atomic_open, atomic_write_text, safe_torch_load
from .progress import progress_bar

DRIVE_FOLDER_ID = "1VYPw9uGD11NgiGFgfWueLt3noJYOIuhL"
DRIVE_FOLDER_URL = f"https://drive.google.com/drive/folders/{DRIVE_FOLDER_ID}"

# Released name -> descriptor dimension (ResNet50 with layer4 + Conv-AP, s1 = s2 = 2).
RELEASED: dict[str, int] = {
    "resnet50_ConvAP_2048_2x2": 8192,
    "resnet50_ConvAP_1024_2x2": 4096,
    "resnet50_ConvAP_512_2x2": 2048,
    "resnet50_ConvAP_128_2x2": 512,
}
# The 4096-d model was trained with bicubic resizing; the others with bilinear.
BICUBIC_RELEASED = {"resnet50_ConvAP_1024_2x2"}
# Friendly aliases: convap-<descriptor dim>.
ALIASES: dict[str, str] = {f"convap-{dim}": name for name, dim in RELEASED.items()}

# A downloader writes the bytes of the released file `filename` into the open binary file.
Downloader = Callable[[str, IO[bytes]], None]


def released_name(name: str) -> str | None:
    """Canonical released name for `name` (with or without `.ckpt`, or an alias), else None."""
    stem = name[: -len(".ckpt")] if name.endswith(".ckpt") else name
    if stem in RELEASED:
        return stem
    return ALIASES.get(stem.lower())


def valid_released_names() -> list[str]:
    """Every name `load_pretrained` accepts as a released model (without `.ckpt`)."""
    return sorted(RELEASED) + sorted(ALIASES)


def cache_dir() -> Path:
    """The shared torch hub checkpoint folder: `torch.hub.get_dir()/checkpoints`."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def fetch_released(
    name: str,
    *,
    url: str | None = None,
    downloader: Downloader | None = None,
    folder: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Path to the released checkpoint `name` in the cache, downloading it on first use.

    `url`: fetch with urllib from this address instead of Google Drive; `downloader`: a
    custom `(filename, binary_file) -> None`; `folder`: cache folder (default `cache_dir()`).
    The cached file is verified against its sidecar size/SHA-256 on every call.
    """
    canonical = released_name(name)
    if canonical is None:
        raise KeyError(f"unknown released model {name!r}; valid names: {valid_released_names()}")
    filename = canonical + ".ckpt"
    path = Path(folder) if folder is not None else cache_dir()
    path = path / filename
    if path.exists():
        verify_or_record(path, check=_cached_checkpoint)
        return path
    if url is not None and downloader is not None:
        raise ValueError("pass either url or downloader, not both")
    if url is not None:
        write = functools.partial(http_download, url, progress=progress)
    elif downloader is not None:
        write = functools.partial(downloader, filename)
    else:
        write = functools.partial(gdrive_download, filename, progress=progress)
    remove_stale_downloads(path)
    download_to(path, write, check=_readable_checkpoint)
    write_record(path)  # the file just downloaded and checked; an older record would refuse it
    return path


STALE_DOWNLOAD_S = 24 * 3600


def remove_stale_downloads(path: str | os.PathLike, older_than_s: float = STALE_DOWNLOAD_S) -> None:
    """Remove the temporary files (`.<name>.*.tmp`) that downloads of `path` killed without
    cleaning up (SIGKILL, power loss) left beside it, if untouched for `older_than_s`: up to
    a whole checkpoint each. Younger ones may belong to a download still running."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
        except OSError:  # gone meanwhile, or another user's in a shared cache: leave it
            continue


def download_to(
    path: str | os.PathLike,
    write: Callable[[IO[bytes]], None],
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Run `write(file)` into a temporary file beside `path`, then `check(temporary path)`,
    and rename it onto `path` only when both succeed.

    Any exception (network error, short read, a file `check` refuses) removes the temporary
    file and propagates, so the cache never holds a file that failed.
    """
    path = Path(path)
    with atomic_open(path, "wb") as f:
        write(f)
        f.flush()
        if check is not None:
            check(Path(f.name))  # the temporary file, not yet renamed onto `path`
    return path


def _loader_error(path: Path) -> Exception | None:
    """Why `path` does not read as a whole PyTorch checkpoint, or None if it does."""
    try:
        safe_torch_load(path)
    except (ValueError, pickle.UnpicklingError) as e:
        return e
    return None


def _cached_checkpoint(path: Path) -> None:
    """Refuse to record a file found in the cache (copied there by hand, say) that does not
    read as a checkpoint: recording it would pin a broken file."""
    if (error := _loader_error(path)) is not None:
        raise ValueError(
            f"{path} is in the checkpoint cache but is not a readable checkpoint; delete it "
            f"(a download starts afresh) or replace it with the whole file. Loader said: {error}"
        ) from error


def _readable_checkpoint(tmp: Path) -> None:
    """Refuse a download that is not a whole PyTorch checkpoint: a server that closed early
    without a Content-Length, or an HTML page (Drive's quota or sign-in page) in its place."""
    if (error := _loader_error(tmp)) is not None:
        head = tmp.read_bytes()[:60]
        raise OSError(
            f"the downloaded file is not a complete PyTorch checkpoint (first bytes {head!r}); "
            f"nothing was cached. Loader said: {error}"
        ) from error


def http_download(url: str, f: IO[bytes], progress: bool = True, timeout: float = 60.0) -> int:
    """Stream `url` into the open binary file `f`; returns the byte count.

    Raises OSError naming the URL when the server cannot be reached or answers with an
    error, and when it sends fewer (or more) bytes than its Content-Length.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            expected = int(length) if length is not None else None
            bar = progress_bar(
                progress, total=expected, desc=url.rsplit("/", 1)[-1], unit="B", unit_scale=True
            )
            received = 0
            try:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
    except http.client.IncompleteRead as e:
        raise OSError(f"download of {url} ended early: {e}") from e
    except (OSError, http.client.HTTPException) as e:  # HTTP errors, refused, timeouts
        raise OSError(f"download of {url} failed: {type(e).__name__}: {e}") from e
    if expected is not None and received != expected:
        raise OSError(
            f"download of {url} incomplete: got {received} bytes, Content-Length {expected}"
        )
    return received


def gdrive_download(filename: str, f: IO[bytes], progress: bool = True) -> None:
    """Write the file `filename` of the public Drive folder into `f` (needs gdown)."""
    try:
        import gdown
    except ImportError as e:
        raise ImportError(
            "downloading the released weights needs gdown (pip install gdown), or download "
            f"{filename} from {DRIVE_FOLDER_URL} yourself and put it in {cache_dir()}"
        ) from e
    try:
        listing = gdown.download_folder(
            url=DRIVE_FOLDER_URL, skip_download=True, use_cookies=False, quiet=not progress
        )
    except Exception as e:  # gdown raises several types for network / Drive failures
        raise RuntimeError(
            f"could not list the Google Drive folder {DRIVE_FOLDER_URL} ({e}); download "
            f"{filename} by hand and put it in {cache_dir()}, or pass its path"
        ) from e
    matches = [item for item in listing if Path(item.path).name == filename]
    if not matches:
        found = sorted(Path(item.path).name for item in listing)
        raise FileNotFoundError(f"{filename} not found in {DRIVE_FOLDER_URL}; found {found}")
    try:
        gdown.download(id=matches[0].id, output=f, quiet=not progress, use_cookies=False)
    except Exception as e:  # quota, permission or network: gdown raises several types
        raise RuntimeError(
            f"could not download {filename} from {DRIVE_FOLDER_URL} ({type(e).__name__}: {e}); "
            f"download it by hand and put it in {cache_dir()}, or pass its path"
        ) from e


def file_digest(path: str | os.PathLike) -> dict[str, int | str]:
    """Size in bytes and SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the size/SHA-256 record of a cached file lives: `<file>.json` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_record(path: str | os.PathLike) -> dict[str, int | str]:
    """Write (or replace) the sidecar size/SHA-256 record of `path`; returns the digest. A
    folder that cannot be written (a shared read-only cache) gets a warning, no record."""
    path = Path(path)
    digest = file_digest(path)
    side = sidecar_path(path)
    try:
        atomic_write_text(side, json.dumps({"file": path.name, **digest}, indent=1) + "\n")
    except OSError as e:
        if side not in _UNWRITABLE_RECORDS:  # once per file and process, not at every load
            _UNWRITABLE_RECORDS.add(side)
            warnings.warn(
                f"could not write the integrity record {side} ({e}); using {path} without one",
                stacklevel=2,
            )
    return digest


_UNWRITABLE_RECORDS: set[Path] = set()


def verify_or_record(
    path: str | os.PathLike, check: Callable[[Path], None] | None = None
) -> dict[str, int | str]:
    """Check `path` against its sidecar record, or, if there is none, run `check(path)`
    (which raises for a file not worth recording) and write the record.

    Raises ValueError naming the file when its size or SHA-256 differs from the record.
    """
    path = Path(path)
    side = sidecar_path(path)
    if not side.exists():
        if check is not None:
            check(path)
        return write_record(path)
    digest = file_digest(path)
    try:
        record = json.loads(side.read_text())
        expected = {"size": int(record["size"]), "sha256": str(record["sha256"])}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable integrity record {side}: {e}") from e
    if digest != expected:
        raise ValueError(
            f"{path} does not match its recorded size/SHA-256 in {side} "
            f"(recorded {expected['size']} bytes sha256 {expected['sha256'][:16]}..., "
            f"found {digest['size']} bytes sha256 {str(digest['sha256'])[:16]}...): the file "
            "changed or is corrupt; delete it to download it again (the record is replaced)"
        )
    return digest
