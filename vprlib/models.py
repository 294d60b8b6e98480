"""Models: a torchvision ResNet trunk + an aggregator -> one L2-normalised descriptor per image.

    model = VPRModel("resnet50", pretrained=True, layers_to_crop=[4], agg="convap")
    model = load_pretrained("resnet50_ConvAP_1024_2x2")      # released 4096-d Conv-AP

State-dict keys follow the released checkpoints: `backbone.model.<torchvision resnet key>`
(no fc, no avgpool, no keys for cropped layers) and `aggregator.<...>` (Conv-AP:
`aggregator.channel_pool.weight/bias`), so released files load strictly.

Freezing: `layers_to_freeze=n` sets requires_grad=False on conv1+bn1 and layer1..layer_n, and
(unlike the reference code, which only freezes parameters) keeps the BatchNorm layers of the
frozen part in eval mode during `model.train()`: their running statistics stay fixed and they
normalise with them, so a frozen layer computes the same function in training and evaluation.
Freezing applies whether or not the backbone is pretrained (the reference froze only
pretrained nets): pass layers_to_freeze=-1 to train everything.
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torchvision
from torch import nn

from .aggregators import AGGREGATORS, build_aggregator
from .download import (
    BICUBIC_RELEASED,
    cache_dir,
    fetch_released,
    released_name,
    valid_released_names,
)
from .fileio import atomic_torch_save, safe_torch_load
from .transforms import IMAGENET_MEAN, IMAGENET_STD

# Backbone name -> (torchvision builder, ImageNet weights enum). Exact names only.
BACKBONES: dict[str, tuple[Any, Any]] = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights),
    "resnet152": (torchvision.models.resnet152, torchvision.models.ResNet152_Weights),
    "resnext50_32x4d": (
        torchvision.models.resnext50_32x4d,
        torchvision.models.ResNeXt50_32X4D_Weights,
    ),
    "wide_resnet50_2": (
        torchvision.models.wide_resnet50_2,
        torchvision.models.Wide_ResNet50_2_Weights,
    ),
}
# Architecture facts used to recognise a backbone from checkpoint keys:
# name -> (bottleneck blocks?, blocks per layer, groups, width_per_group).
BACKBONE_SPECS: dict[str, tuple[bool, tuple[int, int, int, int], int, int]] = {
    "resnet18": (False, (2, 2, 2, 2), 1, 64),
    "resnet34": (False, (3, 4, 6, 3), 1, 64),
    "resnet50": (True, (3, 4, 6, 3), 1, 64),
    "resnet101": (True, (3, 4, 23, 3), 1, 64),
    "resnet152": (True, (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": (True, (3, 4, 6, 3), 32, 4),
    "wide_resnet50_2": (True, (3, 4, 6, 3), 1, 128),
}
DEFAULT_IMAGE_SIZE = (320, 320)
INTERPOLATIONS = ("bilinear", "bicubic")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without avgpool/fc (and without cropped layers) at `self.model`.

    `layers_to_freeze` n in -1..4: conv1+bn1 and layer1..layer_n get requires_grad=False and
    their BatchNorms stay in eval mode during train() (0: conv1+bn1 only; -1: nothing).
    `layers_to_crop`: subset of {3, 4}; cropping 3 requires cropping 4.
    `pretrained`: False, True (torchvision ImageNet IMAGENET1K_V1 weights, as in the paper's
    code) or a path to a torchvision state-dict file of this architecture.
    """

    def __init__(
        self,
        name: str = "resnet50",
        pretrained: bool | str | os.PathLike = False,
        layers_to_freeze: int = 2,
        layers_to_crop: tuple[int, ...] | list[int] = (),
    ):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; valid names: {list(BACKBONES)}")
        crop = _check_crop(layers_to_crop)
        if type(layers_to_freeze) is not int or not -1 <= layers_to_freeze <= 4:
            raise ValueError(f"layers_to_freeze must be an int in -1..4, got {layers_to_freeze!r}")
        model = BACKBONES[name][0](weights=None)
        if pretrained is not False:
            _load_strict_torchvision(model, imagenet_state_dict(name, pretrained), name, pretrained)
        del model.avgpool, model.fc
        for i in crop:
            delattr(model, f"layer{i}")
        self.model = model
        self.layers_to_crop = crop
        self.layer_names = [f"layer{i}" for i in range(1, 5) if i not in crop]
        last = getattr(model, self.layer_names[-1])[-1]
        self.out_channels = (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features
        self.frozen = []
        if layers_to_freeze >= 0:
            self.frozen = ["conv1", "bn1"]
            self.frozen += [n for n in self.layer_names if int(n[-1]) <= layers_to_freeze]
        for module_name in self.frozen:
            for p in getattr(model, module_name).parameters():
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        for layer_name in self.layer_names:
            x = getattr(m, layer_name)(x)
        return x

    def train(self, mode: bool = True) -> ResNetBackbone:
        """Switch train/eval mode, keeping the frozen part (its BatchNorms) in eval mode."""
        super().train(mode)
        if mode:
            for module_name in self.frozen:
                getattr(self.model, module_name).eval()
        return self

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the output feature map for an input of height x width."""
        return feature_map_size(height, width, self.layers_to_crop)


def _check_crop(layers_to_crop) -> list[int]:
    """Validate layers_to_crop: a subset of {3, 4}; cropping 3 requires cropping 4."""
    try:
        crop = sorted(set(layers_to_crop))
    except TypeError:
        raise ValueError(
            f"layers_to_crop must be a list like [4], got {layers_to_crop!r}"
        ) from None
    if not set(crop) <= {3, 4}:
        raise ValueError(f"layers_to_crop must be a subset of [3, 4], got {layers_to_crop!r}")
    if 3 in crop and 4 not in crop:
        raise ValueError("layers_to_crop [3] also needs 4: layer4 cannot follow a cropped layer3")
    return crop


def feature_map_size(height: int, width: int, layers_to_crop=()) -> tuple[int, int]:
    """Output size of a ResNet trunk for a height x width input (e.g. 320 -> 10, crop 4 -> 20)."""
    # conv1, maxpool and the first block of each kept layer2..4 halve the size, rounding up.
    halvings = 2 + sum(1 for i in (2, 3, 4) if i not in layers_to_crop)
    for _ in range(halvings):
        height, width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
    return height, width


class VPRModel(nn.Module):
    """Backbone + aggregator: `forward(float normalised [N,3,H,W]) -> [N, descriptor_dim]`.

    Arguments are plain values so `VPRModel(**model.config)` rebuilds the same architecture
    (`config["pretrained"]` is always False: rebuilding never downloads).
    `agg_config` overrides the aggregator's defaults; its input channels come from the
    backbone. Defaults: convap out_channels=1024, s1=s2=2 (4096-d with full ResNet50, the
    released model); gem p=3, eps=1e-6; cosplace out_dim=512; mixvpr out_channels=512,
    out_rows=4, mix_depth=4, mlp_ratio=1 with in_h/in_w = the backbone's feature map for a
    320x320 image unless given; netvlad clusters=64, reduce_dim=None; avg (no options).
    `preprocess` (image_size, interpolation, mean, std) says how evaluation feeds images.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        pretrained: bool | str | os.PathLike = False,
        layers_to_freeze: int = 2,
        layers_to_crop: tuple[int, ...] | list[int] = (),
        agg: str = "convap",
        agg_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        if agg not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {agg!r}; valid names: {sorted(AGGREGATORS)}")
        if agg_config is not None and not isinstance(agg_config, dict):
            raise TypeError(f"agg_config must be a dict or None, got {type(agg_config).__name__}")
        self.backbone = ResNetBackbone(backbone, pretrained, layers_to_freeze, layers_to_crop)
        agg_config = dict(agg_config or {})
        if agg == "mixvpr":
            h, w = self.backbone.feature_size(*DEFAULT_IMAGE_SIZE)
            agg_config.setdefault("in_h", h)
            agg_config.setdefault("in_w", w)
        self.aggregator, resolved = build_aggregator(agg, self.backbone.out_channels, agg_config)
        self.descriptor_dim: int = self.aggregator.out_dim
        self._config = {
            "backbone": backbone,
            "pretrained": False,
            "layers_to_freeze": layers_to_freeze,
            "layers_to_crop": list(self.backbone.layers_to_crop),
            "agg": agg,
            "agg_config": resolved,
        }
        self._preprocess = make_preprocess()

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able copy): `VPRModel(**model.config)` rebuilds it."""
        return copy.deepcopy(self._config)

    @property
    def preprocess(self) -> dict[str, Any]:
        """How images are fed at evaluation: image_size (H, W), interpolation, mean, std."""
        return dict(self._preprocess)

    @preprocess.setter
    def preprocess(self, value: dict[str, Any]) -> None:
        if not isinstance(value, dict):
            raise TypeError(f"preprocess must be a dict, got {type(value).__name__}")
        unknown = sorted(set(value) - set(PREPROCESS_OPTIONS))
        if unknown:
            raise ValueError(f"unknown preprocess key(s) {unknown}; valid: {PREPROCESS_OPTIONS}")
        self._preprocess = make_preprocess(**value)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not images.is_floating_point() or images.dim() != 4:
            raise ValueError(
                f"VPRModel expects normalised float images [N,3,H,W], got {images.dtype} "
                f"{tuple(images.shape)} (vprlib.transforms.to_model_input converts uint8)"
            )
        return self.aggregator(self.backbone(images))

    def save(self, path: str | os.PathLike, released_layout: bool = False) -> None:
        """Write the weights (CPU tensors, released key layout) atomically to `path`.

        By default as {"state_dict", "model_config": self.config, "preprocess": self.preprocess},
        so `load_pretrained` rebuilds exactly this model and feeds it images as now (settings
        without weights, such as Conv-AP's pool size, GeM's eps or the image size, cannot be
        read back from a plain state dict). released_layout=True writes the plain state dict,
        like the published files, for code that calls `model.load_state_dict(torch.load(path))`."""
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        if not released_layout:
            state = {
                "state_dict": state,
                "model_config": self.config,
                "preprocess": self.preprocess,
            }
        atomic_torch_save(state, path)


def init_netvlad(
    model: VPRModel, images: torch.Tensor, max_features: int = 50_000, seed: int = 0
) -> None:
    """Start a NetVLAD model's clusters from data, as the NetVLAD paper does: local features
    of `images` (uint8 [N,3,H,W] or already normalised float, e.g. a few training batches)
    through the backbone (and NetVLAD's `reduce`), at most `max_features` of them drawn at
    random, then `NetVLAD.init_from_features` (k-means). Call it before training."""
    from .aggregators import NetVLAD
    from .transforms import to_model_input

    agg = getattr(model, "aggregator", None)
    if not isinstance(agg, NetVLAD):
        raise TypeError(
            f"init_netvlad needs a VPRModel with agg='netvlad', got {type(agg).__name__}"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = to_model_input(images, device)
            feats = model.backbone(x)
            if agg.reduce is not None:
                feats = agg.reduce(feats)
    finally:
        model.train(was_training)
    local = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    if len(local) > max_features:
        g = torch.Generator().manual_seed(seed)
        local = local[torch.randperm(len(local), generator=g)[:max_features].to(local.device)]
    agg.init_from_features(local, seed=seed)


def make_preprocess(
    image_size: int | tuple[int, int] | list[int] = DEFAULT_IMAGE_SIZE,
    interpolation: str = "bilinear",
    mean: tuple[float, ...] | list[float] = IMAGENET_MEAN,
    std: tuple[float, ...] | list[float] = IMAGENET_STD,
) -> dict[str, Any]:
    """A validated preprocess dict (defaults: 320x320, bilinear, ImageNet mean/std)."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    image_size = tuple(image_size)
    if len(image_size) != 2 or not all(isinstance(s, int) and s > 0 for s in image_size):
        raise ValueError(f"image_size must be (H, W) positive ints, got {image_size!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean/std must be 3 values (std > 0), got {mean} / {std}")
    return {"image_size": image_size, "interpolation": interpolation, "mean": mean, "std": std}


# ----------------------------------------------------------------------------- ImageNet weights


def imagenet_url(name: str) -> str:
    """URL of the torchvision ImageNet (IMAGENET1K_V1) weights for backbone `name`."""
    return BACKBONES[name][1].IMAGENET1K_V1.url


def imagenet_state_dict(name: str, pretrained: bool | str | os.PathLike) -> dict:
    """ImageNet weights for `name`: True -> torchvision's file (torch hub cache, downloaded
    once); a path -> that torchvision state-dict file. Offline failures say how to fix."""
    if pretrained is True:
        url = imagenet_url(name)
        try:
            return torch.hub.load_state_dict_from_url(
                url, map_location="cpu", progress=True, weights_only=True
            )
        except (RuntimeError, EOFError, ValueError, OSError) as e:
            filename = url.rsplit("/", 1)[-1]
            cached = cache_dir() / filename
            if cached.is_file():  # there, so the download was not the problem: the file is
                raise ValueError(
                    f"the ImageNet weights of {name} in {cached} are not a readable PyTorch "
                    f"file (a truncated copy?): {type(e).__name__}: {e}. Delete it (it is "
                    "downloaded again) or copy the whole file"
                ) from e
            raise RuntimeError(
                f"could not download the ImageNet weights of {name} from {url} ({e}). "
                f"Offline? Put {filename} in the torch hub checkpoints folder {cache_dir()}, or "
                f"pass pretrained='/path/to/{filename}' (a torchvision state dict), "
                "or pretrained=False"
            ) from e
    if isinstance(pretrained, (str, os.PathLike)):
        return read_checkpoint(pretrained).state_dict
    raise ValueError(f"pretrained must be True, False or a file path, got {pretrained!r}")


def _load_strict_torchvision(
    model: nn.Module, state: dict, name: str, source: bool | str | os.PathLike = True
) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        where = "" if source is True else f" in {source}"
        if any(str(k).startswith(("backbone.", "aggregator.")) for k in state):
            raise ValueError(  # a whole VPR model: the key listing would run to pages
                f"the pretrained weights{where} are not a torchvision {name} state dict: they "
                "look like a whole VPR model's weights (backbone./aggregator. keys). Load "
                "them with vprlib.load_pretrained(path), not as ImageNet weights"
            ) from None
        raise ValueError(
            f"the pretrained weights{where} are not a torchvision {name} state dict: {e}"
        ) from e


# ----------------------------------------------------------------------------- checkpoints


class Checkpoint(NamedTuple):
    """What `read_checkpoint` finds in a file; model_config and preprocess are None in a
    plain state dict (the released files). pool_size: Conv-AP's (s1, s2) from the
    "hyper_parameters" of a Lightning file written by the reference training code, else None
    (the pool has no weights, so the keys cannot tell it)."""

    state_dict: dict[str, torch.Tensor]
    model_config: dict | None
    preprocess: dict | None
    pool_size: tuple[int, int] | None = None


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The weights (and model_config, preprocess when saved) of a checkpoint file, loaded
    with weights_only.

    Accepts a plain state dict or a dict with "state_dict" (and optionally "model_config" and
    "preprocess", as `VPRModel.save` and `fit` write them).
    A file that would unpickle anything but tensors and plain containers is refused.
    A single wrapper prefix carried by every key ("module." from DataParallel, "_orig_mod."
    from torch.compile, "model.") is removed when what remains is backbone./aggregator.
    keys; the reference Lightning checkpoints need no stripping (same keys as released).
    """
    path = Path(path)
    obj = safe_torch_load(path)
    model_config = preprocess = pool_size = None
    if isinstance(obj, dict) and "state_dict" in obj:
        state, model_config = obj["state_dict"], obj.get("model_config")
        preprocess = obj.get("preprocess")
        pool_size = _lightning_pool_size(obj.get("hyper_parameters"), path)
    else:
        state = obj
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        found = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            f"{path}: expected a state dict (str -> tensor) or a dict with 'state_dict'; "
            f"found {found}"
        )
    return Checkpoint(_strip_wrapper_prefix(state), model_config, preprocess, pool_size)


def _is_pool_size(value: Any) -> bool:
    """A whole number >= 1 (3 or 3.0; not True, NaN or inf)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value == int(value)
        and value >= 1
    )


def _lightning_pool_size(hparams: Any, path: Path) -> tuple[int, int] | None:
    """Conv-AP's s1 x s2 as the reference training code saved it in a Lightning file's
    hyper_parameters (agg_config), or None when the file does not say."""
    agg_config = hparams.get("agg_config") if isinstance(hparams, dict) else None
    if not isinstance(agg_config, dict) or "s1" not in agg_config or "s2" not in agg_config:
        return None
    s1, s2 = agg_config["s1"], agg_config["s2"]
    if not all(_is_pool_size(v) for v in (s1, s2)):
        warnings.warn(
            f"{path}: hyper_parameters agg_config has s1={s1!r}, s2={s2!r}, not a pool size "
            "(positive integers): ignored; Conv-AP is read as 2x2 unless agg_config= says",
            stacklevel=3,
        )
        return None
    return int(s1), int(s2)


def _strip_wrapper_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                stripped = {k[len(prefix) :]: v for k, v in state.items()}
                if all(
                    k.startswith(("backbone.", "aggregator.", *_WRAPPER_PREFIXES)) for k in stripped
                ):
                    state, changed = stripped, True
                break
    return state


def infer_config(
    state: dict[str, torch.Tensor], image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
) -> dict[str, Any]:
    """VPRModel arguments recovered from state-dict key names and tensor shapes.

    Backbone: block counts per layer, bottleneck vs basic (conv3 present), groups and width
    (layer1.0.conv2 shape); cropped layers = absent layer4/layer3 keys. When cropping hides
    the difference (e.g. resnet50 vs resnet101 without layer3), the first match is used:
    the kept layers are identical. Aggregator: from its keys (Conv-AP pool size s1 = s2 = 2
    has no weights: override with agg_config). MixVPR in_h/in_w from `image_size`.
    """
    name, crop = _infer_backbone(state)
    agg, agg_config = _infer_aggregator(state)
    if agg == "mixvpr":
        h, w = feature_map_size(*image_size, crop)
        hw = agg_config.pop("hw")
        if h * w != hw:
            raise ValueError(
                f"MixVPR weights expect {hw} feature-map cells but {image_size[0]}x"
                f"{image_size[1]} images give {h}x{w}: pass image_size=(H, W) matching training"
            )
        agg_config.update(in_h=h, in_w=w)
    return {
        "backbone": name,
        "pretrained": False,
        "layers_to_crop": crop,
        "agg": agg,
        "agg_config": agg_config,
    }


def _infer_backbone(state: dict[str, torch.Tensor]) -> tuple[str, list[int]]:
    blocks: dict[int, set[int]] = {}
    for key in state:
        m = re.match(r"backbone\.model\.layer(\d)\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    conv2 = state.get("backbone.model.layer1.0.conv2.weight")
    if conv2 is None or 2 not in blocks:
        found = sorted(state)[:10]
        raise ValueError(
            "not a vprlib/GSV-Cities checkpoint: no backbone.model.layer1/layer2 keys "
            f"(first keys: {found})"
        )
    crop = [i for i in (3, 4) if i not in blocks]
    if crop == [3]:
        raise ValueError("checkpoint has layer4 but no layer3 keys: not a valid ResNet trunk")
    bottleneck = "backbone.model.layer1.0.conv3.weight" in state
    width, per_group = conv2.shape[0], conv2.shape[1]
    groups = width // per_group
    for name, (is_bottleneck, counts, spec_groups, width_per_group) in BACKBONE_SPECS.items():
        spec_width = width_per_group * spec_groups if is_bottleneck else 64
        if (is_bottleneck, spec_groups, spec_width) != (bottleneck, groups, width):
            continue
        if all(len(blocks[i]) == counts[i - 1] for i in blocks):
            return name, crop
    counts = {f"layer{i}": len(b) for i, b in sorted(blocks.items())}
    raise ValueError(
        f"backbone not recognised from checkpoint keys (blocks {counts}, "
        f"{'bottleneck' if bottleneck else 'basic'}, groups {groups}, width {width}); "
        f"supported: {list(BACKBONES)}"
    )


def _infer_aggregator(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    agg = {k[len("aggregator.") :]: v for k, v in state.items() if k.startswith("aggregator.")}
    if not agg:
        return "avg", {}
    if "channel_pool.weight" in agg:
        return "convap", {"out_channels": agg["channel_pool.weight"].shape[0], "s1": 2, "s2": 2}
    if "gem.p" in agg and "fc.weight" in agg:
        return "cosplace", {"out_dim": agg["fc.weight"].shape[0]}
    if set(agg) == {"p"}:
        return "gem", {}
    if "row_proj.weight" in agg and "channel_proj.weight" in agg:
        hw = agg["row_proj.weight"].shape[1]
        depth = len({k.split(".")[1] for k in agg if k.startswith("mix.")})
        hidden = agg["mix.0.mix.1.weight"].shape[0] if depth else hw
        ratio = hidden / hw
        if int(hw * ratio) != hidden:  # rounding would rebuild a narrower mixer
            ratio = (hidden + 0.5) / hw
        return "mixvpr", {
            "hw": hw,
            "out_channels": agg["channel_proj.weight"].shape[0],
            "out_rows": agg["row_proj.weight"].shape[0],
            "mix_depth": depth,
            "mlp_ratio": int(ratio) if float(ratio).is_integer() else ratio,
        }
    if "centroids" in agg:
        reduce = agg.get("reduce.weight")
        return "netvlad", {
            "clusters": agg["centroids"].shape[0],
            "reduce_dim": None if reduce is None else reduce.shape[0],
        }
    raise ValueError(f"aggregator not recognised from checkpoint keys {sorted(agg)[:10]}")


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise ValueError listing missing / unexpected keys and shape mismatches by name."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
            parts.append(f"{len(items)} {label}: {items[:10]}{more}")
    config = getattr(model, "config", None)
    raise ValueError(f"{source} does not fit the model built with {config}: " + "; ".join(parts))


PRETRAINED_OPTIONS = ("url", "progress")
MODEL_OPTIONS = ("backbone", "layers_to_freeze", "layers_to_crop", "agg", "agg_config")
PREPROCESS_OPTIONS = ("image_size", "interpolation", "mean", "std")


def load_pretrained(name_or_path: str | os.PathLike, **kw: Any) -> VPRModel:
    """A VPRModel with weights from a released name or a checkpoint file, in eval mode.

    Released names: resnet50_ConvAP_{2048,1024,512,128}_2x2 (with or without .ckpt) or the
    aliases convap-{8192,4096,2048,512}; downloaded once to torch.hub.get_dir()/checkpoints.
    Files: a plain state dict or {"state_dict": ..., "model_config": ...}; without
    model_config the architecture is inferred from keys and shapes (see infer_config), and
    Conv-AP's pool size from the hyper_parameters of a reference-code Lightning file (else 2x2).
    Weights load strictly; mismatches raise listing key names.
    kw: model overrides (backbone, layers_to_freeze, layers_to_crop, agg, agg_config merged
    into the inferred one, e.g. agg_config={"s1": 3, "s2": 3}), preprocess overrides
    (image_size, interpolation, mean, std; default: what the file saved (`VPRModel.save`,
    `fit`), else 320x320 bilinear, bicubic for resnet50_ConvAP_1024_2x2), download options
    (url: fetch with urllib from there instead of Google Drive; progress).
    """
    valid = PRETRAINED_OPTIONS + MODEL_OPTIONS + PREPROCESS_OPTIONS
    unknown = sorted(set(kw) - set(valid))
    if unknown:
        raise TypeError(f"load_pretrained got unknown option(s) {unknown}; valid: {list(valid)}")
    path = _resolve_checkpoint(name_or_path, kw.get("url"), kw.get("progress", True))
    state, config, saved_preprocess, pool_size = read_checkpoint(path)
    preprocess = dict(saved_preprocess or {})
    if not preprocess:
        preprocess["interpolation"] = "bicubic" if path.stem in BICUBIC_RELEASED else "bilinear"
    preprocess.update({k: kw[k] for k in PREPROCESS_OPTIONS if k in kw})
    image_size = preprocess.get("image_size", DEFAULT_IMAGE_SIZE)
    image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if config is None:
        try:
            config = infer_config(state, image_size)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        if pool_size is not None and config["agg"] == "convap":  # the keys cannot tell it
            config["agg_config"].update(s1=pool_size[0], s2=pool_size[1])
        _warn_if_renamed_bicubic(path, config, kw)
    config = dict(config)
    for key in MODEL_OPTIONS:
        if key == "agg_config" and key in kw:
            config["agg_config"] = {**config.get("agg_config", {}), **(kw["agg_config"] or {})}
        elif key in kw:
            config[key] = kw[key]
    config["pretrained"] = False
    try:
        model = VPRModel(**config)
    except ValueError as e:  # an override that does not fit the weights
        given = {k: kw[k] for k in MODEL_OPTIONS if k in kw}
        raise ValueError(f"{path}: {e} (model built from the file's config with {given})") from e
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)
    model.preprocess = preprocess
    return model.eval()


def _warn_if_renamed_bicubic(path: Path, config: dict, kw: dict) -> None:
    """The released 4096-d model was trained with bicubic resizing, which only its file name
    tells: warn when a plain state dict of that architecture has another name and no
    interpolation is given (bilinear costs it recall)."""
    released_arch = (
        config["backbone"] == "resnet50"
        and config["agg"] == "convap"
        and config["agg_config"].get("out_channels") == 1024
        and config["agg_config"].get("s1", 2) == config["agg_config"].get("s2", 2) == 2
        and not config["layers_to_crop"]
    )
    if released_arch and path.stem not in BICUBIC_RELEASED and "interpolation" not in kw:
        warnings.warn(
            f"{path} holds ResNet50 + Conv-AP 4096-d weights without a saved config, under "
            "another name than "
            f"{sorted(BICUBIC_RELEASED)}: evaluating with bilinear resizing; if it is the released "
            "model, pass interpolation='bicubic' (it was trained with it)",
            stacklevel=3,
        )


def _resolve_checkpoint(name_or_path: str | os.PathLike, url: str | None, progress: bool) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    canonical = released_name(str(name_or_path))
    if canonical is not None:
        return fetch_released(canonical, url=url, progress=progress)
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a checkpoint file nor a released model; released "
        f"names: {valid_released_names()}"
    )
