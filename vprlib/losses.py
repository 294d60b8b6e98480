"""Metric-learning loss, pair miner and the logged "batch accuracy".

We do not re-write Multi-Similarity: pytorch-metric-learning has the loss and the miner.
This module only picks the paper's parameters as defaults and lets any other loss or miner
of that library be chosen by its class name (e.g. "TripletMarginLoss", "BatchHardMiner").
"""

from __future__ import annotations

from typing import Any

import torch


def _classes(module: Any, base: type) -> dict[str, type]:
    """Public classes of a pytorch-metric-learning module that derive from `base`."""
    found = {}
    for name in dir(module):
        obj = getattr(module, name)
        if name.startswith(("_", "Base")) or not isinstance(obj, type):
            continue
        if issubclass(obj, base):
            found[name] = obj
    return found


def _lookup(kind: str, name: str, classes: dict[str, type]) -> type:
    if name not in classes:
        valid = ", ".join(sorted(classes))
        raise ValueError(f"unknown {kind} {name!r}; pytorch-metric-learning offers: {valid}")
    return classes[name]


def loss_names() -> list[str]:
    """Names accepted by `get_loss` (the losses of pytorch_metric_learning.losses)."""
    from pytorch_metric_learning import losses

    return sorted(_classes(losses, torch.nn.Module))


def miner_names() -> list[str]:
    """Names accepted by `get_miner` (the miners of pytorch_metric_learning.miners)."""
    from pytorch_metric_learning import miners

    return sorted(_classes(miners, miners.BaseMiner))


def get_loss(name: str = "MultiSimilarityLoss", **kw: Any) -> torch.nn.Module:
    """A pytorch-metric-learning loss by class name.

    Multi-Similarity gets the paper's parameters (alpha=1, beta=50, base=0, dot-product
    similarity) unless overridden in `kw`; other losses use the library's own defaults.
    """
    from pytorch_metric_learning import distances, losses

    cls = _lookup("loss", name, _classes(losses, torch.nn.Module))
    if name == "MultiSimilarityLoss":
        kw = {"alpha": 1.0, "beta": 50.0, "base": 0.0, **kw}
        kw.setdefault("distance", distances.DotProductSimilarity())
    return cls(**kw)


def get_miner(name: str = "MultiSimilarityMiner", **kw: Any) -> torch.nn.Module:
    """A pytorch-metric-learning miner by class name.

    Multi-Similarity miner gets the paper's parameters (epsilon=0.1, cosine similarity)
    unless overridden in `kw`; other miners use the library's own defaults.
    """
    from pytorch_metric_learning import distances, miners

    cls = _lookup("miner", name, _classes(miners, miners.BaseMiner))
    if name == "MultiSimilarityMiner":
        kw = {"epsilon": 0.1, **kw}
        kw.setdefault("distance", distances.CosineSimilarity())
    return cls(**kw)


def batch_accuracy(miner_output: tuple[torch.Tensor, ...], batch_size: int) -> float:
    """Share of the batch's images for which the miner found no hard positive pair.

    b_acc = 1 - (distinct anchors among the mined positive pairs) / batch_size. An image
    whose same-place views are already closer than every confusing other place yields no
    informative pair, so b_acc rises towards 1 as the batch becomes easy for the model.
    `miner_output` is a pair miner's (anchor1, positive, anchor2, negative) tuple or a triplet
    miner's (anchor, positive, negative); only the anchors of the positive pairs are used.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not isinstance(miner_output, (tuple, list)) or len(miner_output) not in (3, 4):
        raise ValueError(
            "miner_output must be a miner's (a1, p, a2, n) or (a, p, n) tuple of index tensors"
        )
    anchors = torch.as_tensor(miner_output[0])
    return 1.0 - torch.unique(anchors).numel() / batch_size
