"""Atomic writes: the target is either the old file or the complete new one."""

import pytest
import torch

from vprlib.fileio import atomic_open, atomic_torch_save, atomic_write_text


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    atomic_write_text(p, "first")
    atomic_write_text(p, "second")
    assert p.read_text() == "second"
    assert [x.name for x in p.parent.iterdir()] == ["a.txt"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(p) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_torch_save_loads_weights_only(tmp_path):
    p = tmp_path / "w.pt"
    atomic_torch_save({"w": torch.arange(3)}, p)
    assert torch.equal(torch.load(p, weights_only=True)["w"], torch.arange(3))


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "x", "a"):
            pass
