"""VPRModel: backbones, freezing/cropping, aggregators (values, shapes, norms, gradients),
config/preprocess, ImageNet weights from a file, the cache or (offline) a clear error."""

import json
import socket

import pytest
import torch
import torch.nn.functional as F
import torchvision

import vprlib.models as models
from vprlib.aggregators import AGGREGATORS, ConvAP, CosPlace, GeM, MixVPR, NetVLAD
from vprlib.models import BACKBONES, VPRModel, feature_map_size

torch.manual_seed(0)


def images(n=2, size=64):
    return torch.randn(n, 3, size, size)


# ----------------------------------------------------------------------------- backbones


@pytest.mark.parametrize(
    "name, crop, channels",
    [
        ("resnet18", [], 512),
        ("resnet18", [4], 256),
        ("resnet18", [3, 4], 128),
        ("resnet50", [], 2048),
        ("resnet50", [4], 1024),
    ],
)
def test_backbone_channels_keys_and_feature_size(name, crop, channels):
    model = VPRModel(name, layers_to_crop=crop, agg="avg").eval()
    assert model.backbone.out_channels == channels
    assert model.descriptor_dim == channels
    with torch.no_grad():
        feats = model.backbone(images(1, 96))
    assert feats.shape[1] == channels
    assert tuple(feats.shape[-2:]) == feature_map_size(96, 96, crop)
    keys = list(model.state_dict())
    assert (
        "backbone.model.conv1.weight" in keys and "backbone.model.layer1.0.bn1.running_mean" in keys
    )
    assert not any(k.startswith(("backbone.model.fc", "backbone.model.avgpool")) for k in keys)
    for i in (3, 4):
        assert any(k.startswith(f"backbone.model.layer{i}.") for k in keys) == (i not in crop)


def test_feature_map_size_matches_reference_numbers():
    assert feature_map_size(320, 320) == (10, 10)
    assert feature_map_size(320, 320, [4]) == (20, 20)
    assert feature_map_size(321, 250, [3, 4]) == (41, 32)


@pytest.mark.parametrize("name", ["resnet34", "resnet101", "resnext50_32x4d", "wide_resnet50_2"])
def test_other_backbones_build_by_exact_name(name):
    with torch.device("meta"):  # shapes only: fast
        model = VPRModel(name, agg="gem", layers_to_crop=[4])
        ref = BACKBONES[name][0]()
    expected = 256 if name == "resnet34" else 1024
    assert model.descriptor_dim == expected
    assert model.state_dict()["backbone.model.layer1.0.conv2.weight"].shape == (
        ref.layer1[0].conv2.weight.shape
    )


@pytest.mark.parametrize("bad", ["resnet", "resnet50x", "my_resnet18", "ResNet50", "vgg16"])
def test_unknown_backbone_lists_valid_names(bad):
    with pytest.raises(ValueError, match=r"unknown backbone .*resnet50.*wide_resnet50_2"):
        VPRModel(bad)


@pytest.mark.parametrize("crop", [[3], [2], [4, 5], "4"])
def test_bad_crop_rejected(crop):
    with pytest.raises(ValueError, match="layers_to_crop"):
        VPRModel("resnet18", layers_to_crop=crop)


@pytest.mark.parametrize("freeze", [-2, 5, 1.5, "2"])
def test_bad_freeze_rejected(freeze):
    with pytest.raises(ValueError, match="layers_to_freeze"):
        VPRModel("resnet18", layers_to_freeze=freeze)


def _module_of(param_name):
    return param_name.split(".")[2]  # backbone.model.<module>.


@pytest.mark.parametrize(
    "n, frozen",
    [
        (-1, set()),
        (0, {"conv1", "bn1"}),
        (2, {"conv1", "bn1", "layer1", "layer2"}),
        (4, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}),
    ],
)
def test_freeze_sets_requires_grad_and_no_grad_after_backward(n, frozen):
    model = VPRModel("resnet18", layers_to_freeze=n, agg="gem").train()
    out = model(images(2, 64))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            is_frozen = _module_of(name) in frozen
            assert p.requires_grad == (not is_frozen), name
            assert (p.grad is None) == is_frozen, name
    assert model.aggregator.p.grad is not None


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_statistics():
    model = VPRModel("resnet18", layers_to_freeze=1, layers_to_crop=[3, 4], agg="avg")
    model.train()
    bb = model.backbone.model
    assert not bb.bn1.training and not bb.layer1[0].bn1.training
    assert bb.layer2[0].bn1.training and model.training
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    model(images(2, 64) * 3 + 1)
    after = model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        assert changed == key.startswith("backbone.model.layer2."), key
    model.eval()
    assert not bb.layer2[0].bn1.training


# ----------------------------------------------------------------------------- aggregators


def _model_for(agg, agg_config=None):
    return VPRModel(
        "resnet18", layers_to_crop=[4], layers_to_freeze=2, agg=agg, agg_config=agg_config
    )


AGG_CASES = [
    ("convap", None, 4096),
    ("convap", {"out_channels": 32, "s1": 3, "s2": 1}, 96),
    ("gem", None, 256),
    ("cosplace", {"out_dim": 128}, 128),
    ("mixvpr", {"in_h": 4, "in_w": 4}, 2048),
    ("mixvpr", {"in_h": 4, "in_w": 4, "out_channels": 64, "out_rows": 2, "mix_depth": 1}, 128),
    ("netvlad", {"clusters": 8}, 8 * 256),
    ("netvlad", {"clusters": 4, "reduce_dim": 16}, 64),
    ("avg", None, 256),
]


@pytest.mark.parametrize("agg, cfg, dim", AGG_CASES)
def test_aggregator_shape_norm_and_gradient_flow(agg, cfg, dim):
    model = _model_for(agg, cfg).train()
    out = model(images(3, 64))  # resnet18 cropped at layer4: 256 x 4 x 4 features
    assert out.shape == (3, dim) and model.descriptor_dim == dim
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in model.aggregator.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    layer3 = model.backbone.model.layer3[0].conv1.weight
    assert layer3.grad is not None and layer3.grad.abs().sum() > 0


def test_all_aggregators_covered():
    assert {case[0] for case in AGG_CASES} == set(AGGREGATORS)


def test_convap_matches_functional():
    x = torch.randn(2, 64, 7, 5)
    agg = ConvAP(64, out_channels=16, s1=2, s2=3)
    y = F.conv2d(x, agg.channel_pool.weight, agg.channel_pool.bias)
    ref = F.normalize(F.adaptive_avg_pool2d(y, (2, 3)).flatten(1), dim=1)
    torch.testing.assert_close(agg(x), ref)


def test_gem_matches_functional_and_p3_differs_from_mean():
    x = torch.rand(2, 8, 4, 4)
    agg = GeM(8)
    ref = F.normalize(x.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3), dim=1)
    torch.testing.assert_close(agg(x), ref)
    assert not torch.allclose(agg(x), F.normalize(x.mean(dim=(2, 3)), dim=1))


def test_cosplace_matches_functional():
    x = torch.randn(2, 8, 3, 3)
    agg = CosPlace(8, out_dim=4)
    with torch.no_grad():
        agg.gem.p.fill_(2.0)
    xn = F.normalize(x, dim=1).clamp(min=1e-6)
    g = xn.pow(2).mean(dim=(2, 3)).sqrt()
    ref = F.normalize(g @ agg.fc.weight.T + agg.fc.bias, dim=1)
    torch.testing.assert_close(agg(x), ref)


def test_mixvpr_matches_functional():
    x = torch.randn(2, 6, 3, 2)
    agg = MixVPR(6, in_h=3, in_w=2, out_channels=5, out_rows=3, mix_depth=2, mlp_ratio=2)
    h = x.flatten(2)
    for block in agg.mix:
        norm, fc1, _, fc2 = block.mix
        z = F.layer_norm(h, (6,), norm.weight, norm.bias)
        h = h + F.linear(F.relu(F.linear(z, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
    h = F.linear(h.transpose(1, 2), agg.channel_proj.weight, agg.channel_proj.bias)
    h = F.linear(h.transpose(1, 2), agg.row_proj.weight, agg.row_proj.bias)
    torch.testing.assert_close(agg(x), F.normalize(h.flatten(1), dim=1))
    assert agg.mix[0].mix[1].weight.shape == (12, 6)


def test_netvlad_matches_loop():
    x = torch.randn(2, 5, 3, 3)
    agg = NetVLAD(5, clusters=3)
    xn = F.normalize(x, dim=1).flatten(2)  # [N, C, P]
    logits = torch.einsum("kc,ncp->nkp", agg.assign.weight[:, :, 0, 0], xn)
    a = torch.softmax(logits + agg.assign.bias[None, :, None], dim=1)
    rows = []
    for n in range(2):
        v = torch.stack(
            [sum(a[n, k, p] * (xn[n, :, p] - agg.centroids[k]) for p in range(9)) for k in range(3)]
        )
        rows.append(F.normalize(F.normalize(v, dim=1).flatten(), dim=0))
    torch.testing.assert_close(agg(x), torch.stack(rows))


def test_mixvpr_image_size_inferred_from_default_320():
    model = VPRModel("resnet18", layers_to_crop=[3, 4], agg="mixvpr", agg_config={"mix_depth": 1})
    assert (model.config["agg_config"]["in_h"], model.config["agg_config"]["in_w"]) == (40, 40)
    with pytest.raises(ValueError, match="40x40 feature map"):
        model(images(1, 64))


def test_unknown_aggregator_and_config_keys_listed():
    with pytest.raises(ValueError, match=r"unknown aggregator 'conv_ap'.*convap.*mixvpr"):
        VPRModel("resnet18", agg="conv_ap")
    with pytest.raises(
        ValueError, match=r"\['out_dim'\].*valid keys: \['out_channels', 's1', 's2'\]"
    ):
        VPRModel("resnet18", agg="convap", agg_config={"out_dim": 8})
    with pytest.raises(ValueError, match="backbone outputs 512 channels"):
        VPRModel("resnet18", agg="gem", agg_config={"in_channels": 2048})
    with pytest.raises(ValueError, match="out_channels must be a positive int"):
        VPRModel("resnet18", agg="convap", agg_config={"out_channels": 0})


# ----------------------------------------------------------------------------- config, save


def test_config_is_json_and_rebuilds_and_save_roundtrip(tmp_path):
    model = VPRModel("resnet18", layers_to_crop=(4,), agg="netvlad", agg_config={"clusters": 4})
    config = json.loads(json.dumps(model.config))
    assert config["pretrained"] is False and config["layers_to_crop"] == [4]
    assert config["agg_config"] == {
        "in_channels": 256,
        "clusters": 4,
        "reduce_dim": None,
        "normalize_input": True,
    }
    path = tmp_path / "m.pt"
    model.save(path, released_layout=True)  # the published files' plain state dict
    saved = torch.load(path, weights_only=True)
    assert list(saved) == list(model.state_dict())
    model.save(tmp_path / "with_config.pt")  # default: weights + the config that rebuilds them
    both = torch.load(tmp_path / "with_config.pt", weights_only=True)
    assert both["model_config"] == config and list(both["state_dict"]) == list(saved)
    rebuilt = VPRModel(**config)
    rebuilt.load_state_dict(saved, strict=True)
    x = images(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x), rtol=0, atol=0)
    model.config["agg"] = "avg"  # a copy: the model's own config is unchanged
    assert model.config["agg"] == "netvlad"


def test_preprocess_defaults_and_validation():
    model = VPRModel("resnet18", agg="avg")
    assert model.preprocess == {
        "image_size": (320, 320),
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    }
    model.preprocess = {"image_size": 224, "interpolation": "bicubic"}
    assert model.preprocess["image_size"] == (224, 224)
    assert model.preprocess["interpolation"] == "bicubic"
    with pytest.raises(ValueError, match="interpolation"):
        model.preprocess = {"interpolation": "area"}
    with pytest.raises(ValueError, match=r"unknown preprocess key\(s\) \['size'\]"):
        model.preprocess = {"size": 3}


def test_forward_rejects_uint8():
    model = VPRModel("resnet18", agg="avg")
    with pytest.raises(ValueError, match="normalised float"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


# ----------------------------------------------------------------------------- ImageNet weights


def _random_resnet18_file(path):
    ref = torchvision.models.resnet18()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.5)
    torch.save(ref.state_dict(), path)
    return ref.state_dict()


def test_pretrained_from_path_loads_torchvision_state_dict(tmp_path):
    path = tmp_path / "resnet18-custom.pth"
    ref = _random_resnet18_file(path)
    model = VPRModel("resnet18", pretrained=str(path), layers_to_crop=[4], agg="avg")
    got = model.state_dict()
    for key, value in ref.items():
        if key.startswith(("fc.", "layer4.")):
            assert "backbone.model." + key not in got
        else:
            assert torch.equal(got["backbone.model." + key], value), key
    assert model.config["pretrained"] is False
    with pytest.raises(ValueError, match="not a torchvision resnet34 state dict"):
        VPRModel("resnet34", pretrained=path)


def test_pretrained_true_uses_hub_cache_without_network(hub_dir):
    filename = models.imagenet_url("resnet18").rsplit("/", 1)[-1]
    (hub_dir / "checkpoints").mkdir(parents=True)
    ref = _random_resnet18_file(hub_dir / "checkpoints" / filename)
    model = VPRModel("resnet18", pretrained=True, agg="avg")
    assert torch.equal(model.backbone.model.layer4[1].conv2.weight, ref["layer4.1.conv2.weight"])


def test_pretrained_true_offline_gives_clear_error(hub_dir, monkeypatch):
    with socket.socket() as s:  # a free port with nothing listening: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/resnet18-f37072fd.pth"
    monkeypatch.setattr(models, "imagenet_url", lambda name: url)
    with pytest.raises(RuntimeError) as err:
        VPRModel("resnet18", pretrained=True)
    message = str(err.value)
    assert str(hub_dir / "checkpoints") in message
    assert "pretrained='/path/to/resnet18-f37072fd.pth'" in message
    assert not list((hub_dir / "checkpoints").glob("*.pth"))


def test_untrained_netvlad_separates_different_inputs():
    # With far-away centroids every descriptor would be nearly the same (the -c_k term
    # dominates); unit centroids avoid the worst of it (init_from_features does better).
    torch.manual_seed(0)
    agg = NetVLAD(in_channels=64, clusters=8)
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        d = agg(x)
    assert torch.allclose(agg.centroids.norm(dim=1), torch.ones(8), atol=1e-5)
    assert float(d[0] @ d[1]) < 0.9


def test_netvlad_init_from_features_finds_the_clusters():
    """Features drawn around 4 unit directions: after k-means every feature's strongest
    assignment is its own direction's cluster, and sharply so (alpha: ~100:1 on average)."""
    g = torch.Generator().manual_seed(0)
    directions = F.normalize(torch.randn(4, 32, generator=g), dim=1)
    which = torch.arange(800) % 4
    feats = directions[which] + 0.05 * torch.randn(800, 32, generator=g)
    agg = NetVLAD(in_channels=32, clusters=4)
    agg.init_from_features(feats)
    x = F.normalize(feats, dim=1)[:, :, None, None]
    with torch.no_grad():
        a = F.softmax(F.conv2d(x, agg.assign.weight, agg.assign.bias), dim=1)[:, :, 0, 0]
    cluster = a.argmax(1)
    for d in range(4):  # one cluster per direction, each holding exactly its features
        assert cluster[which == d].unique().numel() == 1
    assert cluster[:4].unique().numel() == 4
    assert float(a.max(1).values.mean()) > 0.95
    # the centroids sit at the directions (k-means centres of the normalised features)
    nearest = (F.normalize(agg.centroids.detach(), dim=1) @ directions.T).max(1).values
    assert float(nearest.min()) > 0.99
    with pytest.raises(ValueError, match=r"nearly\) all the same"):
        agg.init_from_features(feats[:1].repeat(100, 1))
    with pytest.raises(ValueError, match=r"needs at least 4 local features, got 3"):
        agg.init_from_features(feats[:3])
    with pytest.raises(ValueError, match=r"must be \[M, 32\]"):
        agg.init_from_features(feats[:, :16])


def test_init_netvlad_makes_descriptors_of_different_images_differ(sample_root):
    import vprlib
    from vprlib.transforms import to_model_input

    torch.manual_seed(0)
    model = VPRModel("resnet18", layers_to_crop=[4], agg="netvlad", agg_config={"clusters": 8})
    ds = vprlib.GSVCitiesDataset(sample_root / "GSV-Cities", image_size=(64, 64), augment=False)
    images = torch.cat([ds[i][0] for i in range(10)])

    def mean_cosine() -> float:
        with torch.no_grad():
            d = model.eval()(to_model_input(images, "cpu"))
        c = d @ d.T
        return float((c.sum() - c.diag().sum()) / (len(d) * (len(d) - 1)))

    before = mean_cosine()
    model.train()
    models.init_netvlad(model, images, max_features=500)
    assert model.training  # the mode is restored
    after = mean_cosine()
    assert before > 0.95 and after < 0.5, (before, after)
    with pytest.raises(TypeError, match="agg='netvlad'"):
        models.init_netvlad(VPRModel("resnet18", agg="gem"), images)


def test_infer_config_recovers_a_mixvpr_hidden_size_that_rounds_badly(tmp_path):
    """int(100 * (29 / 100)) == 28: the inferred ratio must rebuild a 29-wide mixer."""
    from vprlib.models import infer_config, load_pretrained

    model = VPRModel(
        "resnet18", layers_to_crop=[4], agg="mixvpr",
        agg_config={"in_h": 10, "in_w": 10, "mlp_ratio": 0.295, "mix_depth": 1},
    )  # fmt: skip
    assert model.aggregator.state_dict()["mix.0.mix.1.weight"].shape[0] == 29
    state = model.state_dict()
    cfg = infer_config(state, (160, 160))["agg_config"]  # 10x10 cells after layer3
    assert int(100 * cfg["mlp_ratio"]) == 29
    path = tmp_path / "plain.pth"
    torch.save(state, path)
    loaded = load_pretrained(path, image_size=(160, 160))  # 10x10 cells after layer3
    assert loaded.aggregator.state_dict()["mix.0.mix.1.weight"].shape[0] == 29
