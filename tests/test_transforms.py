"""uint8 transforms, the fast RandAugment, image loading and batch decode/augmentation."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from vprlib import transforms as T

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; they still work
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)


def photo(seed=0, w=64, h=48):
    """A smooth image with texture (a plausible photo stand-in)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), np.int16)
    return np.clip(base + rng.normal(0, 10, size=(h, w, 3)), 0, 255).astype(np.uint8)


def jpeg_bytes(array, mode="RGB", fmt="JPEG"):
    buf = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buf, fmt)
    return buf.getvalue()


IMAGES = [
    torch.from_numpy(photo(0)).permute(2, 0, 1).contiguous(),
    torch.randint(
        0, 256, (3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    ),
    (torch.rand(3, 30, 30, generator=torch.Generator().manual_seed(2)) * 100 + 80).to(torch.uint8),
]


def all_magnitudes(fast, name, signed, magnitudes_fn, shape):
    mags = magnitudes_fn(fast.reference.num_magnitude_bins, *shape)
    if mags is None:
        return [0.0]
    mags = mags[::3]  # bins 0, 3, ..., 30 (the default magnitude 9 included)
    return [float(m) * s for m in mags for s in ((1, -1) if signed else (1,))]


@pytest.mark.parametrize("image", IMAGES, ids=["photo", "noise", "low-contrast"])
def test_fast_randaugment_ops_match_torchvision(image):
    fast = T.FastRandAugment()
    ref = fast.reference
    for name, (fn, signed) in fast.ops:
        for m in all_magnitudes(fast, name, signed, fn, image.shape[-2:]):
            got = fast._apply(image, name, m)
            want = ref._apply_image_or_video_transform(
                image, name, m, interpolation=ref.interpolation, fill=ref._fill
            )
            assert got.dtype == torch.uint8 and got.shape == image.shape
            if name in ("ShearX", "ShearY", "Rotate"):
                # grid built differently: float rounding flips some exact .5 ties (by 1)
                diff = (got.int() - want.int()).abs()
                assert diff.max() <= 1 and (diff > 0).float().mean() < 0.05, (name, m)
            else:
                assert torch.equal(got, want), (name, m)


def test_fast_randaugment_draws_like_torchvision():
    fast = T.FastRandAugment(num_ops=3)
    ref = v2.RandAugment(num_ops=3, interpolation=v2.InterpolationMode.BILINEAR)
    image = IMAGES[0]
    same = 0
    for seed in range(30):
        torch.manual_seed(seed)
        a = fast(image)
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        b = ref(image)
        assert torch.equal(state, torch.random.get_rng_state())  # same RNG consumption
        same += int((a == b).float().mean() > 0.97)
    assert same == 30
    with pytest.raises(TypeError, match="uint8"):
        fast(image.float())


def test_train_and_eval_transforms():
    image = IMAGES[0]
    tf = T.train_transform((20, 30))
    torch.manual_seed(0)
    a = tf(image)
    torch.manual_seed(0)
    b = tf(image)
    assert a.dtype == torch.uint8 and a.shape == (3, 20, 30) and torch.equal(a, b)
    ev = T.eval_transform((20, 30), "bicubic")
    want = F.resize(image, [20, 30], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(ev(image), want)
    assert T.eval_transform(16)(image).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="interpolation"):
        T.eval_transform((8, 8), "lanczos")
    with pytest.raises(ValueError, match="image_size"):
        T.train_transform((8, 8, 8))


def test_bicubic_resize_keeps_bilinear_randaugment_warps():
    """The reference resizes with `interpolation` but RandAugment always warps bilinearly."""
    image = IMAGES[0]
    tf = T.train_transform((40, 56), "bicubic")
    resized = F.resize(image, [40, 56], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    differs = 0
    for seed in range(40):
        torch.manual_seed(seed)
        got = tf(image)
        torch.manual_seed(seed)
        assert torch.equal(got, T.FastRandAugment(3, interpolation="bilinear")(resized)), seed
        torch.manual_seed(seed)
        differs += not torch.equal(got, T.FastRandAugment(3, interpolation="bicubic")(resized))
    assert differs > 0  # some seeds draw a warp, where the two interpolations part


def test_sixteen_bit_png_is_scaled_to_uint8(tmp_path):
    values = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")  # mode I;16
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    img = T.load_image(tmp_path / "deep.png")
    assert img.dtype == torch.uint8 and img.shape == (3, 48, 64)
    want = torch.from_numpy(values.astype(np.float64) / 257).round()
    assert (img[0].double() - want).abs().max() <= 1
    assert img.max() == 255 and img.min() == 0
    with pytest.raises(TypeError, match="uint8"):
        T.to_model_input(torch.zeros(1, 3, 4, 4, dtype=torch.int32), "cpu")


def test_load_image_formats_and_errors(tmp_path):
    rgb = photo(3)
    cases = {"rgb.jpg": ("RGB", "JPEG"), "gray.jpg": ("L", "JPEG"), "cmyk.jpg": ("CMYK", "JPEG")}
    cases["rgb.png"] = ("RGB", "PNG")
    for name, (mode, fmt) in cases.items():
        data = jpeg_bytes(rgb, mode, fmt)
        (tmp_path / name).write_bytes(data)
        img = T.load_image(tmp_path / name)
        assert img.dtype == torch.uint8 and img.shape == (3, 48, 64), name
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        # libjpeg-turbo in torchvision and in PIL may differ slightly (IDCT, CMYK)
        assert np.abs(img.permute(1, 2, 0).numpy().astype(int) - ref).mean() <= 3, name
    assert torch.equal(T.load_image(tmp_path / "rgb.png"), torch.from_numpy(rgb).permute(2, 0, 1))
    (tmp_path / "bad.jpg").write_bytes(jpeg_bytes(rgb)[:300])
    with pytest.raises(ValueError, match="bad.jpg"):
        T.load_image(tmp_path / "bad.jpg")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        T.load_image(tmp_path / "missing.jpg")


def test_decode_jpeg_batch_matches_cpu_decode():
    data = [
        torch.frombuffer(bytearray(jpeg_bytes(photo(s, 64 + 8 * s, 48))), dtype=torch.uint8)
        for s in range(3)
    ]
    out = T.decode_jpeg_batch(data, "cpu", (24, 32))
    want = torch.stack([F.resize(decode_jpeg(d), [24, 32], antialias=True) for d in data])
    assert out.dtype == torch.uint8 and torch.equal(out, want)
    same = [data[0], data[0]]  # one size: resized as one batch
    assert torch.equal(T.decode_jpeg_batch(same, "cpu", (24, 32)), torch.stack([want[0], want[0]]))
    assert T.decode_jpeg_batch([], "cpu", (5, 6)).shape == (0, 3, 5, 6)
    broken = [data[0], data[1][:100].clone()]
    with pytest.raises(ValueError, match="two.jpg"):
        T.decode_jpeg_batch(broken, "cpu", (24, 32), names=["one.jpg", "two.jpg"])


def test_decode_jpeg_batch_falls_back_to_the_cpu_per_image(monkeypatch):
    """An image the device decoder refuses (nvJPEG: some CMYK/lossless files) is decoded on
    the CPU instead; the others stay on the device decoder."""
    data = [
        torch.frombuffer(bytearray(jpeg_bytes(photo(s, 64, 48))), dtype=torch.uint8)
        for s in range(3)
    ]
    want = T.decode_jpeg_batch(data, "cpu", (24, 32))
    device_calls = []
    real = T._decode_jpegs

    def picky_device(batch, device):  # refuses any list that holds image 1
        device_calls.append(len(batch))
        if any(b.data_ptr() == data[1].data_ptr() for b in batch):
            raise RuntimeError("nvjpeg: unsupported JPEG")
        return real(batch, device)

    monkeypatch.setattr(T, "_decode_jpegs", picky_device)
    assert torch.equal(T.decode_jpeg_batch(data, "cpu", (24, 32)), want)
    assert device_calls == [3, 1, 1, 1]  # the batch, then one by one
    broken = [data[0], data[1][:100].clone()]

    def broken_device(batch, device):
        raise RuntimeError("nvjpeg: bad data")

    monkeypatch.setattr(T, "_decode_jpegs", broken_device)
    with pytest.raises(ValueError, match="two.jpg"):
        T.decode_jpeg_batch(broken, "cpu", (24, 32), names=["one.jpg", "two.jpg"])


def test_augment_batch_per_image_and_deterministic():
    batch = torch.stack([IMAGES[0]] * 4)
    seeds = [11, 12, 13, 11]
    out = T.augment_batch(batch, seeds)
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert torch.equal(out[0], out[3])  # same seed, same ops
    assert len({tuple(o.flatten().tolist()[:500]) for o in out[:3]}) == 3  # different ops
    alone = T.augment_batch(batch[1:2], [12])
    assert torch.equal(alone[0], out[1])  # independent of batch composition
    state = torch.random.get_rng_state()
    T.augment_batch(batch, seeds)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    with pytest.raises(ValueError, match="seeds"):
        T.augment_batch(batch, [1, 2])


def test_normalize_and_to_model_input():
    x = torch.randint(0, 256, (2, 4, 3, 8, 8), dtype=torch.uint8)
    y = T.to_model_input(x, "cpu", channels_last=True)
    mean = torch.tensor(T.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(T.IMAGENET_STD).view(1, 3, 1, 1)
    assert y.shape == (8, 3, 8, 8) and torch.allclose(y, (x.flatten(0, 1) / 255.0 - mean) / std)
    assert y.is_contiguous(memory_format=torch.channels_last)
    f = torch.randn(2, 3, 4, 4)
    assert torch.equal(T.to_model_input(f, "cpu"), f)
    with pytest.raises(ValueError, match=r"\[N,3,H,W\]"):
        T.to_model_input(torch.zeros(3, 4, 4), "cpu")
    with pytest.raises(TypeError, match="uint8"):
        T.normalize(f)


def test_bicubic_warps_clamp_instead_of_wrapping():
    """Cubic weights overshoot 0..255 beside sharp edges: the uint8 result must clamp there
    (a wrapped 256+ would turn white pixels black). Where bilinear is exactly white or black,
    the sample lies in a flat block, so bicubic is white or black too, up to the overshoot."""
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    img = (((yy // 8 + xx // 8) % 2) * 255).to(torch.uint8).expand(1, 3, 64, 64).clone()
    bicubic = T.FastRandAugment(num_ops=1, magnitude=9, interpolation="bicubic")
    bilinear = T.FastRandAugment(num_ops=1, magnitude=9, interpolation="bilinear")
    names = [n for n, _ in bicubic.ops]
    for name in ("Rotate", "ShearX", "ShearY"):
        op = names.index(name)
        cub, lin = bicubic.apply_op(img, op, False), bilinear.apply_op(img, op, False)
        assert (cub[lin == 255] >= 250).all(), name
        assert (cub[(lin == 0)] <= 5).all(), name
        assert 0 < (lin == 255).sum() and 0 < (lin == 0).sum()


def test_apply_plans_refuses_float_images():
    plans = T.draw_plans([1, 2], 16, 16)
    with pytest.raises(TypeError, match="uint8"):
        T.apply_plans(torch.rand(2, 3, 16, 16), plans)
