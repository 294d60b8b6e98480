"""The four Makefile targets the README promises, exercised for real (in the existing .venv)."""

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _make(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")} | (env or {})
    return subprocess.run(
        ["make", "-C", str(REPO), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_test_runs_ruff_then_pytest():
    # A small real test file keeps this from recursing into the whole suite.
    r = _make("test", "TEST_PATHS=tests/test_fileio.py")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ruff check" in r.stdout
    assert " passed" in r.stdout


def test_make_sample_data_is_deterministic(tmp_path, sample_root):
    out = tmp_path / "sample"
    r = _make("sample-data", f"SAMPLE_OUT={out}")
    assert r.returncode == 0, r.stdout + r.stderr
    made = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(sample_root) for p in sample_root.rglob("*") if p.is_file())
    assert made == committed
    for rel in made:
        assert (out / rel).read_bytes() == (sample_root / rel).read_bytes(), rel


@pytest.mark.slow
def test_make_notebooks_writes_figures(tmp_path):
    """`make notebooks` runs a notebook and writes its figures where VPRLIB_FIGURES says
    (../figures by default), leaving the committed figures alone."""
    figures = tmp_path / "figures"
    committed = {p: p.read_bytes() for p in (REPO / "figures").glob("*.png")}
    r = _make(
        "notebooks",
        "NOTEBOOK_ARGS=--only 01_explore_dataset.ipynb",
        env={"VPRLIB_FIGURES": str(figures)},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    written = sorted(p.name for p in figures.glob("*.png"))
    assert "01_images_per_place.png" in written, written
    assert all(PNG_SIGNATURE == (figures / n).read_bytes()[:8] for n in written)
    assert {p: p.read_bytes() for p in (REPO / "figures").glob("*.png")} == committed


def test_make_lab_serves_jupyterlab():
    port = _free_port()
    args = "LAB_ARGS=--no-browser --IdentityProvider.token=vprlib-test --ServerApp.ip=127.0.0.1"
    proc = subprocess.Popen(
        ["make", "-C", str(REPO), "lab", f"PORT={port}", args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/api/contents?token=vprlib-test"
        deadline = time.time() + 90
        status, body = None, b""
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    status, body = resp.status, resp.read()
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(1)
        assert status == 200, proc.stdout.read().decode() if proc.poll() is not None else "timeout"
        assert b"01_explore_dataset.ipynb" in body
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_venv_build_stops_early_when_the_disk_is_too_full(tmp_path):
    """A fresh .venv needs ~6.3 GB; with too little free space make says so before pip starts."""
    venv = tmp_path / "venv"
    r = _make(f"{venv}/.installed", f"VENV={venv}", "MIN_FREE_GB=1000000")
    assert r.returncode != 0
    assert "GB free on the disk" in r.stderr and "MIN_FREE_GB" in r.stderr, r.stderr
    assert not venv.exists(), "nothing may be built when the check fails"
