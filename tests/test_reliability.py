"""Reliability and security: atomic writes, clear errors on bad data, untrusted files refused.

Where the other failure cases are tested (so they are not repeated here):
- missing root / Dataframes/, missing column, non-numeric or empty cell, header-only (empty)
  city CSV: test_gsv_cities.py::test_read_errors (and test_fuzz.py for random bad cells);
  image listed but absent: test_gsv_cities.py::test_missing_images_error_or_drop;
  truncated JPEG in the dataset: test_gsv_cities.py::test_corrupt_image_error_and_skip;
  unknown city: test_gsv_cities.py::test_cities_selection_and_stable_place.
- benchmark missing _gt.npy / wrong root / mismatched lengths / index out of range:
  test_benchmarks.py::test_list_format_*.
- checkpoint with missing / unexpected keys, another architecture, wrong shapes, not a
  checkpoint: test_load_pretrained.py::test_missing_and_unexpected_keys_listed_by_name,
  ::test_other_architecture_gives_clear_error, ::test_shape_mismatch_listed,
  ::test_bad_names_files_and_options.
- malicious pickle refused by load_pretrained, payload never runs:
  test_load_pretrained.py::test_pickled_callable_is_refused_and_never_runs.
- resume from a fit checkpoint of another architecture or with other arguments:
  test_train.py::test_resume_errors_and_auto.
- downloads: size + SHA-256 recorded on first use and verified after
  (::test_download_records_sha_and_uses_cache, ::test_tampered_cache_file_detected);
  a partial download never lands in the cache (::test_failed_download_leaves_nothing_in_cache,
  ::test_failing_custom_downloader_leaves_nothing).
- NaN descriptors from the model: test_evaluate.py::test_nan_descriptors_name_the_batch.
- killed training runs and resume: test_interrupt.py.
"""

import ast
import io
import os
import pickle
import re
import shutil
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vprlib import (
    GSVCitiesDataset,
    VPRModel,
    extract_descriptors,
    fit,
    load_pretrained,
    recall_at_k,
    search,
)
from vprlib.benchmarks import Benchmark, load_benchmark, load_npy
from vprlib.evaluate import EvalResults, evaluate_descriptors
from vprlib.train import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
LIB_FILES = sorted((REPO / "vprlib").glob("*.py")) + [REPO / "hubconf.py"]

# ---------------------------------------------------------------------------- source audits

# Calls that write, move or create files: dotted name -> index of the file argument (None:
# any use counts). A write is fine when its file argument is the handle of a
# `with atomic_open(...) as f` or an io.BytesIO in the same function.
WRITE_CALLS = {
    "torch.save": 1,
    "np.save": 0,
    "np.savez": 0,
    "np.savez_compressed": 0,
    "np.savetxt": 0,
    "json.dump": 1,
    "pickle.dump": 1,
    "os.replace": None,
    "os.rename": None,
    "os.open": None,
    "os.fdopen": None,
    "shutil.copy": None,
    "shutil.copy2": None,
    "shutil.copyfile": None,
    "shutil.move": None,
    "tempfile.mkstemp": None,
    "tempfile.NamedTemporaryFile": None,
    "np.lib.format.open_memmap": None,
}
WRITE_METHODS = {
    "save": 0,
    "savefig": 0,
    "to_csv": 0,
    "to_parquet": 0,
    "to_json": 0,
    "to_pickle": 0,
    "tofile": 0,
    "write_text": None,
    "write_bytes": None,
    "rename": None,
    "replace": None,  # Path.replace (str.replace has a str receiver: see _is_str_replace)
}
# Known writes outside vprlib/fileio.py, with the reason they are accepted.
KNOWN_WRITES = {
    # extract_descriptors(out_path=...) streams into a .npy memmap opened on the temporary
    # file that `with atomic_path(out_path) as tmp` yields (fsync + rename on success).
    ("evaluate.py", "_allocate", "np.lib.format.open_memmap"),
}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _safe_handles(func: ast.AST) -> set[str]:
    """Names bound to `with atomic_open(...) as name` or `name = io.BytesIO()` in `func`."""
    names = set()
    for node in ast.walk(func):
        if isinstance(node, ast.With):
            for item in node.items:
                call, var = item.context_expr, item.optional_vars
                if (
                    isinstance(call, ast.Call)
                    and dotted(call.func).endswith("atomic_open")
                    and isinstance(var, ast.Name)
                ):
                    names.add(var.id)
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and dotted(node.value.func).endswith("BytesIO")
        ):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _is_str_replace(call: ast.Call) -> bool:
    receiver = call.func.value
    return len(call.args) == 2 or isinstance(receiver, ast.Constant) or dotted(receiver) == "str"


def _write_kind(call: ast.Call) -> tuple[str | None, ast.AST | None]:
    """(what kind of write, its file argument) or (None, None) when `call` writes nothing."""
    name = dotted(call.func)
    if name == "open" or (isinstance(call.func, ast.Attribute) and call.func.attr == "open"):
        modes = [a.value for a in call.args[:2] if isinstance(a, ast.Constant)]
        modes += [k.value.value for k in call.keywords if k.arg == "mode"]
        if any(
            isinstance(m, str) and re.fullmatch(r"[rwaxbt+]+", m) and set(m) & set("wax+")
            for m in modes
        ):
            return "open", call.args[0] if call.args else None
        return None, None
    if name in WRITE_CALLS:
        i = WRITE_CALLS[name]
        return name, call.args[i] if i is not None and len(call.args) > i else None
    if isinstance(call.func, ast.Attribute) and call.func.attr in WRITE_METHODS:
        attr = call.func.attr
        if (
            attr == "to_csv"
            and not call.args
            and all(k.arg != "path_or_buf" for k in call.keywords)
        ):
            return None, None  # returns the CSV text
        if attr == "replace" and _is_str_replace(call):
            return None, None
        i = WRITE_METHODS[attr]
        return "." + attr, call.args[i] if i is not None and len(call.args) > i else None
    return None, None


def write_sites(source: str, filename: str) -> list[tuple[str, int, str, str, bool]]:
    """(file, line, function, kind, goes through an atomic handle) for every write call."""
    sites = []

    def visit(node, func, safe):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func, safe = node.name, safe | _safe_handles(node)
        if isinstance(node, ast.Call):
            kind, target = _write_kind(node)
            if kind is not None:
                ok = isinstance(target, ast.Name) and target.id in safe
                sites.append((filename, node.lineno, func, kind, ok))
        for child in ast.iter_child_nodes(node):
            visit(child, func, safe)

    visit(ast.parse(source), "<module>", set())
    return sites


def library_write_sites():
    return [s for p in LIB_FILES for s in write_sites(p.read_text(), p.name)]


def test_write_audit_detects_direct_writes():
    """The audit itself: direct writes are caught, writes into atomic handles are not."""
    source = """
import io, json, numpy as np, torch
from .fileio import atomic_open
def bad(path, df, fig, obj, arr):
    with open(path, "w") as f:
        f.write("x")
    df.to_csv(path)
    fig.savefig(path)
    torch.save(obj, path)
    np.save(path, arr)
    path.write_text("x")
    json.dump(obj, open(path, "wb"))
def good(path, df, fig, obj, arr):
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
        np.savez(f, a=arr)
    buf = io.BytesIO()
    fig.savefig(buf)
    text = df.to_csv(index=False)
    name = path.name.replace(".jpg", ".png")
    with open(path) as f:
        f.read()
"""
    sites = write_sites(source, "x.py")
    bad = sorted(kind for _, _, func, kind, ok in sites if func == "bad" and not ok)
    assert bad == [
        ".savefig", ".to_csv", ".write_text", "json.dump", "np.save", "open", "open", "torch.save"
    ]  # fmt: skip
    assert len([s for s in sites if s[2] == "bad"]) == 8
    assert all(ok for _, _, func, _, ok in sites if func == "good")
    assert len([s for s in sites if s[2] == "good"]) == 3


def test_every_library_write_goes_through_fileio():
    sites = library_write_sites()
    # the audit sees the real atomic writes (it is not vacuous)...
    kinds = {(f, func, kind) for f, _, func, kind, ok in sites if ok}
    assert ("fileio.py", "atomic_torch_save", "torch.save") in kinds
    assert ("evaluate.py", "save", "np.savez") in kinds
    # ...and every other write is in fileio.py itself or a documented exception
    violations = [
        f"vprlib/{f}:{line} in {func}(): {kind}"
        for f, line, func, kind, ok in sites
        if not ok and f != "fileio.py" and (f, func, kind) not in KNOWN_WRITES
    ]
    assert not violations, "writes that bypass vprlib.fileio:\n" + "\n".join(violations)


# Loading calls and the keyword each must carry to be safe with untrusted files.
def load_sites(source: str, filename: str) -> list[tuple[str, int, str, dict]]:
    """(file, line, call name, constant keywords) for torch/pickle/numpy loading calls."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if name.split(".")[-1] in ("load", "loads", "load_state_dict_from_url", "Unpickler") and (
            name.startswith(("torch.", "pickle.", "np.", "numpy.", "cloudpickle.", "dill."))
        ):
            kw = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
            out.append((filename, node.lineno, name, kw))
    return out


def test_load_audit_detects_unsafe_loads():
    source = """
import pickle, torch, numpy as np
a = torch.load(p)
b = torch.load(p, weights_only=flag)
c = torch.load(p, map_location="cpu", weights_only=True)
d = pickle.load(f)
e = np.load(p, allow_pickle=True)
f = torch.hub.load_state_dict_from_url(u, weights_only=True)
"""
    sites = load_sites(source, "x.py")
    assert [unsafe_load(s) for s in sites] == [True, True, False, True, True, False]


def unsafe_load(site) -> bool:
    _, _, name, kw = site
    if name in ("torch.load", "torch.hub.load_state_dict_from_url"):
        return kw.get("weights_only") is not True
    if name in ("np.load", "numpy.load"):
        return kw.get("allow_pickle", False) is not False
    return True  # pickle.load(s), torch.jit.load, ...: never on user files


def test_every_torch_load_uses_weights_only():
    sites = [s for p in LIB_FILES for s in load_sites(p.read_text(), p.name)]
    torch_loads = [s for s in sites if s[2] == "torch.load"]
    assert len(torch_loads) >= 1  # fileio.safe_torch_load, used by models and train
    bad = [
        f"vprlib/{f}:{line}: {name}({kw})"
        for f, line, name, kw in sites
        if unsafe_load((f, line, name, kw))
    ]
    assert not bad, "loads that could run pickled code:\n" + "\n".join(bad)
    # weights load strictly: no load_state_dict(..., strict=False) anywhere
    loose = [
        f"vprlib/{p.name}:{node.lineno}"
        for p in LIB_FILES
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Call)
        and dotted(node.func).endswith("load_state_dict")
        and any(
            k.arg == "strict" and getattr(k.value, "value", None) is False for k in node.keywords
        )
    ]
    assert not loose, f"non-strict weight loading at {loose}"


# ---------------------------------------------------------------------------- atomic writes


def half_then_fail(real):
    """A writer that puts half of what `real` would write into the file, then fails."""

    def write(obj_or_file, *args, **kw):
        f = obj_or_file if hasattr(obj_or_file, "write") else args[0]
        buf = io.BytesIO()
        if f is obj_or_file:  # np.savez(file, **arrays)
            real(buf, *args, **kw)
        else:  # torch.save(obj, file)
            real(obj_or_file, buf, *args[1:], **kw)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        raise OSError("No space left on device (simulated)")

    return write


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return VPRModel("resnet18", layers_to_crop=[3, 4], agg="convap", agg_config={"out_channels": 4})


def test_failed_model_save_keeps_previous_file(tmp_path, monkeypatch, small_model):
    path = tmp_path / "model.ckpt"
    small_model.save(path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", half_then_fail(torch.save))
    with pytest.raises(OSError, match="No space"):
        small_model.save(path)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"state_dict": small_model.state_dict(), "epoch": 1})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]  # no temporary left
    loaded = load_pretrained(path)
    for k, v in small_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def small_results(seed: int) -> EvalResults:
    rng = np.random.default_rng(seed)
    db, q = rng.standard_normal((8, 4)), rng.standard_normal((3, 4))
    return evaluate_descriptors(db, q, small_benchmark(), ks=(1, 5))


def test_failed_results_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "results.npz"
    old = small_results(0)
    old.save(path)
    before = path.read_bytes()
    monkeypatch.setattr(np, "savez", half_then_fail(np.savez))
    with pytest.raises(OSError, match="No space"):
        small_results(1).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.npz"]
    back = EvalResults.load(path)
    np.testing.assert_array_equal(back.predictions, old.predictions)
    assert back.recalls == old.recalls


class RaiseAtBatch(torch.nn.Module):
    """A 4-d descriptor model that fails on its second batch (a crash mid-extraction)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("crash in batch 2")
        return torch.nn.functional.normalize(x.mean((2, 3)).repeat(1, 2)[:, :4], dim=1)


def test_failed_extraction_keeps_previous_descriptor_file(tmp_path):
    out = tmp_path / "db.npy"
    np.save(out, np.arange(12, dtype=np.float32).reshape(3, 4))
    before = out.read_bytes()
    images = torch.zeros(6, 3, 8, 8)
    with pytest.raises(RuntimeError, match="crash in batch 2"):
        extract_descriptors(
            RaiseAtBatch(), SyntheticImages(images), batch_size=2, num_workers=0,
            progress=False, out_path=out,
        )  # fmt: skip
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["db.npy"]


# ---------------------------------------------------------------------------- bad data


@pytest.fixture
def london(tmp_path, gsv_root):
    """A writable copy of the sample's London (one city, 152 images)."""
    root = tmp_path / "GSV"
    (root / "Dataframes").mkdir(parents=True)
    shutil.copy(gsv_root / "Dataframes" / "London.csv", root / "Dataframes")
    shutil.copytree(gsv_root / "Images" / "London", root / "Images" / "London")
    return root


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_dataset_image_removed_or_not_jpeg_after_listing(london, decode):
    ds = GSVCitiesDataset(london, image_size=(16, 16), random_sample=False, decode=decode)
    first = london / ds.dataframe["path"][0]  # the first image tried for place 0
    first.unlink()
    with pytest.raises(FileNotFoundError, match=first.name):
        ds[0]
    first.write_bytes(b"GIF89a\x01\x00\x01\x00 this is not a JPEG")
    with pytest.raises(ValueError, match=first.name):
        ds[0]


def test_place_images_below_minimum_is_an_error(london):
    with pytest.raises(ValueError, match="no place has >= 40 images"):
        GSVCitiesDataset(london, img_per_place=4, min_img_per_place=40)
    with pytest.raises(ValueError, match="img_per_place"):
        GSVCitiesDataset(london, img_per_place=5, min_img_per_place=4)


@pytest.mark.parametrize("workers", [0, 1])
def test_extract_descriptors_names_bad_image_files(london, workers):
    paths = sorted(str(p) for p in (london / "Images" / "London").iterdir())[:3]
    missing, not_jpeg, truncated = (Path(p) for p in paths)
    missing.unlink()
    not_jpeg.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    truncated.write_bytes(truncated.read_bytes()[:300])
    model = RaiseAtBatch()  # never reached: loading fails first
    kw = dict(image_size=16, num_workers=workers, progress=False, batch_size=1)
    with pytest.raises(FileNotFoundError, match=missing.name):
        extract_descriptors(model, [missing], **kw)
    with pytest.raises(ValueError, match=not_jpeg.name):
        extract_descriptors(model, [not_jpeg], **kw)
    with pytest.raises(ValueError, match=f"{truncated.name}.*(truncated|incomplete)"):
        extract_descriptors(model, [truncated], **kw)
    assert model.calls == 0


def test_list_benchmark_missing_query_list(tmp_path):
    npy = tmp_path / "datasets_npy"
    npy.mkdir()
    (tmp_path / "toy").mkdir()
    for i in range(3):
        (tmp_path / "toy" / f"{i}.jpg").touch()
    np.save(npy / "toy_dbImages.npy", np.array([f"toy/{i}.jpg" for i in range(3)]))
    gt = np.empty(2, dtype=object)
    gt[:] = [np.array([0]), np.array([1, 2])]
    np.save(npy / "toy_gt.npy", gt, allow_pickle=True)
    with pytest.raises(FileNotFoundError, match=r"toy_qImages\.npy"):
        load_benchmark(npy / "toy_dbImages.npy")
    np.save(npy / "toy_qImages.npy", np.array(["toy/0.jpg", "toy/1.jpg"]))
    assert load_benchmark(npy / "toy_dbImages.npy").num_queries == 2


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_search_refuses_non_finite_descriptors(bad):
    rng = np.random.default_rng(0)
    db, q = rng.standard_normal((50, 8)).astype(np.float32), rng.standard_normal((7, 8))
    db_bad, q_bad = db.copy(), q.copy()
    db_bad[31, 2] = bad
    q_bad[5, 0] = bad
    with pytest.raises(ValueError, match=r"db_desc has NaN or inf values \(first in row 31\)"):
        search(db_bad, q, 3)
    with pytest.raises(ValueError, match=r"q_desc has NaN or inf values \(first in row 5\)"):
        search(db, q_bad, 3, chunk_size=2)  # row 5 lies in the third query chunk
    with pytest.raises(ValueError, match="db_desc"):
        evaluate_descriptors(db_bad[28:36], q[:3], small_benchmark(), ks=(1,))
    assert search(db, q, 3).shape == (7, 3)


def test_recall_refuses_non_integer_predictions_or_ground_truth():
    pred = np.array([[0, 1], [2, 3]])
    gt = [np.array([0]), np.array([3])]
    assert recall_at_k(pred, gt, ks=(1, 2)) == {1: 0.5, 2: 1.0}
    with pytest.raises(ValueError, match="predictions must be integer.*float64"):
        recall_at_k(np.array([[0.0, 1.0], [np.nan, 3.0]]), gt, ks=(1, 2))
    with pytest.raises(ValueError, match=r"ground_truth\[1\] must hold integer.*nan"):
        recall_at_k(pred, [np.array([0]), np.array([np.nan])], ks=(1, 2))
    # queries without positives are fine: an empty list has no dtype to speak of
    assert recall_at_k(pred, [[], np.array([3])], ks=(2,)) == {2: 0.5}


def small_benchmark() -> Benchmark:
    return Benchmark(
        name="toy",
        db_paths=[f"db/{i}.jpg" for i in range(8)],
        query_paths=[f"q/{i}.jpg" for i in range(3)],
        ground_truth=[np.array([0, 1]), np.array([], np.int64), np.array([5])],
    )


# ---------------------------------------------------------------------------- untrusted files


def write_list_benchmark(folder: Path, gt: np.ndarray) -> Path:
    """A 3-db, 2-query list-format set with `gt` as its _gt.npy; returns the dbImages file."""
    npy = folder / "datasets_npy"
    npy.mkdir(parents=True, exist_ok=True)
    (folder / "toy").mkdir(exist_ok=True)
    for i in range(3):
        (folder / "toy" / f"{i}.jpg").touch()
    np.save(npy / "toy_dbImages.npy", np.array([f"toy/{i}.jpg" for i in range(3)]))
    np.save(npy / "toy_qImages.npy", np.array(["toy/0.jpg", "toy/1.jpg"]))
    np.save(npy / "toy_gt.npy", gt, allow_pickle=True)
    return npy / "toy_dbImages.npy"


def object_array(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def test_benchmark_lists_with_pickled_code_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    db_file = write_list_benchmark(tmp_path, object_array([np.array([0]), _Payload(marker)]))
    gt_file = db_file.with_name("toy_gt.npy")
    with pytest.raises(pickle.UnpicklingError, match=r"toy_gt\.npy.*posix\.mkdir"):
        load_benchmark(db_file)
    assert not marker.exists()
    np.load(gt_file, allow_pickle=True)  # the payload is real: numpy's own loader runs it
    assert marker.is_dir()


def test_benchmark_lists_of_arrays_numbers_and_strings_still_load(tmp_path):
    gt = object_array([np.array([0, 2], dtype=np.int64), [np.int64(1), 2]])
    db_file = write_list_benchmark(tmp_path, gt)
    bench = load_benchmark(db_file)
    assert [g.tolist() for g in bench.ground_truth] == [[0, 2], [1, 2]]
    paths = object_array(["toy/0.jpg", "toy/1.jpg"])  # object array of str
    np.save(tmp_path / "paths.npy", paths, allow_pickle=True)
    assert load_npy(tmp_path / "paths.npy").tolist() == ["toy/0.jpg", "toy/1.jpg"]
    # files written by numpy 1.x name numpy.core.multiarray (numpy 2: numpy._core.multiarray);
    # numpy < 1.17 pickled with protocol 2, later with protocol 3
    for protocol in (2, 3):
        old_style = pickle.dumps(gt, protocol=protocol).replace(b"numpy._core.", b"numpy.core.")
        assert b"numpy.core.multiarray\n_reconstruct" in old_style
        with open(db_file.with_name("toy_gt.npy"), "wb") as f:
            header = {"descr": "|O", "fortran_order": False, "shape": (2,)}
            np.lib.format.write_array_header_1_0(f, header)
            f.write(old_style)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 warns about numpy.core
            again = load_benchmark(db_file)
        assert [g.tolist() for g in again.ground_truth] == [[0, 2], [1, 2]], protocol
    # a query without positives: protocol 2 pickles an empty array's data as builtins bytes
    with_empty = object_array([np.array([0, 2]), np.array([], dtype=np.int64)])
    old_style = pickle.dumps(with_empty, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    assert b"bytes" in old_style
    with open(db_file.with_name("toy_gt.npy"), "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|O", "fortran_order": False, "shape": (2,)}
        )
        f.write(old_style)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        again = load_benchmark(db_file)
    assert [g.tolist() for g in again.ground_truth] == [[0, 2], []]


# ---------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def resume_setup(gsv_root):
    ds = GSVCitiesDataset(gsv_root, cities=["London"], image_size=(32, 32), seed=0)
    kw = dict(places_per_batch=2, max_steps_per_epoch=1, device="cpu", num_workers=0)
    return ds, dict(kw, progress=False, precision="fp32")


class _Payload:
    """Unpickling this runs os.mkdir(marker): a stand-in for any code in a hostile file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_resume_refuses_malicious_checkpoint_and_never_runs_it(tmp_path, resume_setup, small_model):
    ds, kw = resume_setup
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    evil = {"state_dict": small_model.state_dict(), "epoch": 0, "rng": _Payload(marker)}
    torch.save(evil, ckpt / "last.ckpt")
    with pytest.raises(pickle.UnpicklingError, match=r"refused to load .*last\.ckpt.*posix\.mkdir"):
        fit(small_model, ds, epochs=2, checkpoint_dir=ckpt, resume=True, **kw)
    with pytest.raises(pickle.UnpicklingError, match=r"refused to load .*last\.ckpt"):
        load_pretrained(ckpt / "last.ckpt")
    assert not marker.exists()
    torch.load(ckpt / "last.ckpt", weights_only=False)  # the payload is real: unsafe load runs it
    assert marker.is_dir()


def test_resume_refuses_files_fit_did_not_write(tmp_path, resume_setup, small_model):
    """(A checkpoint of fit with another architecture: test_train.py::test_resume_errors_and_auto.)"""
    ds, kw = resume_setup
    ckpt = tmp_path / "ckpt"
    last = ckpt / "last.ckpt"
    # released-style plain weights, and weights with a model config, are not training state
    small_model.save(last)
    with pytest.raises(ValueError, match=r"last\.ckpt is not a training checkpoint.*'optimizer'"):
        fit(small_model, ds, epochs=2, checkpoint_dir=ckpt, resume=True, **kw)
    save_checkpoint(last, {"state_dict": small_model.state_dict(), "model_config": {}})
    with pytest.raises(ValueError, match=r"last\.ckpt is not a training checkpoint.*'epoch'"):
        fit(small_model, ds, epochs=2, checkpoint_dir=ckpt, resume=True, **kw)
    # a truncated file (e.g. copied while being written by another tool)
    last.write_bytes(last.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"last\.ckpt is not a readable PyTorch checkpoint"):
        fit(small_model, ds, epochs=2, checkpoint_dir=ckpt, resume=True, **kw)


# ---------------------------------------------------------------------------- memory


class SyntheticImages(torch.utils.data.Dataset):
    """Item i: a float image (taken as normalised) filled with a value derived from i."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


class WideDescriptor(torch.nn.Module):
    """[N,3,h,w] -> L2-normalised (mean pixel) * fixed random direction: big descriptors."""

    def __init__(self, dim: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.direction = torch.nn.Parameter(torch.randn(dim, generator=g), requires_grad=False)

    def forward(self, x):
        scale = x.mean((1, 2, 3))[:, None]
        return torch.nn.functional.normalize(scale * self.direction[None] + 0.5, dim=1)


def expected_rows(model: WideDescriptor, values: np.ndarray) -> np.ndarray:
    d = model.direction.detach().double().numpy()
    rows = values[:, None] * d[None] + 0.5
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_extraction_to_out_path_streams_without_a_full_array(tmp_path):
    """2000 images x 4096-d float32 = 32 MB of descriptors. With out_path they stream into a
    memmap: numpy allocates no array of that size (tracemalloc sees numpy's allocations,
    not file-backed pages). Without out_path the same measurement does see the full array."""
    n, dim, full = 2000, 4096, 2000 * 4096 * 4
    values = np.linspace(-1.0, 1.0, n)
    images = torch.from_numpy(values).float()[:, None, None, None].expand(n, 3, 2, 2)
    model = WideDescriptor(dim)
    kw = dict(batch_size=50, num_workers=0, progress=False)

    def peak_bytes(**extra) -> tuple[int, np.ndarray]:
        tracemalloc.start()
        try:
            out = extract_descriptors(model, SyntheticImages(images), **kw, **extra)
            return tracemalloc.get_traced_memory()[1], out
        finally:
            tracemalloc.stop()

    out_path = tmp_path / "db.npy"
    streamed_peak, mapped = peak_bytes(out_path=out_path)
    assert isinstance(mapped, np.memmap) and mapped.shape == (n, dim)
    assert out_path.stat().st_size >= full
    want = expected_rows(model, values)
    np.testing.assert_allclose(np.load(out_path, mmap_mode="r")[::97], want[::97], atol=1e-6)
    np.testing.assert_allclose(mapped[-1], want[-1], atol=1e-6)
    in_memory_peak, array = peak_bytes()
    assert in_memory_peak >= full  # the measurement sees a full-size array
    assert streamed_peak < full / 4, f"peak {streamed_peak / 2**20:.1f} MiB with out_path"
    np.testing.assert_allclose(array[::97], want[::97], atol=1e-6)
