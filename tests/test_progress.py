"""progress_bar: a tqdm bar when asked for and available, else the iterable unchanged."""

import sys

from vprlib.progress import progress_bar


def test_disabled_returns_the_iterable_or_none():
    items = [1, 2, 3]
    assert progress_bar(False, items, total=3) is items
    assert progress_bar(False, total=3) is None


def test_enabled_wraps_with_tqdm():
    from tqdm.auto import tqdm

    bar = progress_bar(True, range(4), total=4, disable=True)
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2, 3]


def test_missing_tqdm_falls_back_to_the_iterable(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import raises ImportError
    items = [1, 2]
    assert progress_bar(True, items, total=2) is items
    assert progress_bar(True, total=2) is None
