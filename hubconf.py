"""torch.hub entry points for vprlib models.

    model = torch.hub.load("<owner>/<repo>", "convap", dim=4096)          # released weights
    model = torch.hub.load("/path/to/repo", "convap", source="local", dim=512, pretrained=False)

Only Conv-AP has released weights (ResNet50 + Conv-AP, descriptor 512, 2048, 4096 or 8192);
gem, cosplace, mixvpr, netvlad and avg build untrained models of the same family. Extra
keyword arguments go to `vprlib.VPRModel` (untrained) or `vprlib.load_pretrained` (released).
`imagenet=True` (or a path to a torchvision state dict) starts an untrained model's backbone
from ImageNet weights.
"""

# What `import vprlib` needs (module names, as torch.hub checks them before any entry runs).
dependencies = ["torch", "torchvision", "numpy", "pandas", "PIL", "faiss"]

import os  # noqa: E402
from pathlib import Path  # noqa: E402

# vprlib is imported inside the entry points, so a missing dependency is reported by torch.hub's
# check of `dependencies` rather than as an ImportError while this file loads.


def _convap_released() -> dict:
    """Descriptor dim -> released file (ResNet50 with layer4 + Conv-AP 2x2)."""
    from vprlib.download import RELEASED

    return {dim: name for name, dim in RELEASED.items()}


def _check_imagenet(imagenet) -> None:
    """`imagenet` is the hub's name for VPRModel's `pretrained`: name it in the error."""
    if imagenet is True or imagenet is False:
        return
    if not isinstance(imagenet, (str, os.PathLike)):
        raise ValueError(f"imagenet must be True, False or a file path, got {imagenet!r}")
    if not Path(imagenet).expanduser().is_file():
        raise FileNotFoundError(f"imagenet={str(imagenet)!r}: no such ImageNet weights file")


def convap(dim: int = 4096, pretrained: bool = True, imagenet: bool | str = False, **kw):
    """ResNet50 + Conv-AP (GSV-Cities). dim in 512/2048/4096/8192 picks the released file;
    pretrained=False builds the same architecture untrained."""
    from vprlib.models import VPRModel, load_pretrained

    released = _convap_released()
    if dim not in released:
        raise ValueError(f"convap: dim must be one of {sorted(released)}, got {dim!r}")
    if pretrained:
        if imagenet is not False:
            raise ValueError("convap: imagenet= only applies with pretrained=False")
        return load_pretrained(released[dim], **kw)
    _check_imagenet(imagenet)
    agg_config = {"out_channels": dim // 4, "s1": 2, "s2": 2, **(kw.pop("agg_config", None) or {})}
    return VPRModel(
        **{"backbone": "resnet50", "layers_to_crop": (), **kw},
        pretrained=imagenet,
        agg="convap",
        agg_config=agg_config,
    )


def _untrained(agg: str, pretrained: bool, imagenet: bool | str, kw: dict):
    from vprlib.models import VPRModel

    if pretrained:
        raise ValueError(
            f"{agg}: no released weights are wired for this aggregator; the released weights "
            f"are Conv-AP only: convap(dim=...) with dim in {sorted(_convap_released())}. "
            "Use pretrained=False for an untrained model, or vprlib.load_pretrained(path) for "
            "a checkpoint file in the same key layout (e.g. public MixVPR ResNet50 weights)"
        )
    _check_imagenet(imagenet)
    return VPRModel(**kw, pretrained=imagenet, agg=agg)


def gem(pretrained: bool = False, imagenet: bool | str = False, **kw):
    """ResNet + GeM pooling (untrained)."""
    return _untrained("gem", pretrained, imagenet, kw)


def cosplace(pretrained: bool = False, imagenet: bool | str = False, **kw):
    """ResNet + CosPlace head (untrained)."""
    return _untrained("cosplace", pretrained, imagenet, kw)


def mixvpr(pretrained: bool = False, imagenet: bool | str = False, **kw):
    """ResNet + MixVPR (untrained)."""
    return _untrained("mixvpr", pretrained, imagenet, kw)


def netvlad(pretrained: bool = False, imagenet: bool | str = False, **kw):
    """ResNet + NetVLAD (untrained)."""
    return _untrained("netvlad", pretrained, imagenet, kw)


def avg(pretrained: bool = False, imagenet: bool | str = False, **kw):
    """ResNet + global average pooling (untrained)."""
    return _untrained("avg", pretrained, imagenet, kw)
