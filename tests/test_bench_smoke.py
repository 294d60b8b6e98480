"""Every bench script runs (--small) and prints its ratio table, so none of them rots.

Each runs in a fresh subprocess, as `make bench` would run it; the numbers themselves are
not checked (this machine's timings are noise), only that they are there and make sense.
"""

import gzip
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


def run_small(script: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--small"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout


def positive(text: str) -> float:
    value = float(text)
    assert math.isfinite(value) and value > 0, text
    return value


@pytest.mark.parametrize(
    ("script", "ratio_line"),
    [
        ("loader.py", rf"ratio vprlib/reference: {NUMBER}x"),
        ("dataframes.py", rf"ratio read_gsv_dataframes/bare: {NUMBER}x"),
        ("search.py", rf"time ratio vprlib/faiss: {NUMBER}x"),
        ("ms_loss.py", rf"ratio dense/library: {NUMBER}x"),
    ],
)
def test_cpu_bench_prints_its_ratio(script, ratio_line):
    out = run_small(script)
    match = re.search(ratio_line, out)
    assert match, out
    positive(match[1])


def table_rows(out: str, header: str) -> dict[str, list[str]]:
    """Rows after the table header line, up to the next blank line: first cell -> the rest."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == header.split())
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip() or line.startswith(("best:", "search")):
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def test_train_throughput_prints_its_ratio_table():
    out = run_small("train_throughput.py")
    rows = table_rows(out, "path pipeline img/s end-to-end img/s ratio e2e/model")
    modes = ["cpu", "cpu/dense", "mixed:2", "gpu", "gpu/2s/p1"]
    assert list(rows) == ["model", "model/dense", *modes], out
    assert rows["model"][-1] == rows["model/dense"][-1] == "1.00"
    assert re.search(rf"^cpu/dense vs cpu, end to end: {NUMBER}x \(", out, re.M), out
    for mode in modes:
        assert len(rows[mode]) == 3 and all(positive(v) for v in rows[mode])
    assert re.search(r"^best: \S+ at [0-9.]+ of model-only", out, re.M), out


def test_eval_throughput_prints_its_ratio_table():
    out = run_small("eval_throughput.py")
    rows = table_rows(out, "path img/s ratio e2e/model Pitts250k-test s")
    assert list(rows) == ["model:bf16", "cpu", "gpu"], out
    for mode in ("cpu", "gpu"):
        img_s, _, pitts = (positive(v) for v in rows[mode])
        assert pitts > 92_230 / img_s  # extraction of every image, plus the search
    assert re.search(r"^search \+ recall at 83,950 x 8,280: [0-9.]+ s", out, re.M), out
    assert re.search(r"^best: \S+, Pitts250k-test in [0-9]+ s", out, re.M), out


def test_eval_throughput_mode_specs():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import eval_throughput as et
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert et.parse_mode("gpu") == ("gpu", "bf16")
    assert et.parse_mode("cpu:fp32") == ("cpu", "fp32")
    with pytest.raises(ValueError, match="'gpu:fp8'"):
        et.parse_mode("gpu:fp8")


def test_jpeg_decoders_prints_a_row_per_decoder():
    out = run_small("jpeg_decoders.py")
    lines = out.splitlines()
    start = lines.index(next(x for x in lines if x.startswith("decoder ")))
    rows = {" ".join(x.split()[:2]): x.split()[2:] for x in lines[start + 1 :] if x.strip()}
    assert list(rows) == [
        "torchvision cpu",
        "torchvision cuda",
        "nvimgcodec HW_GPU_ONLY",
        "nvimgcodec GPU_ONLY",
        "nvimgcodec HYBRID_CPU_GPU",
        "nvimgcodec CPU_ONLY",
    ], out
    cpu = rows["torchvision cpu"]  # "(1 thread)" images/s "1.0x" mean|diff| beside kept
    assert positive(cpu[2]) and cpu[3] == "1.0x" and float(cpu[4]) == 0.0, out
    assert positive(cpu[5]) and cpu[6].endswith("%") and positive(cpu[6][:-1]), out
    assert re.search(rf"^busy work: 256x256 matrix products on \S+, {NUMBER}/s alone", out, re.M)
    if not torch.cuda.is_available():
        assert rows["torchvision cuda"][-2:] == ["no", "CUDA"], out


def test_train_throughput_mode_specs():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import train_throughput as tt
    finally:
        sys.path.remove(str(REPO / "bench"))
    spec = tt.parse_mode("mixed:2/w14/p2/hp")
    assert spec == {
        "dataset": {"decode": "mixed", "gpu_images": 2},
        "workers": 14,
        "prefetch": 2,
        "priority": -1,
        "stages": 1,
        "switch_interval": None,
        "loss": "library",
    }
    assert tt.parse_mode("gpu/2s/dense")["loss"] == "dense"
    assert tt.parse_mode("gpu/2s")["stages"] == 2
    assert tt.parse_mode("mixed:2/si")["switch_interval"] == tt.SWITCH_INTERVAL < 0.005
    assert tt.parse_mode("gpu/noaug")["dataset"] == {"decode": "gpu", "augment": False}
    assert tt.parse_mode("cpu")["priority"] == 0
    for bad, message in [("tpu", "unknown mode"), ("cpu/fast", "unknown option 'fast'")]:
        with pytest.raises(ValueError, match=message):
            tt.parse_mode(bad)


def test_train_throughput_traces_the_default_path(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "train_throughput.py"),
            "--small",
            "--modes",
            "mixed:2/si",
            "--trace",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^mixed:2/si: pipeline [0-9]+ img/s", proc.stdout, re.M), proc.stdout
    # on the CPU the default path is "cpu" (what decode="auto" picks), traced though not timed
    assert "trace of cpu: 2 steps" in proc.stdout, proc.stdout
    with gzip.open(tmp_path / "trace_cpu.json.gz", "rt") as f:
        events = json.load(f)["traceEvents"]
    names = {e.get("name", "") for e in events}
    # the step (its backward) and the prefetch thread's DataLoader reads are both in it
    assert "aten::convolution_backward" in names
    assert any(n.startswith("enumerate(DataLoader)") for n in names)
    assert len({e.get("tid") for e in events if e.get("ph") == "X"}) >= 2  # two threads


def test_ms_loss_bench_compares_equal_losses():
    out = run_small("ms_loss.py")
    rows = table_rows(out, "miner + loss steps/s host waits")
    assert list(rows) == ["library", "dense"], out
    assert all(positive(rows[name][0]) for name in rows)
    match = re.search(r"\|loss difference\| ([0-9.e+-]+)\)", out)
    assert match and float(match[1]) < 1e-5, out
