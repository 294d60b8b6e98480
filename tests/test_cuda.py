"""The CUDA paths, checked against the CPU on a machine with a GPU (issue 8).

CI has no GPU, so these are skipped there; `bench/gpu_check.sh` runs them on a GPU machine
(bench/RESULTS.md records the outcome). They check what the CPU tests cannot: nvJPEG decoding
and the device resize/RandAugment agree with the CPU path, RandAugment stays per image on the
device, fit's CUDA defaults (bf16, channels_last, torch.compile, side-stream prefetch, pinned
memory) train, the fp16 GradScaler path trains, and extraction on the GPU (bf16, nvJPEG)
gives the CPU's descriptors.
"""

import numpy as np
import pytest
import torch

import vprlib
from vprlib import batching as B
from vprlib import gsv_dataset as D
from vprlib import train as TR
from vprlib.evaluate import extract_descriptors
from vprlib.transforms import apply_plans

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings(
        "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
    ),
]

SIZE = (64, 80)
CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def finish(ds, encoded, device) -> torch.Tensor:
    """The uint8 batch `batch_to_device` normalises: decoded, resized and augmented."""
    images, plans = ds.decode_on_device(encoded, device)
    return images if plans is None else apply_plans(images, plans, ds.interpolation)


def level_differences(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of two uint8 batches, in grey levels, on the CPU."""
    assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape
    return (a.cpu().int() - b.cpu().int()).abs().float()


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize(("decode", "gpu_images"), [("gpu", None), ("mixed", 0), ("mixed", 2)])
def test_device_decode_and_augment_match_the_cpu(gsv_root, decode, gpu_images, augment):
    ds = D.GSVCitiesDataset(
        gsv_root, image_size=SIZE, decode=decode, gpu_images=gpu_images, augment=augment, seed=5
    )
    enc, _ = ds.collate_fn([ds[i] for i in range(6)])
    on_cpu = finish(ds, enc, CPU)
    on_gpu = finish(ds, enc, CUDA)
    assert on_gpu.device.type == "cuda" and on_gpu.shape == (24, 3, *SIZE)
    diff = level_differences(on_gpu, on_cpu)
    # nvJPEG and libjpeg-turbo round differently (IDCT, chroma upsampling): 1-2 levels on
    # most pixels. With RandAugment a warp or Equalize can turn that into a pixel's shift or
    # a different table, so the mean is allowed more (H200: 1.52 for decode="gpu" with
    # augmentation, every other case under 1.5).
    bound = 2.0 if augment else 1.5
    assert diff.mean() < bound, f"mean difference {diff.mean():.2f} levels"
    assert (diff > 24).float().mean() < 0.02, f"{(diff > 24).float().mean():.3%} pixels differ"
    x = ds.batch_to_device(enc, CUDA, channels_last=True)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)


def test_device_randaugment_stays_per_image(gsv_root):
    ds = D.GSVCitiesDataset(gsv_root, image_size=SIZE, decode="gpu", augment=True, seed=1)
    enc, _ = ds.collate_fn([ds[i] for i in range(8)])
    plain = D.GSVCitiesDataset(gsv_root, image_size=SIZE, decode="gpu", augment=False, seed=1)
    raw, _ = plain.collate_fn([plain[i] for i in range(8)])
    images = finish(plain, raw, CUDA)  # decoded + resized, not augmented
    plans = enc.plans.reshape(len(images), *enc.plans.shape[-2:])
    assert len({tuple(map(tuple, p.tolist())) for p in plans}) > len(plans) // 2
    together = apply_plans(images, plans.to(CUDA), ds.interpolation)
    one_by_one = torch.cat(
        [
            apply_plans(images[i : i + 1], plans[i : i + 1].to(CUDA), ds.interpolation)
            for i in range(len(images))
        ]
    )
    assert torch.equal(together, one_by_one)
    assert torch.equal(together, finish(ds, enc, CUDA))


def tiny_model() -> vprlib.VPRModel:
    torch.manual_seed(0)
    return vprlib.VPRModel(
        "resnet18", layers_to_crop=(4,), agg="convap", agg_config={"out_channels": 32}
    )


def test_fit_with_the_cuda_defaults(gsv_root, bench_root, tmp_path, monkeypatch):
    stages = []  # what fit asks of its input pipeline: two preparation threads on CUDA

    def spy(*args, **kwargs):
        stages.append(kwargs.get("stages", 1))
        return B.device_batches(*args, **kwargs)

    monkeypatch.setattr(TR, "device_batches", spy)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = vprlib.GSVCitiesDataset(gsv_root, image_size=SIZE, seed=0)
    assert ds.for_device(CUDA).decode == "gpu"  # what fit trains with (decode="auto")
    short = dict(places_per_batch=8, progress=False, max_steps_per_epoch=2, warmup_steps=1)
    val = bench_root / "gsv_sample"
    history = TR.fit(model, ds, epochs=2, num_workers=2, val=val, checkpoint_dir=tmp_path, **short)
    # decode, device, precision (bf16), compile, channels_last, prefetch: all left at "auto"
    assert history["steps"].tolist() == [2, 4]
    assert stages == [2, 2]
    assert np.isfinite(history["loss"]).all() and (history["images_per_s"] > 0).all()
    assert history["gsv_sample_R@1"].between(0, 1).all()
    assert next(model.parameters()).device.type == "cuda"
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before)
    assert (tmp_path / "last.ckpt").is_file() and (tmp_path / "best.ckpt").is_file()
    resumed = tiny_model()
    more = TR.fit(
        resumed,
        ds,
        epochs=3,
        num_workers=0,
        checkpoint_dir=tmp_path,
        resume=True,
        compile=False,
        **short,
    )
    assert more["steps"].tolist()[-1] == 6


def test_fit_fp16_with_grad_scaler(gsv_root, tmp_path):
    model = tiny_model()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ds = vprlib.GSVCitiesDataset(gsv_root, image_size=SIZE, seed=0)
    history = TR.fit(
        model,
        ds,
        epochs=1,
        places_per_batch=8,
        num_workers=1,
        progress=False,
        max_steps_per_epoch=3,
        precision="fp16",
        compile=False,
        optimizer="adamw",
        lr=1e-4,
        checkpoint_dir=tmp_path,
    )
    assert np.isfinite(history["loss"]).all() and history["steps"].tolist() == [3]
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["fit_args"]["precision"] == "fp16" and ckpt["scaler"]["scale"] > 0  # scaler on
    after = model.state_dict()
    assert any(not torch.equal(after[k].cpu(), before[k].cpu()) for k in before)  # it trained


@pytest.mark.parametrize("gpu_decode", [False, True, None])
def test_extraction_on_cuda_matches_the_cpu(bench_root, gpu_decode):
    bench = vprlib.load_benchmark(bench_root / "gsv_sample")
    model = tiny_model().eval()
    paths = bench.db_paths[:24]
    kw = dict(batch_size=8, progress=False, image_size=SIZE, num_workers=2)
    on_cpu = extract_descriptors(model, paths, device="cpu", **kw)
    on_gpu = extract_descriptors(
        model, paths, device="cuda", gpu_decode=gpu_decode, precision="bf16", **kw
    )
    assert on_gpu.dtype == np.float32 and on_gpu.shape == on_cpu.shape
    cosine = (on_cpu * on_gpu).sum(1) / (
        np.linalg.norm(on_cpu, axis=1) * np.linalg.norm(on_gpu, axis=1)
    )
    assert cosine.min() > 0.99, cosine.min()  # bf16 autocast on the GPU, fp32 on the CPU
    if gpu_decode is None:  # the default decodes the .jpg files with nvJPEG on CUDA
        nvjpeg = extract_descriptors(
            model, paths, device="cuda", gpu_decode=True, precision="bf16", **kw
        )
        assert np.array_equal(on_gpu, nvjpeg)
        # the default precision (fp32; TF32 convolutions) with the CPU's decoding: only the
        # device differs, so the descriptors agree far more closely than bf16's
        fp32 = extract_descriptors(model, paths, device="cuda", gpu_decode=False, **kw)
        cos32 = (on_cpu * fp32).sum(1) / (
            np.linalg.norm(on_cpu, axis=1) * np.linalg.norm(fp32, axis=1)
        )
        assert cos32.min() > 0.999, cos32.min()


def test_nvjpeg_never_writes_into_memory_still_in_use(bench_root):
    """nvJPEG writes on its own stream into tensors allocated on ours: back-to-back decodes
    behind a busy stream must not overwrite the first batch's images before it is resized
    (pytorch/vision PR 9606; _decode_jpegs drains the stream first)."""
    from vprlib.transforms import decode_jpeg_batch, read_image_bytes

    paths = vprlib.load_benchmark(bench_root / "gsv_sample").db_paths[:16]  # all one size
    data = [read_image_bytes(p) for p in paths]
    want = decode_jpeg_batch(data, CUDA, SIZE, "bilinear", paths)
    torch.cuda.synchronize()
    for _ in range(5):
        busy = torch.randn(4096, 4096, device=CUDA)
        for _ in range(20):  # ~tens of ms of queued work ahead of the resizes
            busy = torch.tanh(busy @ busy)
        first = decode_jpeg_batch(data, CUDA, SIZE, "bilinear", paths)
        # other pixels into the same freed blocks: a write under `first` would show
        second = decode_jpeg_batch(data[::-1], CUDA, SIZE, "bilinear", paths[::-1])
        torch.cuda.synchronize()
        assert torch.equal(first, want) and torch.equal(second, want.flip(0))


@pytest.mark.parametrize("priority", [0, -1])
def test_prefetch_side_stream_priority(priority):
    """prefetch_to_device prepares batches on a side stream of the asked priority (clamped to
    the device's range) and hands over the same values whatever the priority."""
    from vprlib.transforms import prefetch_to_device

    seen = []

    def prepare(x):
        stream = torch.cuda.current_stream()
        seen.append(stream.priority)
        return x.to(CUDA, non_blocking=True) * 2

    batches = [torch.arange(1000.0) + i for i in range(5)]
    out = list(prefetch_to_device(batches, prepare, CUDA, depth=2, priority=priority))
    assert all(torch.equal(o.cpu(), b * 2) for o, b in zip(out, batches, strict=True))
    lo, hi = sorted(torch.cuda.Stream.priority_range())  # e.g. (-5, 0): -5 is the highest
    want = min(max(priority, lo), hi)
    assert seen == [want] * 5, seen


@pytest.mark.parametrize("decode", ["mixed", "gpu"])
def test_two_stage_device_batches_on_cuda_equal_one_stage(gsv_root, decode):
    """device_batches(stages=2): decode and augment in two threads on two side streams, each
    batch handed from one stream to the next by events; the batches equal one stage's."""
    ds = D.GSVCitiesDataset(gsv_root, image_size=SIZE, decode=decode, seed=2)

    def batches(**kw):
        loader, sampler = B.make_loader(ds, 8, seed=0, num_workers=2, device=CUDA)
        sampler.set_epoch(0)
        return [(x.cpu(), y.cpu()) for x, y in B.device_batches(loader, ds, CUDA, True, **kw)]

    one, two = batches(prefetch=1), batches(prefetch=2, stages=2, priority=-1)
    assert len(one) == len(two) > 1
    for (x1, y1), (x2, y2) in zip(one, two, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_train_step_with_dense_loss_never_syncs():
    """torch.cuda sync debug mode "error" raises at any op that makes the host wait for the
    GPU: the step with DenseMultiSimilarity has none; with the library's miner + loss it
    has (so the check can fail). The two give the same loss."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 32)).to(CUDA)
    x = torch.randn(64, 3, 4, 4, device=CUDA)
    labels = torch.arange(16, device=CUDA).repeat_interleave(4)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    losses = {}
    for name, miner in [("DenseMultiSimilarity", None), ("MultiSimilarityLoss", "default")]:
        step_model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 32)).to(CUDA)
        step_model.load_state_dict(model.state_dict())
        opt = TR.make_optimizer(list(step_model.parameters()), "sgd", 0.1, 0.9, 0.0)
        loss_fn = vprlib.losses.get_loss(name)
        miner_fn = vprlib.losses.get_miner() if miner else None
        first, _ = TR.train_step(step_model, x, labels, loss_fn, miner_fn, opt, scaler, "bf16")
        losses[name] = float(first)  # the same weights for both: the same loss
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            if miner is None:
                TR.train_step(step_model, x, labels, loss_fn, miner_fn, opt, scaler, "bf16")
            else:
                with pytest.raises(RuntimeError, match="synchroniz"):
                    TR.train_step(step_model, x, labels, loss_fn, miner_fn, opt, scaler, "bf16")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert losses["DenseMultiSimilarity"] > 0
    assert losses["DenseMultiSimilarity"] == pytest.approx(losses["MultiSimilarityLoss"], rel=1e-4)


def test_prefetch_marks_tensors_in_dicts_as_used_on_the_consumer_stream(monkeypatch):
    """A to_device returning a dict: its CUDA tensors are recorded on the consumer's stream
    (else the allocator may reuse their memory while the step still reads them); and
    to_model_input back to the CPU is a finished copy."""
    from vprlib.transforms import prefetch_to_device, to_model_input

    recorded = []
    original = torch.Tensor.record_stream

    def record(self, stream):
        recorded.append(self.data_ptr())
        return original(self, stream)

    monkeypatch.setattr(torch.Tensor, "record_stream", record)
    batches = [torch.full((4,), i) for i in range(3)]
    out = list(prefetch_to_device(batches, lambda b: {"x": b.to(CUDA)}, CUDA, 1))
    assert [int(o["x"][0]) for o in out] == [0, 1, 2]
    assert {o["x"].data_ptr() for o in out} <= set(recorded)
    images = torch.zeros((8, 3, 256, 256), dtype=torch.uint8, device=CUDA)
    torch.cuda._sleep(int(2e8))  # the GPU is busy for a while before it writes the images
    images.fill_(200)
    got = to_model_input(images, CPU)  # an unfinished copy would hold zeros
    assert torch.equal(got, to_model_input(torch.full_like(images, 200).cpu(), CPU))
