"""load_pretrained: released key layout against an independent functional computation,
architecture inference, strict-loading errors, weights-only refusal, and the download cache
(local HTTP server on 127.0.0.1: complete, partial and tampered downloads)."""

import contextlib
import hashlib
import http.server
import io
import json
import math
import os
import pickle
import shutil
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from vprlib.download import fetch_released, released_name, sidecar_path
from vprlib.models import VPRModel, infer_config, load_pretrained

# ----------------------------------------------------------------------------- released layout


def released_layout(out_channels, crop4=False, seed=1):
    """A torchvision ResNet50 with random weights and non-trivial BatchNorm statistics, and
    its state dict in the released layout plus random Conv-AP weights (built without vprlib)."""
    torch.manual_seed(seed)
    tv = torchvision.models.resnet50()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.num_batches_tracked.fill_(1234)
    state = {
        "backbone.model." + k: v
        for k, v in tv.state_dict().items()
        if not k.startswith("fc.") and not (crop4 and k.startswith("layer4."))
    }
    in_channels = 1024 if crop4 else 2048
    state["aggregator.channel_pool.weight"] = torch.randn(out_channels, in_channels, 1, 1) * 0.03
    state["aggregator.channel_pool.bias"] = torch.randn(out_channels) * 0.1
    return tv.eval(), state


def reference_descriptors(tv, state, x, crop4=False, pool=(2, 2)):
    """Conv-AP descriptors computed by hand from a torchvision ResNet50."""
    with torch.no_grad():
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        h = tv.layer3(tv.layer2(tv.layer1(h)))
        if not crop4:
            h = tv.layer4(h)
        w, b = state["aggregator.channel_pool.weight"], state["aggregator.channel_pool.bias"]
        h = F.adaptive_avg_pool2d(F.conv2d(h, w, b), pool)
        return F.normalize(h.flatten(1), p=2, dim=1)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The 4096-d released layout saved plain (under its released file name) and Lightning-style."""
    folder = tmp_path_factory.mktemp("released")
    tv, state = released_layout(out_channels=1024)
    plain = folder / "resnet50_ConvAP_1024_2x2.ckpt"
    torch.save(state, plain)
    lightning = folder / "lightning.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10}, lightning)
    return tv, state, plain, lightning


def test_released_layout_has_320_keys(released):
    _, state, _, _ = released
    assert len(state) == 320


def test_released_plain_and_lightning_match_functional_computation(released):
    tv, state, plain, lightning = released
    x = torch.randn(2, 3, 64, 64)
    expected = reference_descriptors(tv, state, x)
    for path, interpolation in ((plain, "bicubic"), (lightning, "bilinear")):
        renamed = path == lightning  # the released architecture under another name: warned
        with pytest.warns(UserWarning, match="bicubic") if renamed else contextlib.nullcontext():
            model = load_pretrained(path)
        assert not model.training
        assert model.descriptor_dim == 4096
        assert model.config["backbone"] == "resnet50" and model.config["layers_to_crop"] == []
        assert model.config["agg_config"]["out_channels"] == 1024
        assert model.preprocess["interpolation"] == interpolation
        assert model.preprocess["image_size"] == (320, 320)
        with torch.no_grad():
            got = model(x)
        assert (got - expected).abs().max().item() <= 1e-5


def test_cropped_layout_and_pool_override_match_functional(tmp_path):
    tv, state = released_layout(out_channels=64, crop4=True, seed=2)
    assert not any(".layer4." in k for k in state)
    path = tmp_path / "crop.ckpt"
    torch.save(state, path)
    x = torch.randn(2, 3, 64, 64)
    model = load_pretrained(path)
    assert model.config["layers_to_crop"] == [4] and model.descriptor_dim == 256
    with torch.no_grad():
        assert (model(x) - reference_descriptors(tv, state, x, crop4=True)).abs().max() <= 1e-5
    model = load_pretrained(path, agg_config={"s1": 3, "s2": 1}, image_size=224)
    assert model.descriptor_dim == 192 and model.preprocess["image_size"] == (224, 224)
    with torch.no_grad():
        ref = reference_descriptors(tv, state, x, crop4=True, pool=(3, 1))
        assert (model(x) - ref).abs().max() <= 1e-5


def test_lightning_file_of_the_reference_code_keeps_its_pool_size(tmp_path):
    """Conv-AP's pool has no weights: a Lightning file written by the reference training code
    says s1 x s2 only in its hyper_parameters, which must win over the 2x2 guess."""
    tv, state = released_layout(out_channels=64, crop4=True, seed=3)
    hparams = {
        "backbone_arch": "resnet50",
        "layers_to_crop": [4],
        "agg_arch": "ConvAP",
        "agg_config": {"in_channels": 1024, "out_channels": 64, "s1": 3, "s2": 3},
    }
    path = tmp_path / "epoch=09.ckpt"
    torch.save({"state_dict": state, "epoch": 9, "hyper_parameters": hparams}, path)
    model = load_pretrained(path)
    assert model.config["agg_config"]["s1"] == model.config["agg_config"]["s2"] == 3
    assert model.descriptor_dim == 64 * 9
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = reference_descriptors(tv, state, x, crop4=True, pool=(3, 3))
        assert (model(x) - ref).abs().max() <= 1e-5
    assert load_pretrained(path, agg_config={"s1": 1, "s2": 1}).descriptor_dim == 64  # override
    hparams["agg_config"]["s1"] = "3"  # not a pool size: ignored with a warning, overridable
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    with pytest.warns(UserWarning, match="s1='3'"):
        assert load_pretrained(path).descriptor_dim == 64 * 4
    with pytest.warns(UserWarning, match="s1='3'"):
        assert load_pretrained(path, agg_config={"s1": 3, "s2": 3}).descriptor_dim == 64 * 9
    for bad in (math.nan, math.inf, True, 0):
        hparams["agg_config"]["s1"] = bad
        torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
        with pytest.warns(UserWarning, match="not a pool size"):
            assert load_pretrained(path).descriptor_dim == 64 * 4


def test_an_override_that_does_not_fit_names_the_file(tmp_path):
    tv, state = released_layout(out_channels=64, crop4=True, seed=4)
    path = tmp_path / "crop.ckpt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"crop\.ckpt: unknown agg_config .*with \{'agg': 'gem'\}"):
        load_pretrained(path, agg="gem")  # the file's Conv-AP settings do not fit GeM


def test_renamed_released_warning_only_for_the_released_pool(released, tmp_path):
    """The bicubic hint is for the released 4096-d model (2x2 pool): the same layers with a
    3x3 pool, as a Lightning file says, are another model and get no hint."""
    _, state, _, _ = released
    path = tmp_path / "run.ckpt"
    hparams = {"agg_config": {"out_channels": 1024, "s1": 3, "s2": 3}}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_pretrained(path)
    assert model.descriptor_dim == 1024 * 9 and model.preprocess["interpolation"] == "bilinear"


# ----------------------------------------------------------------------------- inference


ARCHS = [
    (backbone, crop, agg, cfg)
    for backbone in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
    for crop in ([], [4], [3, 4])
    for agg, cfg in (("convap", {"out_channels": 96, "s1": 2, "s2": 2}),)
] + [
    ("resnext50_32x4d", [4], "gem", {}),
    ("wide_resnet50_2", [], "cosplace", {"out_dim": 64}),
    ("resnet50", [4], "mixvpr", {"out_channels": 32, "out_rows": 3, "mix_depth": 2}),
    ("resnet18", [3, 4], "mixvpr", {"mix_depth": 0}),
    ("resnet34", [], "netvlad", {"clusters": 8, "reduce_dim": 32}),
    ("resnet18", [], "netvlad", {"clusters": 16}),
    ("resnet50", [3, 4], "avg", {}),
]


@pytest.mark.parametrize("backbone, crop, agg, cfg", ARCHS)
def test_architecture_inferred_from_keys_and_shapes(backbone, crop, agg, cfg):
    with torch.device("meta"):  # shapes only
        model = VPRModel(backbone, layers_to_crop=crop, agg=agg, agg_config=cfg)
        inferred = infer_config(model.state_dict())
        rebuilt = VPRModel(**inferred)
    # resnet101 without layer3/layer4 keeps exactly resnet50's layers: the first match wins.
    expected = model.config
    if backbone == "resnet101" and crop == [3, 4]:
        expected["backbone"] = "resnet50"
    assert rebuilt.config == expected
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_model_config_in_checkpoint_is_used_and_roundtrip(tmp_path):
    model = VPRModel("resnet18", layers_to_crop=[4], agg="gem", layers_to_freeze=-1).eval()
    with torch.no_grad():
        model.aggregator.p.fill_(2.5)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "model_config": model.config}, path)
    loaded = load_pretrained(path)
    assert loaded.config == model.config
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "agg, cfg",
    [
        ("convap", {"out_channels": 16}),
        ("gem", {}),
        ("cosplace", {"out_dim": 32}),
        ("mixvpr", {"in_h": 8, "in_w": 8, "out_channels": 16, "mix_depth": 2, "mlp_ratio": 2}),
        ("netvlad", {"clusters": 4, "reduce_dim": 8}),
        ("avg", {}),
    ],
)
def test_save_then_load_pretrained_gives_equal_outputs(tmp_path, agg, cfg):
    model = VPRModel("resnet18", layers_to_crop=[3, 4], agg=agg, agg_config=cfg).eval()
    with torch.no_grad():
        for p in model.aggregator.parameters():
            p.add_(0.1)  # not the init values
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = load_pretrained(path, image_size=(64, 64))  # mixvpr: 8x8 features from 64x64
    assert loaded.config == model.config
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("agg", "cfg"),
    [
        ("convap", {"out_channels": 16, "s1": 3, "s2": 3}),  # pool size has no weights
        ("gem", {"eps": 0.01}),
        ("netvlad", {"clusters": 4, "normalize_input": False}),
    ],
)
def test_save_keeps_settings_that_have_no_weights(tmp_path, agg, cfg):
    """A plain state dict cannot tell these settings; the default save carries them."""
    model = VPRModel("resnet18", layers_to_crop=[3, 4], agg=agg, agg_config=cfg).eval()
    model.save(tmp_path / "m.pt")
    loaded = load_pretrained(tmp_path / "m.pt")
    assert loaded.config == model.config
    model.save(tmp_path / "plain.pt", released_layout=True)
    guessed = load_pretrained(tmp_path / "plain.pt")
    assert guessed.config["agg_config"] != model.config["agg_config"]  # why the default differs
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_save_keeps_preprocess_and_arguments_override_it(tmp_path):
    """A model trained at 64x96 must not be evaluated at 320x320 after a save/load."""
    model = VPRModel("resnet18", layers_to_crop=[3, 4], agg="gem")
    model.preprocess = {"image_size": (64, 96), "interpolation": "bicubic", "mean": (0.5,) * 3}
    model.save(tmp_path / "m.pt")
    assert load_pretrained(tmp_path / "m.pt").preprocess == model.preprocess
    override = load_pretrained(tmp_path / "m.pt", image_size=32)
    assert override.preprocess == {**model.preprocess, "image_size": (32, 32)}
    model.save(tmp_path / "plain.pt", released_layout=True)  # a plain state dict cannot tell
    assert load_pretrained(tmp_path / "plain.pt").preprocess["image_size"] == (320, 320)


def test_released_4096_under_another_name_warns_about_bicubic(released, tmp_path):
    _, _, plain, _ = released
    renamed = tmp_path / "resnet50_ConvAP_1024_2x2 (1).ckpt"
    shutil.copy(plain, renamed)
    with pytest.warns(UserWarning, match=r"interpolation='bicubic'"):
        model = load_pretrained(renamed)
    assert model.preprocess["interpolation"] == "bilinear"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_pretrained(renamed, interpolation="bicubic").preprocess["interpolation"] == (
            "bicubic"
        )
        load_pretrained(plain)  # the released name: bicubic, no warning


def test_unrecognised_layout_error_names_the_file(tmp_path, resnet18_file):
    state = torch.load(resnet18_file, weights_only=True)
    path = tmp_path / "odd_layout.ckpt"
    torch.save({k.replace("backbone.model.", "backbone."): v for k, v in state.items()}, path)
    with pytest.raises(ValueError, match=r"odd_layout\.ckpt: not a vprlib/GSV-Cities checkpoint"):
        load_pretrained(path)


@pytest.mark.parametrize("prefix", ["module.", "model.", "module._orig_mod."])
def test_uniform_wrapper_prefix_is_stripped(tmp_path, prefix):
    model = VPRModel("resnet18", layers_to_crop=[3, 4], agg="convap", agg_config={"s1": 1})
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": {prefix + k: v for k, v in model.state_dict().items()}}, path)
    loaded = load_pretrained(path, agg_config={"s1": 1})
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    model = VPRModel(
        "resnet18", layers_to_crop=[3, 4], agg="convap", agg_config={"out_channels": 8}
    )
    path = tmp_path_factory.mktemp("r18") / "r18.ckpt"
    model.save(path, released_layout=True)
    return path


def test_missing_and_unexpected_keys_listed_by_name(tmp_path, resnet18_file):
    state = torch.load(resnet18_file, weights_only=True)
    del state["backbone.model.layer1.0.bn1.running_var"]
    state["aggregator.extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.ckpt"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_pretrained(path)
    message = str(err.value)
    assert str(path) in message
    assert "1 missing: ['backbone.model.layer1.0.bn1.running_var']" in message
    assert "1 unexpected: ['aggregator.extra.weight']" in message


def test_other_architecture_gives_clear_error(resnet18_file):
    with pytest.raises(ValueError) as err:
        load_pretrained(resnet18_file, backbone="resnet50")
    message = str(err.value)
    assert "'backbone': 'resnet50'" in message
    assert "backbone.model.layer1.0.conv3.weight" in message and "more)" in message
    assert "backbone.model.layer1.0.conv1.weight: file (64, 64, 3, 3) vs model (64, 64, 1, 1)" in (
        message
    )


def test_shape_mismatch_listed(resnet18_file):
    with pytest.raises(ValueError, match=r"channel_pool.weight: file \(8, 128, 1, 1\) vs model"):
        load_pretrained(resnet18_file, agg_config={"out_channels": 4})


def test_bad_names_files_and_options(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"resnet50_ConvAP_1024_2x2.*convap-4096"):
        load_pretrained("resnet50_ConvAP_999_2x2")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['pretrained'\]"):
        load_pretrained("convap-4096", pretrained=True)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(pickle.UnpicklingError, match=r"refused to load .*notes.ckpt"):
        load_pretrained(text)
    odd = tmp_path / "odd.ckpt"
    torch.save({"epoch": 3, "weights": [1, 2]}, odd)
    with pytest.raises(ValueError, match=r"odd.ckpt: expected a state dict"):
        load_pretrained(odd)
    alien = tmp_path / "alien.ckpt"
    torch.save({"encoder.weight": torch.zeros(2)}, alien)
    with pytest.raises(ValueError, match="no backbone.model.layer1/layer2 keys"):
        load_pretrained(alien)


class _Payload:
    """Pickles as a call to os.mkdir: unpickling it without weights_only runs that call."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_callable_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": {"backbone.model.conv1.weight": torch.zeros(1)}, "x": _Payload(marker)}, path
    )
    with pytest.raises(pickle.UnpicklingError, match=r"refused to load .*evil.ckpt.*posix.mkdir"):
        load_pretrained(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.is_dir()


def test_released_name_variants():
    assert released_name("resnet50_ConvAP_1024_2x2") == "resnet50_ConvAP_1024_2x2"
    assert released_name("resnet50_ConvAP_128_2x2.ckpt") == "resnet50_ConvAP_128_2x2"
    assert released_name("convap-8192") == "resnet50_ConvAP_2048_2x2"
    assert released_name("ConvAP-2048") == "resnet50_ConvAP_512_2x2"
    assert released_name("resnet50_ConvAP_1024") is None


# ----------------------------------------------------------------------------- downloads


def checkpoint_bytes(n_floats: int, seed: int = 0) -> bytes:
    """A real torch.save file (downloads are checked to be whole checkpoints)."""
    buf = io.BytesIO()
    torch.save({"w": torch.randn(n_floats, generator=torch.Generator().manual_seed(seed))}, buf)
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}
    hits: list = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.hits.append(self.path)
        if self.path not in self.routes:
            self.send_error(404)
            return
        source, declared = self.routes[self.path]
        size = source.stat().st_size if isinstance(source, Path) else len(source)
        self.send_response(200)
        if declared != "none":  # "none": no Content-Length, the body ends when the server closes
            self.send_header("Content-Length", str(declared if declared is not None else size))
        self.end_headers()
        if isinstance(source, Path):
            with open(source, "rb") as f:
                shutil.copyfileobj(f, self.wfile)
        else:
            self.wfile.write(source)  # a declared length above this = the server closes early

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    _Handler.routes, _Handler.hits = {}, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    httpd.shutdown()
    httpd.server_close()


def test_download_records_sha_and_uses_cache(tmp_path, server):
    base, handler = server
    payload = checkpoint_bytes(75_000)
    handler.routes["/w.ckpt"] = (payload, None)
    cache = tmp_path / "cache"
    path = fetch_released("convap-512", url=base + "/w.ckpt", folder=cache, progress=True)
    assert path == cache / "resnet50_ConvAP_128_2x2.ckpt"
    assert path.read_bytes() == payload
    record = json.loads(sidecar_path(path).read_text())
    assert record["sha256"] == hashlib.sha256(payload).hexdigest()
    assert record["size"] == len(payload)
    again = fetch_released("resnet50_ConvAP_128_2x2.ckpt", url=base + "/w.ckpt", folder=cache)
    assert again == path and handler.hits == ["/w.ckpt"]  # second call: no request
    assert sorted(p.name for p in cache.iterdir()) == [path.name, path.name + ".json"]


def test_tampered_cache_file_detected(tmp_path, server):
    base, handler = server
    payload = checkpoint_bytes(12_000)
    handler.routes["/w.ckpt"] = (payload, None)
    cache = tmp_path / "cache"
    path = fetch_released("convap-2048", url=base + "/w.ckpt", folder=cache, progress=False)
    path.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(
        ValueError, match=r"resnet50_ConvAP_512_2x2.ckpt does not match its recorded"
    ):
        fetch_released("convap-2048", folder=cache)
    path.write_bytes(payload[:1000])
    with pytest.raises(ValueError, match="found 1000 bytes"):
        fetch_released("convap-2048", folder=cache)


@pytest.mark.parametrize(
    "route, error", [("/short", "ended early|incomplete"), ("/missing", "404")]
)
def test_failed_download_leaves_nothing_in_cache(tmp_path, server, route, error):
    base, handler = server
    handler.routes["/short"] = (os.urandom(100_000), 250_000)  # closes after 100 kB of 250 kB
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match=error):
        fetch_released("convap-4096", url=base + route, folder=cache, progress=False)
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize(
    "body",
    [
        checkpoint_bytes(75_000)[:150_000],  # the server closed early, no Content-Length
        b"<!DOCTYPE html><html><title>Google Drive - Quota exceeded</title></html>",
    ],
    ids=["truncated", "html"],
)
def test_download_that_is_not_a_whole_checkpoint_is_not_cached(tmp_path, server, body):
    base, handler = server
    handler.routes["/w.ckpt"] = (body, "none")
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="not a complete PyTorch checkpoint.*nothing was cached"):
        fetch_released("convap-512", url=base + "/w.ckpt", folder=cache, progress=False)
    assert list(cache.iterdir()) == []
    handler.routes["/w.ckpt"] = (checkpoint_bytes(75_000), "none")  # a good retry then lands
    path = fetch_released("convap-512", url=base + "/w.ckpt", folder=cache, progress=False)
    assert path.read_bytes() == checkpoint_bytes(75_000)


def test_failing_custom_downloader_leaves_nothing(tmp_path):
    def downloader(filename, f):
        assert filename == "resnet50_ConvAP_2048_2x2.ckpt"
        f.write(b"x" * 1000)
        raise ConnectionError("network went away")

    cache = tmp_path / "cache"
    with pytest.raises(ConnectionError):
        fetch_released("convap-8192", downloader=downloader, folder=cache)
    assert list(cache.iterdir()) == []


def test_load_pretrained_downloads_released_name_into_hub_cache(tmp_path, server, released):
    tv, state, plain, _ = released
    base, handler = server
    handler.routes["/file"] = (plain, None)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        model = load_pretrained("convap-4096", url=base + "/file", progress=False)
        cached = tmp_path / "hub" / "checkpoints" / "resnet50_ConvAP_1024_2x2.ckpt"
        assert cached.read_bytes() == plain.read_bytes()
        assert sidecar_path(cached).exists()
        assert model.preprocess["interpolation"] == "bicubic"
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert (model(x) - reference_descriptors(tv, state, x)).abs().max() <= 1e-5
        load_pretrained("resnet50_ConvAP_1024_2x2.ckpt")  # from the cache: no second request
        assert handler.hits == ["/file"]
    finally:
        torch.hub.set_dir(old)


def test_gdrive_path_lists_folder_and_streams_the_named_file(tmp_path, monkeypatch):
    """The Drive path with a stand-in gdown (no network); the calls must fit real gdown."""
    import importlib
    import inspect
    import sys
    import types

    import gdown as real_gdown

    calls = []
    item = importlib.import_module("gdown.download").GoogleDriveFileToDownload

    def download_folder(**kw):
        calls.append(("download_folder", kw))
        return [
            item(id="id-a", path="weights/resnet50_ConvAP_512_2x2.ckpt", local_path="x"),
            item(id="id-b", path="weights/resnet50_ConvAP_128_2x2.ckpt", local_path="y"),
        ]

    def download(**kw):
        calls.append(("download", kw))
        torch.save({"weights-of": kw["id"]}, kw["output"])

    fake = types.SimpleNamespace(download_folder=download_folder, download=download)
    monkeypatch.setitem(sys.modules, "gdown", fake)
    path = fetch_released("convap-512", folder=tmp_path, progress=False)
    assert torch.load(path, weights_only=True) == {"weights-of": "id-b"}
    for name, kw in calls:
        inspect.signature(getattr(real_gdown, name)).bind(**kw)  # real gdown accepts these
    assert calls[0][1]["url"].endswith("1VYPw9uGD11NgiGFgfWueLt3noJYOIuhL")
    assert calls[0][1]["skip_download"] is True
    with pytest.raises(FileNotFoundError, match=r"resnet50_ConvAP_1024_2x2.ckpt not found"):
        fetch_released("convap-4096", folder=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".json"]

    def over_quota(**kw):
        raise OSError("Too many users have viewed or downloaded this file recently")

    fake.download = over_quota
    with pytest.raises(
        RuntimeError,
        match=r"could not download resnet50_ConvAP_512_2x2.ckpt .*Too many users.*by hand",
    ):
        fetch_released("convap-2048", folder=tmp_path / "other", progress=False)
    assert list((tmp_path / "other").iterdir()) == []


def test_fresh_download_replaces_a_stale_record(tmp_path, server):
    """A record pinned to a broken file must not refuse the good file downloaded after the
    broken one was deleted: the fresh download writes its own record."""
    base, handler = server
    good = checkpoint_bytes(40_000)
    handler.routes["/w.ckpt"] = (good, None)
    cache = tmp_path / "cache"
    cache.mkdir()
    path = cache / "resnet50_ConvAP_128_2x2.ckpt"
    sidecar_path(path).write_text(json.dumps({"file": path.name, "size": 5, "sha256": "0" * 64}))
    assert fetch_released("convap-512", url=base + "/w.ckpt", folder=cache) == path
    record = json.loads(sidecar_path(path).read_text())
    assert record == {
        "file": path.name,
        "size": len(good),
        "sha256": hashlib.sha256(good).hexdigest(),
    }
    assert fetch_released("convap-512", folder=cache) == path  # and it verifies later


def test_a_broken_file_in_the_cache_is_not_recorded(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    path = cache / "resnet50_ConvAP_128_2x2.ckpt"
    path.write_bytes(checkpoint_bytes(40_000)[:90_000])  # a partial copy put there by hand
    with pytest.raises(
        ValueError, match=r"resnet50_ConvAP_128_2x2.ckpt is in the checkpoint cache"
    ):
        fetch_released("convap-512", folder=cache)
    assert not sidecar_path(path).exists()
    path.write_bytes(checkpoint_bytes(40_000))  # the whole file: recorded on first use
    fetch_released("convap-512", folder=cache)
    assert json.loads(sidecar_path(path).read_text())["size"] == path.stat().st_size


def test_read_only_cache_is_used_without_a_record(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    path = cache / "resnet50_ConvAP_128_2x2.ckpt"
    path.write_bytes(checkpoint_bytes(40_000))
    import vprlib.download as dl

    def refuse(side, text):
        raise PermissionError(13, "Permission denied", str(side))

    monkeypatch.setattr(dl, "atomic_write_text", refuse)  # as in a read-only folder
    with pytest.warns(UserWarning, match=r"could not write the integrity record .*\.ckpt\.json"):
        assert fetch_released("convap-512", folder=cache) == path
    assert not sidecar_path(path).exists()
    with warnings.catch_warnings():  # once per file: not again at every load
        warnings.simplefilter("error")
        assert fetch_released("convap-512", folder=cache) == path


def test_stale_temporary_downloads_are_removed(tmp_path, server):
    base, handler = server
    handler.routes["/w.ckpt"] = (checkpoint_bytes(40_000), None)
    cache = tmp_path / "cache"
    cache.mkdir()
    old = cache / ".resnet50_ConvAP_128_2x2.ckpt.abc123.tmp"  # a download killed long ago
    young = cache / ".resnet50_ConvAP_128_2x2.ckpt.def456.tmp"  # maybe still running
    other = cache / ".resnet18-f37072fd.pth.xyz.tmp"  # not ours
    for f in (old, young, other):
        f.write_bytes(b"x" * 100)
    day_ago = os.path.getmtime(old) - 2 * 24 * 3600
    os.utime(old, (day_ago, day_ago))
    os.utime(other, (day_ago, day_ago))
    fetch_released("convap-512", url=base + "/w.ckpt", folder=cache, progress=False)
    assert not old.exists() and young.exists() and other.exists()


@pytest.mark.parametrize(
    ("route", "error"),
    [("/missing", r"download of http://127\.0\.0\.1:\d+/missing failed: HTTPError: .*404")],
)
def test_http_errors_name_the_url(tmp_path, server, route, error):
    base, _ = server
    with pytest.raises(OSError, match=error):
        fetch_released("convap-512", url=base + route, folder=tmp_path, progress=False)


def test_connection_refused_names_the_url(tmp_path):
    import socket

    with socket.socket() as s:  # a free port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w.ckpt"
    with pytest.raises(OSError, match=rf"download of {url} failed: URLError"):
        fetch_released("convap-512", url=url, folder=tmp_path, progress=False)


@pytest.mark.parametrize("cut", [200, 20_000, 50_000])
def test_truncated_small_checkpoint_error_names_the_file(tmp_path, cut):
    """Small cut zip files make torch.load raise OSError (Errno 22) or struct.error: still a
    ValueError that names the file."""
    path = tmp_path / "small.ckpt"
    path.write_bytes(checkpoint_bytes(30_000)[:cut])
    with pytest.raises(ValueError, match=r"small.ckpt is not a readable PyTorch checkpoint"):
        load_pretrained(path)


def test_checkpoint_paths_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    model = VPRModel("resnet18", layers_to_crop=[4], agg="gem")
    model.save(tmp_path / "m.ckpt")
    loaded = load_pretrained("~/m.ckpt")
    assert loaded.config["agg"] == "gem"


def test_whole_vpr_checkpoint_as_imagenet_weights_points_to_load_pretrained(tmp_path):
    path = tmp_path / "vpr.ckpt"
    VPRModel("resnet18", layers_to_crop=[4], agg="gem").save(path)
    with pytest.raises(
        ValueError, match=r"in .*vpr.ckpt .*whole VPR model.*load_pretrained"
    ) as err:
        VPRModel("resnet18", pretrained=path)
    assert len(str(err.value)) < 600  # not pages of missing keys


def test_a_disk_error_is_not_called_a_truncated_checkpoint(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "fine.ckpt"
    path.write_bytes(checkpoint_bytes(1000))

    def failing_load(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(OSError, match="Input/output error") as err:
        load_pretrained(path)
    assert not isinstance(err.value, ValueError)
