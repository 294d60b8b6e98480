"""The input-pipeline speed-ups (issue 8), checked on the CPU against the plain paths.

Grouped per-image RandAugment (`apply_plans`) equals one FastRandAugment call per image;
decode="mixed"/"gpu" give exactly the tensors of decode="cpu"; JPEG bytes travel packed;
`prefetch_to_device` keeps order and errors; fit with prefetch trains exactly as without;
`train_step` is fit's step; the worker-count rule.
"""

import os
import threading

import pytest
import torch
from torchvision.io import read_file
from torchvision.transforms import v2

import vprlib
from vprlib import batching as B
from vprlib import gsv_dataset as D
from vprlib import train as TR
from vprlib import train_cli
from vprlib import transforms as T
from vprlib.evaluate import default_num_workers, extract_descriptors

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

SIZE = (40, 48)


def images(n=24, seed=0):
    """Noise with a few low-contrast images (so AutoContrast/Equalize have work to do)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, *SIZE, generator=g) * 255).to(torch.uint8)
    x[::3] = x[::3] // 3 + 90
    return x


def test_apply_plans_equals_one_call_per_image():
    batch = images(120)
    seeds = list(range(1000, 1120))
    aug = T.FastRandAugment(num_ops=3)
    want = []
    for image, seed in zip(batch, seeds, strict=True):
        torch.manual_seed(seed)
        want.append(aug(image))
    plans = T.draw_plans(seeds, *SIZE)
    assert plans.shape == (120, 3, 2)
    names = [[aug.ops[op][0] for op in plans[:, p, 0].tolist()] for p in range(3)]
    for drawn in map(set, names):  # each position merges several table ops and warps
        assert len(drawn) == len(aug.ops)
        assert len(drawn & set(T.TABLES)) >= 4 and len(drawn & set(T.WARPS)) == 3
    assert torch.equal(T.apply_plans(batch, plans), torch.stack(want))
    assert T.apply_plans(batch[:0], plans[:0]).shape == (0, 3, *SIZE)
    with pytest.raises(ValueError, match="plans"):
        T.apply_plans(batch, plans[:5])


def test_draw_plans_draws_like_randaugment_and_keeps_the_rng():
    aug = T.FastRandAugment(num_ops=3)
    state = torch.random.get_rng_state()
    plans = T.draw_plans([7, 8], *SIZE)
    assert torch.equal(state, torch.random.get_rng_state())
    torch.manual_seed(8)
    assert plans[1].tolist() == [list(map(int, p)) for p in aug.draw(*SIZE)]


def test_draw_plans_ignore_another_thread_drawing_from_the_global_rng():
    """With num_workers=0 a prefetch thread builds the items while the main thread may draw
    random numbers: each image's plan must still come from its seed alone."""
    seeds = list(range(300))
    want = T.draw_plans(seeds, *SIZE)
    stop = threading.Event()

    def draw_meanwhile():
        while not stop.is_set():
            torch.rand(64)

    other = threading.Thread(target=draw_meanwhile)
    other.start()
    try:
        got = [T.draw_plans(seeds, *SIZE) for _ in range(5)]
    finally:
        stop.set()
        other.join()
    assert all(torch.equal(g, want) for g in got)


def test_batched_equalize_matches_torchvision_per_image():
    batch = images(6, seed=3)
    batch[1] = 77  # a flat image: identity table
    want = torch.stack([v2.functional.equalize(im) for im in batch])
    assert torch.equal(T._equalize(batch), want)


def test_pack_bytes_round_trip():
    parts = [torch.arange(n, dtype=torch.uint8) for n in (3, 0, 5)]
    buffer, offsets = T.pack_bytes(parts)
    assert buffer.numel() == 8 and offsets.tolist() == [0, 3, 3, 8]
    assert all(
        torch.equal(a, b) for a, b in zip(T.unpack_bytes(buffer, offsets), parts, strict=True)
    )
    empty, off = T.pack_bytes([])
    assert empty.numel() == 0 and T.unpack_bytes(empty, off) == []


@pytest.mark.parametrize("augment", [True, False])
def test_mixed_and_gpu_decode_equal_the_cpu_path(gsv_root, augment):
    kw = dict(image_size=SIZE, augment=augment, seed=3)
    cpu = D.GSVCitiesDataset(gsv_root, decode="cpu", **kw)
    batch, labels = cpu.collate_fn([cpu[i] for i in range(5)])
    want = cpu.batch_to_device(batch, "cpu")
    for decode, gpu_images in [("gpu", None), ("mixed", 0), ("mixed", 1), ("mixed", None)]:
        ds = D.GSVCitiesDataset(gsv_root, decode=decode, gpu_images=gpu_images, **kw)
        enc, labels_dev = ds.collate_fn([ds[i] for i in range(5)])
        k_gpu = ds.gpu_images
        assert isinstance(enc, D.EncodedImages) and enc.shape == (5, 4) and len(enc) == 20
        assert enc.buffer.dim() == 1 and len(enc.paths) == 5 * k_gpu  # one packed buffer
        for data, path in zip(enc.data, enc.paths, strict=True):
            assert torch.equal(data, read_file(path))
        assert (enc.decoded is None) == (k_gpu == 4)
        assert (enc.plans is None) != augment
        assert torch.equal(labels_dev, labels)
        assert torch.equal(ds.batch_to_device(enc, "cpu"), want), (decode, gpu_images)
    assert "gpu_images=2" in repr(D.GSVCitiesDataset(gsv_root, decode="mixed", **kw))


def test_mixed_batches_through_a_worker_process(gsv_root):
    ds = D.GSVCitiesDataset(gsv_root, image_size=SIZE, decode="mixed", gpu_images=1)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=3, num_workers=1, collate_fn=ds.collate_fn, pin_memory=False
    )
    enc, labels = next(iter(loader))
    direct, _ = ds.collate_fn([ds[i] for i in range(3)])
    assert torch.equal(ds.batch_to_device(enc, "cpu"), ds.batch_to_device(direct, "cpu"))
    assert labels.shape == (3, 4)


def test_decode_options_are_checked(gsv_root):
    with pytest.raises(ValueError, match="gpu_images applies to decode='mixed'"):
        D.GSVCitiesDataset(gsv_root, gpu_images=1)
    with pytest.raises(ValueError, match=r"gpu_images must be an int in 0..4"):
        D.GSVCitiesDataset(gsv_root, decode="mixed", gpu_images=5)
    with pytest.raises(ValueError, match="pass augment=, not transform="):
        D.GSVCitiesDataset(gsv_root, decode="mixed", transform=lambda x: x)
    with pytest.raises(ValueError, match="'auto', 'cpu', 'gpu' or 'mixed'"):
        D.GSVCitiesDataset(gsv_root, decode="nvjpeg")
    with pytest.raises(ValueError, match="pass decode='mixed'"):
        D.GSVCitiesDataset(gsv_root, decode="auto", gpu_images=1)


def test_auto_decode_is_cpu_items_and_gpu_for_fit_on_cuda(gsv_root, monkeypatch):
    ds = D.GSVCitiesDataset(gsv_root, image_size=SIZE, seed=2)
    assert ds.decode == "cpu" and ds.auto_decode and "decode='auto'" in repr(ds)
    images, _ = ds[0]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, *SIZE)  # plain items
    assert ds.for_device("cpu") is ds
    fast = ds.for_device("cuda")
    assert fast is not ds and fast.decode == "gpu" and fast.gpu_images == 4
    assert fast.dataframe is ds.dataframe and len(fast) == len(ds)
    assert ds.decode == "cpu" and ds[0][0].dtype == torch.uint8  # the original is unchanged
    enc, _ = fast.collate_fn([fast[i] for i in range(3)])
    want, _ = ds.collate_fn([ds[i] for i in range(3)])
    assert torch.equal(fast.batch_to_device(enc, "cpu"), ds.batch_to_device(want, "cpu"))
    for explicit in (
        D.GSVCitiesDataset(gsv_root, decode="cpu"),
        D.GSVCitiesDataset(gsv_root, decode="gpu"),
        D.GSVCitiesDataset(gsv_root, transform=lambda x: x),  # a custom CPU transform
    ):
        assert explicit.for_device("cuda") is explicit
    assert train_cli.build_parser().parse_args([]).decode == "auto"


def test_fit_trains_with_the_dataset_for_its_device(gsv_root, monkeypatch):
    ds = vprlib.GSVCitiesDataset(gsv_root, image_size=(32, 32))
    seen = []
    monkeypatch.setattr(
        D.GSVCitiesDataset, "for_device", lambda self, device: seen.append(device) or self
    )
    TR.fit(
        tiny_model(),
        ds,
        epochs=1,
        places_per_batch=4,
        num_workers=0,
        progress=False,
        max_steps_per_epoch=1,
        device="cpu",
    )
    assert seen == [torch.device("cpu")]


class Batches:
    """Yields 0..n-1 (as tensors); raises at `fail_at`. Counts what was taken."""

    def __init__(self, n, fail_at=None):
        self.n, self.fail_at, self.taken = n, fail_at, 0

    def __iter__(self):
        for i in range(self.n):
            if i == self.fail_at:
                raise OSError(f"cannot read batch {i}")
            self.taken += 1
            yield torch.tensor([i])


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_keeps_order_and_raises_errors(depth):
    out = list(T.prefetch_to_device(Batches(6), lambda b: b * 10, "cpu", depth))
    assert [int(x) for x in out] == [0, 10, 20, 30, 40, 50]
    with pytest.raises(OSError, match="batch 2"):
        list(T.prefetch_to_device(Batches(6, fail_at=2), lambda b: b, "cpu", depth))

    def bad(b):
        if int(b) == 1:
            raise ValueError("cannot decode image x.jpg")
        return b

    got = []
    with pytest.raises(ValueError, match="x.jpg"):
        for x in T.prefetch_to_device(Batches(6), bad, "cpu", depth):
            got.append(int(x))
    assert got == [0]


def test_prefetch_stops_its_thread_on_break():
    before = threading.active_count()
    source = Batches(100)
    gen = T.prefetch_to_device(source, lambda b: b, "cpu", depth=2)
    for x in gen:
        if int(x) == 3:
            break
    gen.close()
    assert threading.active_count() == before
    assert source.taken <= 4 + 2 + 1  # consumed, queued, one in hand


def test_chained_prefetch_stages_keep_order_errors_and_stop():
    before = threading.active_count()
    first = T.prefetch_to_device(Batches(6), lambda b: b * 10, "cpu", depth=2)
    out = list(T.prefetch_to_device(first, lambda b: b + 1, "cpu", depth=1))
    assert [int(x) for x in out] == [1, 11, 21, 31, 41, 51]
    with pytest.raises(OSError, match="batch 3"):  # an error of the first stage's source
        list(
            T.prefetch_to_device(
                T.prefetch_to_device(Batches(6, 3), lambda b: b, "cpu", 1), lambda b: b, "cpu", 1
            )
        )
    source = Batches(100)
    second = T.prefetch_to_device(
        T.prefetch_to_device(source, lambda b: b, "cpu", 2), lambda b: b, "cpu", 1
    )
    for x in second:
        if int(x) == 3:
            break
    second.close()  # stops both threads
    assert threading.active_count() == before
    assert source.taken <= 4 + 2 + 1 + 1 + 1 + 1  # consumed, queued, in hand per stage


@pytest.mark.parametrize(("decode", "workers"), [("gpu", 0), ("mixed", 1), ("cpu", 0)])
def test_two_stage_device_batches_equal_one_stage(gsv_root, decode, workers):
    ds = D.GSVCitiesDataset(gsv_root, image_size=(32, 32), decode=decode, seed=3)
    cpu = torch.device("cpu")

    def batches(**kw):
        loader, sampler = B.make_loader(ds, 4, seed=0, num_workers=workers, device=cpu)
        sampler.set_epoch(0)
        return list(B.device_batches(loader, ds, cpu, channels_last=True, **kw))

    one, two = batches(), batches(prefetch=2, stages=2)
    assert len(one) == len(two) == -(-len(ds) // 4)  # every place once, the last batch short
    for (x1, y1), (x2, y2) in zip(one, two, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert x2.dtype == torch.float32 and x2.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="needs prefetch > 0"):
        batches(prefetch=0, stages=2)
    with pytest.raises(ValueError, match="stages must be 1 or 2"):
        batches(prefetch=1, stages=3)


def test_two_stages_for_a_dataset_without_device_halves(gsv_root):
    ds = D.GSVCitiesDataset(gsv_root, image_size=(32, 32), decode="cpu", seed=3)
    loader, _ = B.make_loader(ds, 4, seed=0, num_workers=0, device=torch.device("cpu"))
    images, labels = next(iter(loader))
    decode, augment = B.batch_stages(object(), torch.device("cpu"))
    x, y = augment(decode((images, labels)))
    assert torch.equal(x, T.to_model_input(images, "cpu")) and torch.equal(y, labels.reshape(-1))


def tiny_model():
    torch.manual_seed(0)
    return vprlib.VPRModel(
        "resnet18",
        layers_to_freeze=-1,
        layers_to_crop=(3, 4),
        agg="convap",
        agg_config={"out_channels": 16},
    )


def test_fit_with_prefetch_and_mixed_decode_trains_identically(gsv_root):
    kw = dict(
        epochs=1, places_per_batch=4, num_workers=0, progress=False, max_steps_per_epoch=2, seed=1
    )
    ds = vprlib.GSVCitiesDataset(gsv_root, image_size=(32, 32), seed=0)
    plain, fast = tiny_model(), tiny_model()
    h0 = TR.fit(plain, ds, prefetch=0, **kw)
    mixed = vprlib.GSVCitiesDataset(gsv_root, image_size=(32, 32), seed=0, decode="mixed")
    h1 = TR.fit(fast, mixed, prefetch=2, **kw)
    assert h0["loss"].tolist() == h1["loss"].tolist() and h0["steps"].tolist() == [2]
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), fast.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_train_step_is_one_optimizer_step(gsv_root):
    model = tiny_model()
    loss_fn, miner = vprlib.losses.get_loss(), vprlib.losses.get_miner()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = TR.make_optimizer(params, "sgd", 0.1, 0.9, 0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ds = vprlib.GSVCitiesDataset(gsv_root, image_size=(32, 32))
    loader, _ = B.make_loader(ds, 4, seed=0, num_workers=0, device=torch.device("cpu"))
    x, labels = next(iter(B.device_batches(loader, ds, torch.device("cpu"))))
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        desc = model(x)
        mined = miner(desc, labels)
        want_loss = loss_fn(desc, labels, mined).item()
    loss, b_acc = TR.train_step(model, x, labels, loss_fn, miner, opt, scaler, "fp32")
    assert loss.shape == () and not loss.requires_grad  # a tensor, read when fit logs
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    assert float(b_acc) == pytest.approx(vprlib.losses.batch_accuracy(mined, 16))
    assert any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))


HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def test_train_step_with_dense_loss_reads_nothing_back(gsv_root, monkeypatch):
    """With DenseMultiSimilarity the step never asks for a tensor's value on the host (on a
    GPU each such read makes the host wait), and its loss and b_acc equal the library pair's."""
    ds = vprlib.GSVCitiesDataset(gsv_root, image_size=(32, 32))
    loader, _ = B.make_loader(ds, 4, seed=0, num_workers=0, device=torch.device("cpu"))
    x, labels = next(iter(B.device_batches(loader, ds, torch.device("cpu"))))
    results = []
    for loss_fn, miner in [
        (vprlib.losses.get_loss(), vprlib.losses.get_miner()),
        (vprlib.losses.get_loss("DenseMultiSimilarity"), None),
    ]:
        model = tiny_model()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = TR.make_optimizer(params, "sgd", 0.1, 0.9, 0.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        with monkeypatch.context() as patch:
            if miner is None:  # the library's miner reads lengths back: only the dense step
                for name in HOST_READS:
                    patch.setattr(torch.Tensor, name, _refuse(name))
            loss, b_acc = TR.train_step(model, x, labels, loss_fn, miner, opt, scaler, "fp32")
        results.append((float(loss), float(b_acc), [p.detach().clone() for p in params]))
    (loss_lib, bacc_lib, w_lib), (loss_dense, bacc_dense, w_dense) = results
    assert loss_lib > 0 and loss_dense == pytest.approx(loss_lib, rel=1e-5)
    assert bacc_dense == pytest.approx(bacc_lib)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(w_lib, w_dense, strict=True))


def _refuse(name):
    def read(*args, **kwargs):
        raise AssertionError(f"train_step read a tensor back to the host (Tensor.{name})")

    return read


def test_fit_with_dense_loss_trains_as_the_library_pair(gsv_root):
    kw = dict(
        epochs=2, places_per_batch=4, num_workers=0, progress=False, max_steps_per_epoch=2, seed=1
    )
    ds = vprlib.GSVCitiesDataset(gsv_root, image_size=(32, 32), seed=0)
    library, dense = tiny_model(), tiny_model()
    h0 = TR.fit(library, ds, **kw)
    h1 = TR.fit(dense, ds, loss="DenseMultiSimilarity", miner=None, **kw)
    assert h0["loss"].min() > 0 and h0["b_acc"].notna().all()
    for column in ("loss", "b_acc"):
        assert h1[column].tolist() == pytest.approx(h0[column].tolist(), rel=1e-4), column
    for (name, a), (_, b) in zip(
        library.state_dict().items(), dense.state_dict().items(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), atol=1e-4), name
    with pytest.raises(ValueError, match="miner=None"):  # before anything is built
        TR.fit(tiny_model(), object(), loss="DenseMultiSimilarity", epochs=1)


@pytest.mark.parametrize(
    ("cores", "workers"), [(1, 0), (2, 1), (3, 1), (4, 2), (8, 6), (16, 12), (64, 12)]
)
def test_default_num_workers_rule(monkeypatch, cores, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_num_workers() == workers
    assert TR.default_num_workers is default_num_workers  # one rule for train and eval


def test_gpu_decode_extraction_through_workers(bench_root):
    bench = vprlib.load_benchmark(bench_root / "gsv_sample")
    model = tiny_model()
    paths = bench.db_paths[:10]
    kw = dict(batch_size=4, progress=False, image_size=32)
    ref = extract_descriptors(model, paths, num_workers=0, **kw)
    dec = extract_descriptors(model, paths, num_workers=1, gpu_decode=True, **kw)
    assert torch.allclose(torch.from_numpy(ref), torch.from_numpy(dec), atol=1e-5)


def test_cli_compile_choice():
    args = train_cli.build_parser().parse_args(["--compile", "off"])
    assert args.compile == "off"
    assert train_cli.build_parser().parse_args([]).compile == "auto"
