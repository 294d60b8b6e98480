"""Metric-learning loss, pair miner and the logged "batch accuracy".

pytorch-metric-learning has the Multi-Similarity loss and miner; this module picks the
paper's parameters as defaults and lets any other loss or miner of that library be chosen by
its class name (e.g. "TripletMarginLoss", "BatchHardMiner").

One exception, for speed on a GPU: `DenseMultiSimilarity` mines and computes the same loss
as the library's miner + loss pair, but on masks of the whole batch's similarity matrix instead
of index lists. Index lists have data-dependent lengths, so the library's pair makes the host
wait for the GPU about ten times a step; the dense form never does (bench/RESULTS.md).
"""

from __future__ import annotations

import math
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
        raise ValueError(f"unknown {kind} {name!r}; valid names: {valid}")
    return classes[name]


def loss_names() -> list[str]:
    """Names accepted by `get_loss`: the losses of pytorch_metric_learning.losses and
    "DenseMultiSimilarity"."""
    return sorted(_loss_classes())


def _loss_classes() -> dict[str, type]:
    from pytorch_metric_learning import losses

    return {**_classes(losses, torch.nn.Module), "DenseMultiSimilarity": DenseMultiSimilarity}


def miner_names() -> list[str]:
    """Names accepted by `get_miner` (the miners of pytorch_metric_learning.miners)."""
    from pytorch_metric_learning import miners

    return sorted(_classes(miners, miners.BaseMiner))


class DenseMultiSimilarity(torch.nn.Module):
    """Multi-Similarity mining + loss in one module, on masks of the batch's similarity matrix.

    The same value and gradients as pytorch-metric-learning's MultiSimilarityMiner(epsilon)
    followed by MultiSimilarityLoss(alpha, beta, base), both on cosine similarity (the
    library's DotProductSimilarity normalises too), within float rounding. Mining (no
    gradient) keeps, for each anchor i, the positives less similar than its most similar
    negative + epsilon and the negatives more similar than its least similar positive
    - epsilon; the loss per anchor is
        1/alpha log(1 + sum_p exp(-alpha (s_ip - base)))
        + 1/beta log(1 + sum_n exp(beta (s_in - base)))
    over the kept pairs, averaged over all anchors. No op has a data-dependent shape and
    nothing is read back to the host, so on a GPU the step never waits for it (with
    precision="fp16" the GradScaler still reads its overflow check each step).
    After each call `last_b_acc` holds the batch accuracy (`batch_accuracy`) as a tensor.
    Use it with miner=None: it mines itself.
    """

    def __init__(
        self, alpha: float = 1.0, beta: float = 50.0, base: float = 0.0, epsilon: float = 0.1
    ):
        super().__init__()
        self.alpha, self.beta, self.base, self.epsilon = alpha, beta, base, epsilon
        self.last_b_acc: torch.Tensor | None = None

    def forward(
        self, descriptors: torch.Tensor, labels: torch.Tensor, indices_tuple: Any = None
    ) -> torch.Tensor:
        if indices_tuple is not None:
            raise ValueError(
                "DenseMultiSimilarity mines its own pairs: use it with miner=None "
                "(got a miner's output as indices_tuple)"
            )
        if descriptors.ndim != 2 or labels.shape != descriptors.shape[:1]:
            raise ValueError(
                "DenseMultiSimilarity expects descriptors (B, D) and labels (B,), got "
                f"{tuple(descriptors.shape)} and {tuple(labels.shape)}"
            )
        labels = labels.to(descriptors.device)
        n = labels.numel()
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(n, dtype=torch.bool, device=labels.device)
        positive, negative = same & ~eye, ~same
        unit = torch.nn.functional.normalize(descriptors, dim=1)
        sim = unit @ unit.T
        with torch.no_grad():
            s = sim.detach()
            # (a row without negatives gets -inf, without positives +inf: it keeps no pair, as
            # in the library; a NaN similarity is never the least similar positive, as
            # there, where sorting puts NaN last)
            hardest_negative = s.masked_fill(~negative, -math.inf).amax(1, keepdim=True)
            not_positive = ~positive | s.isnan()
            hardest_positive = s.masked_fill(not_positive, math.inf).amin(1, keepdim=True)
            hard_pos = positive & (s - self.epsilon < hardest_negative)
            hard_neg = negative & (s + self.epsilon > hardest_positive)
            # the library's loss is 0 when at most one positive and one negative pair are left
            enough = (hard_pos.sum() > 1) | (hard_neg.sum() > 1)
            self.last_b_acc = 1.0 - hard_pos.any(1).float().mean()
        pos_loss = _log1p_sum_exp(self.alpha * (self.base - sim), hard_pos) / self.alpha
        neg_loss = _log1p_sum_exp(self.beta * (sim - self.base), hard_neg) / self.beta
        loss = (pos_loss + neg_loss).mean()
        return torch.where(enough, loss, loss * 0.0)


def _log1p_sum_exp(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per row, log(1 + sum of exp(x) over the kept entries), computed stably (0 if none)."""
    x = x.masked_fill(~keep, -math.inf)
    return torch.logsumexp(torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1), dim=1)


def get_loss(name: str = "MultiSimilarityLoss", **kw: Any) -> torch.nn.Module:
    """A pytorch-metric-learning loss by class name, or "DenseMultiSimilarity".

    Multi-Similarity gets the paper's parameters (alpha=1, beta=50, base=0, dot-product
    similarity) unless overridden in `kw`; other losses use the library's own defaults.
    "DenseMultiSimilarity" (use with miner=None) is the library's Multi-Similarity miner +
    loss pair with the paper's parameters in one module that never syncs a GPU.
    """
    from pytorch_metric_learning import distances

    cls = _lookup("loss", name, _loss_classes())
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
    return batch_accuracy_tensor(miner_output, batch_size).item()


def batch_accuracy_tensor(miner_output: tuple[torch.Tensor, ...], batch_size: int) -> torch.Tensor:
    """`batch_accuracy` as a 0-d tensor on the anchors' device, computed without reading
    anything back to the host (so a GPU step need not wait for it)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not isinstance(miner_output, (tuple, list)) or len(miner_output) not in (3, 4):
        raise ValueError(
            "miner_output must be a miner's (a1, p, a2, n) or (a, p, n) tuple of index tensors"
        )
    anchors = torch.as_tensor(miner_output[0])
    has_pair = torch.zeros(batch_size, dtype=torch.bool, device=anchors.device)
    has_pair.index_fill_(0, anchors.long(), True)
    return 1.0 - has_pair.float().mean()
