"""Extraction, search, recall@K, EvalResults and the search benchmark script."""

import dataclasses
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import vprlib
from vprlib.benchmarks import Benchmark, load_benchmark
from vprlib.evaluate import (
    EvalResults,
    auto_gpu_decode,
    correct_matrix,
    evaluate_descriptors,
    extract_descriptors,
    recall_at_k,
    resolve_eval_precision,
    search,
)
from vprlib.transforms import IMAGENET_MEAN, IMAGENET_STD


class TinyNet(torch.nn.Module):
    """A small conv net with L2-normalised output; records the mode it ran in."""

    def __init__(self, dim=16, size=(48, 64)):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, dim, 5, stride=2)
        self.preprocess = {"image_size": size, "interpolation": "bilinear"}
        self.seen_training = []

    def forward(self, x):
        self.seen_training.append(self.training)
        return torch.nn.functional.normalize(self.conv(x).mean((2, 3)), dim=1)


class NaNNet(TinyNet):
    def forward(self, x):
        out = super().forward(x).clone()
        out[-1, 0] = float("nan")
        return out


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_brute_force(pred, gt, k, skip_empty=False):
    rows = [i for i in range(len(gt)) if len(gt[i]) or not skip_empty]
    return np.mean([any(p in set(gt[i].tolist()) for p in pred[i, :k]) for i in rows])


@pytest.fixture(scope="module")
def sample(bench_root):
    return load_benchmark(bench_root / "datasets_npy" / "gsv_sample_dbImages.npy")


# ------------------------------------------------------------------------------ search / recall


def test_search_matches_brute_force():
    rng = np.random.default_rng(0)
    db, q = unit(rng, 500, 32), unit(rng, 230, 32)
    idx, dist = search(db, q, 7, return_distances=True, chunk_size=64)
    d2 = ((q[:, None].astype(np.float64) - db[None]) ** 2).sum(-1)
    expected = np.argsort(d2, axis=1)[:, :7]
    assert idx.dtype == np.int64 and idx.shape == (230, 7)
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(dist, np.take_along_axis(d2, expected, 1), atol=1e-4)
    assert (np.diff(dist, axis=1) >= 0).all()
    # float64, non-contiguous and torch input give the same answer; chunking does not matter
    np.testing.assert_array_equal(search(db.astype(np.float64), np.asfortranarray(q), 7), idx)
    np.testing.assert_array_equal(search(torch.from_numpy(db), q, 7, chunk_size=4096), idx)


def test_search_float16_and_memmap_inputs(tmp_path):
    rng = np.random.default_rng(5)
    db, q = unit(rng, 300, 16).astype(np.float16), unit(rng, 50, 16).astype(np.float16)
    np.save(tmp_path / "q.npy", q)
    q_map = np.load(tmp_path / "q.npy", mmap_mode="r")
    d2 = ((q[:, None].astype(np.float64) - db[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(search(db, q_map, 3, chunk_size=16), np.argsort(d2, 1)[:, :3])


def test_search_errors():
    rng = np.random.default_rng(0)
    db, q = unit(rng, 10, 8), unit(rng, 3, 8)
    with pytest.raises(ValueError, match="database size 10"):
        search(db, q, 11)
    with pytest.raises(ValueError, match=r"database 8-d vs queries 4-d"):
        search(db, q[:, :4], 1)
    with pytest.raises(ValueError, match="2-D"):
        search(db[0], q, 1)


def test_recall_matches_brute_force():
    rng = np.random.default_rng(3)
    n_db, n_q = 50, 200
    pred = np.stack([rng.permutation(n_db)[:25] for _ in range(n_q)])
    gt = [rng.choice(n_db, size=rng.integers(0, 4), replace=False) for _ in range(n_q)]
    assert any(len(g) == 0 for g in gt)
    rec = recall_at_k(pred, gt, ks=(1, 5, 10, 25))
    assert list(rec) == [1, 5, 10, 25]
    for k, v in rec.items():
        assert v == pytest.approx(recall_brute_force(pred, gt, k))
    assert rec[1] <= rec[5] <= rec[10] <= rec[25]
    skip = recall_at_k(pred, gt, ks=(1, 25), skip_empty=True)
    assert skip[25] == pytest.approx(recall_brute_force(pred, gt, 25, skip_empty=True))
    assert skip[25] > rec[25]
    corr = correct_matrix(pred, gt)
    assert corr.shape == pred.shape
    assert corr[3].tolist() == [p in gt[3] for p in pred[3]]


def test_queries_without_positives_count_as_misses():
    pred = np.array([[0, 1], [1, 0], [2, 0], [3, 0]])
    gt = [np.array([0]), np.array([1]), np.array([], dtype=np.int64), np.array([3])]
    assert recall_at_k(pred, gt, ks=(1, 2)) == {1: 0.75, 2: 0.75}
    assert recall_at_k(pred, gt, ks=(1,), skip_empty=True) == {1: 1.0}
    with pytest.raises(ValueError, match="ks must lie in 1..2"):
        recall_at_k(pred, gt, ks=(5,))
    with pytest.raises(ValueError, match="ground_truth has 3 queries"):
        recall_at_k(pred, gt[:3], ks=(1,))
    with pytest.raises(ValueError, match="no queries"):
        recall_at_k(pred[:1], [np.array([], dtype=np.int64)], ks=(1,), skip_empty=True)


# ------------------------------------------------------------------------------- extraction


def manual_descriptors(model, paths, size, pil=False):
    """Independent path: decode + resize one by one, normalise by hand, forward in eval mode.

    `pil=True` resizes with PIL instead of torchvision (a sanity check of the image pipeline).
    """
    from torchvision.io import decode_image
    from torchvision.transforms.v2 import functional as F

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = []
    for p in paths:
        if pil:
            im = Image.open(p).convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
            images.append(torch.from_numpy(np.array(im)).permute(2, 0, 1))
        else:
            images.append(F.resize(decode_image(p), list(size), antialias=True))
    x = (torch.stack(images).float() / 255 - mean) / std
    model.eval()
    with torch.no_grad():
        return model(x).numpy()


def test_extract_matches_manual_and_restores_mode(sample, tmp_path):
    model = TinyNet()
    paths = sample.db_paths[:11]
    expected = manual_descriptors(model, paths, (48, 64))
    pil = manual_descriptors(model, paths, (48, 64), pil=True)
    assert (expected * pil).sum(1).min() > 0.999  # PIL's resize agrees up to rounding
    model.train()
    model.seen_training.clear()
    desc = extract_descriptors(model, paths, batch_size=4, num_workers=0, progress=False)
    assert desc.dtype == np.float32 and desc.shape == (11, 16)
    np.testing.assert_allclose(desc, expected, atol=1e-5)
    assert model.training is True  # restored
    assert model.seen_training == [False, False, False]  # ran in eval mode, 3 batches
    # worker processes and a size override
    desc_w = extract_descriptors(model, paths, batch_size=4, num_workers=1, progress=True)
    np.testing.assert_array_equal(desc_w, desc)
    small = extract_descriptors(model, paths[:3], image_size=32, num_workers=0, progress=False)
    np.testing.assert_allclose(small, manual_descriptors(model, paths[:3], (32, 32)), atol=1e-5)
    half = extract_descriptors(model, paths, half=True, num_workers=0, progress=False)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), desc, atol=2e-3)


def test_memmap_output_equals_in_memory(sample, tmp_path):
    model = TinyNet()
    paths = sample.query_paths[:9]
    in_memory = extract_descriptors(model, paths, batch_size=4, num_workers=0, progress=False)
    out = tmp_path / "sub" / "q.npy"
    mapped = extract_descriptors(
        model, paths, batch_size=4, num_workers=0, progress=False, out_path=out
    )
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(np.asarray(mapped), in_memory)
    np.testing.assert_array_equal(np.load(out), in_memory)
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.npy"]  # no temporary left
    with pytest.raises(ValueError, match=r"\.npy"):
        extract_descriptors(model, paths, num_workers=0, progress=False, out_path=tmp_path / "x")


def test_gpu_decode_default_is_cuda_and_jpeg_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert auto_gpu_decode(None, cuda, ["a/b.jpg", "c.JPEG"]) is True
    assert auto_gpu_decode(None, cuda, ["a/b.jpg", "c.png"]) is False  # nvJPEG: JPEG only
    assert auto_gpu_decode(None, cpu, ["a/b.jpg"]) is False
    assert auto_gpu_decode(False, cuda, ["a.jpg"]) is False
    assert auto_gpu_decode(True, cpu, ["a.png"]) is True  # an explicit choice is kept


def test_gpu_decode_path_on_cpu_matches(sample):
    model = TinyNet()
    paths = sample.db_paths[:6]
    ref = extract_descriptors(model, paths, num_workers=0, progress=False)
    dec = extract_descriptors(model, paths, num_workers=0, progress=False, gpu_decode=True)
    cos = (ref * dec).sum(1)
    assert cos.min() > 0.99


def test_nan_descriptors_name_the_batch(sample, tmp_path):
    paths = sample.db_paths[:6]
    out = tmp_path / "d.npy"
    with pytest.raises(ValueError, match="NaN") as err:
        extract_descriptors(
            NaNNet(), paths, batch_size=3, num_workers=0, progress=False, out_path=out
        )
    assert paths[0] in str(err.value) and paths[2] in str(err.value)
    assert paths[3] not in str(err.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


class HugeNet(TinyNet):
    def forward(self, x):
        return super().forward(x) * 1e6  # beyond float16's 65504


def test_half_refuses_descriptors_float16_cannot_hold(sample):
    paths = sample.db_paths[:4]
    with pytest.raises(ValueError, match=r"beyond float16's range .* images \["):
        extract_descriptors(HugeNet(), paths, num_workers=0, progress=False, half=True)
    full = extract_descriptors(HugeNet(), paths, num_workers=0, progress=False)
    assert np.isfinite(full).all() and np.abs(full).max() > 65504


class PreloadedImages(torch.utils.data.Dataset):
    def __init__(self, images, group=1):
        self.images, self.group = images, group

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        return (img if self.group == 1 else img.expand(self.group, -1, -1, -1)), i


def test_extract_from_dataset(sample):
    from vprlib.transforms import eval_transform, load_image

    model = TinyNet()
    paths = sample.db_paths[:5]
    by_paths = extract_descriptors(model, paths, num_workers=0, progress=False)
    resize = eval_transform((48, 64), "bilinear")
    images = [resize(load_image(p)) for p in paths]
    by_dataset = extract_descriptors(
        model, PreloadedImages(images), batch_size=2, num_workers=0, progress=False
    )
    np.testing.assert_allclose(by_dataset, by_paths, atol=1e-6)
    with pytest.raises(ValueError, match="single images"):
        extract_descriptors(model, PreloadedImages(images, group=4), num_workers=0, progress=False)


def test_extract_input_errors():
    with pytest.raises(ValueError, match="no images"):
        extract_descriptors(TinyNet(), [], num_workers=0)
    with pytest.raises(TypeError, match="sequence of image paths"):
        extract_descriptors(TinyNet(), "one/path.jpg", num_workers=0)
    with pytest.raises(ValueError, match="interpolation"):
        extract_descriptors(TinyNet(), ["a.jpg"], interpolation="cubic", num_workers=0)


# ------------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def resnet_results(sample):
    model = vprlib.VPRModel("resnet18", layers_to_crop=(4,), agg="gem")
    model.preprocess = {"image_size": (64, 64)}
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error", UserWarning
        )  # the sample is not a standard set: no size warning
        res = vprlib.evaluate(model, sample, batch_size=64, num_workers=0, progress=False)
    return model, res


def test_evaluate_end_to_end(sample, resnet_results):
    model, res = resnet_results
    q, kmax = sample.num_queries, 25
    assert res.benchmark == "gsv_sample"
    assert res.predictions.shape == (q, kmax) and res.distances.shape == (q, kmax)
    # predictions are the nearest neighbours of independently extracted descriptors
    db = extract_descriptors(model, sample.db_paths, num_workers=0, progress=False)
    qd = extract_descriptors(model, sample.query_paths, num_workers=0, progress=False)
    d2 = ((qd[:, None].astype(np.float64) - db[None]) ** 2).sum(-1)
    np.testing.assert_allclose(
        np.take_along_axis(d2, res.predictions, 1), np.sort(d2, axis=1)[:, :kmax], atol=1e-5
    )
    np.testing.assert_allclose(res.distances, np.sort(d2, axis=1)[:, :kmax], atol=1e-5)
    for k in (1, 5, 10, 15, 20, 25):
        assert res.recalls[k] == pytest.approx(
            recall_brute_force(res.predictions, sample.ground_truth, k)
        )
    assert res.correct.dtype == bool
    assert res.correct.sum() > 0
    table = res.table()
    assert list(table.columns) == ["benchmark", "#db", "#queries"] + [
        f"R@{k}" for k in (1, 5, 10, 15, 20, 25)
    ] + ["protocol"]
    assert table.loc[0, "protocol"] == f"{sample.variant}; 64x64 bilinear images"
    assert table.loc[0, "R@5"] == round(100 * res.recalls[5], 1)
    assert table.loc[0, "#db"] == sample.num_db
    empty = sample.num_without_positives
    assert empty > 0  # the sample has queries without positives
    assert f"{empty} without positives counted as misses" in res.summary()


def test_evaluate_by_name(bench_root):
    model = TinyNet(size=(32, 32))
    res = vprlib.evaluate(
        model, "gsv_sample", root=bench_root, ks=(1, 3), num_workers=0, progress=False
    )
    assert list(res.recalls) == [1, 3] and res.predictions.shape[1] == 3
    skip = vprlib.evaluate(
        model,
        "gsv_sample",
        root=bench_root,
        ks=(1, 3),
        num_workers=0,
        progress=False,
        skip_empty=True,
    )
    n, e = len(res.query_paths), res.num_without_positives
    assert skip.recalls[3] == pytest.approx(res.recalls[3] * n / (n - e))
    assert res.precision == "fp32"  # the CPU runs fp32 whatever is asked
    auto = vprlib.evaluate(
        model, "gsv_sample", root=bench_root, ks=(1, 3), num_workers=0, progress=False,
        precision="auto",
    )  # fmt: skip
    assert auto.precision == "fp32" and auto.recalls == res.recalls
    with pytest.raises(ValueError, match="precision must be one of"):
        vprlib.evaluate(model, "gsv_sample", root=bench_root, precision="half", progress=False)


def test_image_size_and_resizing_are_named_in_the_table_and_kept_by_save(bench_root, tmp_path):
    """Rows scored at different image sizes or resizings must not look alike."""
    model = TinyNet(size=(32, 32))
    kw = dict(root=bench_root, ks=(1,), num_workers=0, progress=False)
    plain = vprlib.evaluate(model, "gsv_sample", **kw)
    other = vprlib.evaluate(model, "gsv_sample", image_size=(48, 40), interpolation="bicubic", **kw)
    assert plain.images == "32x32 bilinear" and other.images == "48x40 bicubic"
    protocols = [r.table()["protocol"][0] for r in (plain, other)]
    assert protocols[0] != protocols[1] and "48x40 bicubic images" in protocols[1]
    other.save(tmp_path / "r.npz")
    assert EvalResults.load(tmp_path / "r.npz").images == "48x40 bicubic"


def test_reduced_precision_is_named_in_the_table_and_kept_by_save(resnet_results, tmp_path):
    """Rows scored from bf16 descriptors must not look like fp32 ones (paper tables)."""
    _, res = resnet_results
    half = dataclasses.replace(res, precision="bf16")
    assert half.table()["protocol"][0] == res.table()["protocol"][0] + "; bf16 descriptors"
    half.save(tmp_path / "r.npz")
    assert EvalResults.load(tmp_path / "r.npz").precision == "bf16"
    assert resolve_eval_precision("auto", torch.device("cpu")) == "fp32"


def test_results_save_load_round_trip(resnet_results, tmp_path):
    _, res = resnet_results
    path = tmp_path / "res.npz"
    res.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.npz"]
    with np.load(path, allow_pickle=False) as z:
        assert z["predictions"].dtype == np.int64
    back = EvalResults.load(path)
    assert back.recalls == res.recalls and back.benchmark == res.benchmark
    assert back.variant == res.variant and back.skip_empty == res.skip_empty
    np.testing.assert_array_equal(back.predictions, res.predictions)
    np.testing.assert_array_equal(back.distances, res.distances)
    np.testing.assert_array_equal(back.correct, res.correct)
    assert back.db_paths == res.db_paths and back.query_paths == res.query_paths
    assert len(back.ground_truth) == len(res.ground_truth)
    for a, b in zip(back.ground_truth, res.ground_truth, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.db_utm, res.db_utm)
    assert back.summary() == res.summary()
    assert back.table().equals(res.table())


def test_failures_table():
    db_utm = np.array([[0.0, 0.0], [100.0, 0.0], [200.0, 0.0]])
    q_utm = np.array([[1.0, 0.0], [199.0, 0.0]])
    bench = Benchmark(
        name="toy",
        db_paths=["d0", "d1", "d2"],
        query_paths=["q0", "q1"],
        ground_truth=[np.array([0]), np.array([2])],
        db_utm=db_utm,
        query_utm=q_utm,
    )
    db = np.eye(3, dtype=np.float32)
    q = np.array([[1, 0, 0], [0.2, 0.9, 0.8]], dtype=np.float32)  # q1 retrieves d1 first
    res = evaluate_descriptors(db, q, bench, ks=(1, 2))
    assert res.recalls == {1: 0.5, 2: 1.0}
    fail = res.failures()
    assert fail["query"].tolist() == [1]
    row = fail.iloc[0]
    assert row["query_path"] == "q1" and row["top1_path"] == "d1" and row["top1"] == 1
    assert row["top1_metres"] == pytest.approx(99.0)
    assert row["top1_distance"] == pytest.approx(((q[1] - db[1]) ** 2).sum(), rel=1e-5)
    assert row["first_correct_rank"] == 2 and row["positive_path"] == "d2"
    assert len(res.failures(k=2)) == 0
    with pytest.raises(ValueError, match="do not match benchmark"):
        evaluate_descriptors(db[:2], q, bench, ks=(1,))
    with pytest.raises(ValueError, match="database size"):
        evaluate_descriptors(db, q, bench, ks=(1, 5))


def test_search_bench_small(repo_root):
    proc = subprocess.run(
        [sys.executable, str(repo_root / "bench" / "search.py"), "--small"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "same predictions as bare faiss: True" in proc.stdout
    assert "time ratio vprlib/faiss:" in proc.stdout
    assert "x descriptor bytes" in proc.stdout


def test_negative_ground_truth_index_is_refused():
    """Packed keys would let query 1's -1 match query 0's last index; refuse it instead."""
    pred = np.array([[2], [0]])
    with pytest.raises(ValueError, match=r"ground_truth\[1\] holds a negative database index"):
        recall_at_k(pred, [np.array([0]), np.array([-1])], ks=(1,))
