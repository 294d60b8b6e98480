"""hubconf.py through torch.hub.load(source="local"): untrained builds, released weights from
a pre-placed file in a temporary hub dir (no network), and clear errors."""

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch

from vprlib.download import sidecar_path
from vprlib.models import VPRModel, load_pretrained


def hub_load(repo_root, entry, **kw):
    return torch.hub.load(str(repo_root), entry, source="local", **kw)


def test_entry_points_and_dependencies(repo_root):
    spec = importlib.util.spec_from_file_location("vprlib_hubconf", repo_root / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    for entry in ("convap", "gem", "cosplace", "mixvpr", "netvlad", "avg"):
        assert callable(getattr(hubconf, entry)), entry


def test_hub_names_every_dependency_vprlib_imports(repo_root):
    """`dependencies` lists what `import vprlib` needs, and hubconf loads without them, so
    torch.hub's own check names a missing one (faiss here) instead of an ImportError."""
    code = textwrap.dedent(
        f"""
        import importlib.util, subprocess, sys
        before = set(sys.modules)
        import vprlib
        roots = {{m.split(".")[0] for m in set(sys.modules) - before}}
        spec = importlib.util.spec_from_file_location("hubconf", {str(repo_root / "hubconf.py")!r})
        hub = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(hub)
        third_party = {{"torch", "torchvision", "numpy", "pandas", "PIL", "faiss"}}
        assert third_party <= roots, third_party - roots
        assert set(hub.dependencies) == third_party, hub.dependencies
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    blocked = textwrap.dedent(
        f"""
        import importlib.util, sys
        sys.modules["faiss"] = None  # not installed
        spec = importlib.util.spec_from_file_location("hubconf", {str(repo_root / "hubconf.py")!r})
        hub = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(hub)  # loads: vprlib is imported by the entry points only
        assert "vprlib" not in sys.modules and "faiss" in hub.dependencies
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_convap_untrained_has_released_architecture(repo_root, hub_dir):
    model = hub_load(repo_root, "convap", dim=512, pretrained=False)
    assert isinstance(model, VPRModel)
    assert model.config["backbone"] == "resnet50" and model.config["layers_to_crop"] == []
    assert model.config["agg_config"]["out_channels"] == 128
    assert len(model.state_dict()) == 320
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 512)
    assert not (hub_dir / "checkpoints").exists()  # nothing downloaded


def test_convap_pretrained_from_preplaced_file(repo_root, hub_dir):
    source = VPRModel("resnet50", agg="convap", agg_config={"out_channels": 128})
    cached = hub_dir / "checkpoints" / "resnet50_ConvAP_128_2x2.ckpt"
    source.save(cached, released_layout=True)  # as the published files are
    model = hub_load(repo_root, "convap", dim=512, pretrained=True)
    assert not model.training and model.descriptor_dim == 512
    assert model.preprocess["interpolation"] == "bilinear"
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert sidecar_path(cached).exists()


def test_convap_bad_dim_lists_valid(repo_root):
    with pytest.raises(ValueError, match=r"\[512, 2048, 4096, 8192\]"):
        hub_load(repo_root, "convap", dim=1024)


@pytest.mark.parametrize(
    "entry, kw, dim",
    [
        ("gem", {}, 512),
        ("cosplace", {"agg_config": {"out_dim": 64}}, 64),
        ("mixvpr", {"agg_config": {"in_h": 2, "in_w": 2, "mix_depth": 1}}, 2048),
        ("netvlad", {"agg_config": {"clusters": 4}}, 2048),
        ("avg", {"layers_to_crop": [4]}, 256),
    ],
)
def test_other_families_untrained(repo_root, entry, kw, dim):
    model = hub_load(repo_root, entry, backbone="resnet18", **kw)
    assert model.config["agg"] == entry and model.descriptor_dim == dim
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, dim)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match=r"no released weights .*convap\(dim=...\)"):
        hub_load(repo_root, entry, pretrained=True)


def test_imagenet_argument_is_named_in_errors_and_agg_config_none(repo_root, tmp_path):
    with pytest.raises(ValueError, match=r"^imagenet must be True, False or a file path, got None"):
        hub_load(repo_root, "convap", dim=512, pretrained=False, imagenet=None)
    with pytest.raises(FileNotFoundError, match=r"imagenet='yes': no such ImageNet weights file"):
        hub_load(repo_root, "gem", backbone="resnet18", imagenet="yes")
    model = hub_load(repo_root, "convap", dim=512, pretrained=False, agg_config=None)
    assert model.config["agg_config"]["out_channels"] == 128 and model.descriptor_dim == 512
    path = tmp_path / "m.ckpt"
    VPRModel("resnet18", layers_to_crop=[3, 4], agg="gem").save(path)
    assert load_pretrained(path, agg_config=None).config["agg"] == "gem"
