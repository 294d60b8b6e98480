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


def test_written_files_get_umask_permissions_not_0600(tmp_path):
    import os

    p = tmp_path / "fig.png"
    atomic_write_text(p, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_path_renames_on_success_and_cleans_up_on_failure(tmp_path):
    from vprlib.fileio import atomic_path

    target = tmp_path / "d.npy"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"data")
        assert not target.exists()
    assert target.read_bytes() == b"data"
    with pytest.raises(OSError, match="disk"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError("disk full")
    assert target.read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == ["d.npy"]


def test_overwriting_keeps_the_files_mode(tmp_path):
    p = tmp_path / "private.txt"
    p.write_text("old")
    p.chmod(0o600)
    atomic_write_text(p, "new")
    assert p.read_text() == "new" and p.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"<!DOCTYPE html><html>quota</html>",
        b"PK\x03\x04 truncated zip",
        b"epoch,steps,loss\n0,2,1.6\n",  # a history.csv: IndexError inside torch's unpickler
    ],
    ids=["empty", "html", "broken-zip", "csv"],
)
def test_safe_torch_load_names_the_file_for_any_unreadable_bytes(tmp_path, content):
    import pickle

    from vprlib.fileio import safe_torch_load

    p = tmp_path / "bad.ckpt"
    p.write_bytes(content)
    with pytest.raises((ValueError, pickle.UnpicklingError), match=r"bad\.ckpt"):
        safe_torch_load(p)
