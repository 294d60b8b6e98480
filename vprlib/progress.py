"""One progress-bar helper for training, extraction and downloads (tqdm is optional)."""

from __future__ import annotations

from typing import Any


def progress_bar(enabled: bool, iterable: Any = None, **tqdm_kwargs: Any) -> Any:
    """A tqdm.auto bar (notebook-friendly) when `enabled` and tqdm is installed.

    Otherwise `iterable` unchanged (None when no iterable is given), so callers can loop over
    the result either way and check `bar is not None` before updating a manual bar.
    """
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return iterable
        return tqdm(iterable, **tqdm_kwargs)
    return iterable
