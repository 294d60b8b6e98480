"""Aggregators: turn a backbone feature map [N, C, H, W] into one L2-normalised descriptor [N, D].

Each aggregator is a small `nn.Module` with an `out_dim` attribute (the descriptor size).
`build_aggregator(name, in_channels, config)` builds one by exact name and rejects unknown
names and unknown config keys at construction, listing the valid ones.

Parameter names follow the public checkpoints of this family, so released weights load
strictly: Conv-AP `channel_pool.weight/bias`, GeM `p`, MixVPR `mix.<i>.mix.<j>`,
`channel_proj`, `row_proj`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ConvAP(nn.Module):
    """Conv-AP (GSV-Cities paper): 1x1 conv -> adaptive average pool to s1 x s2 -> flatten -> L2.

    Defaults (1024 channels, 2x2) give the 4096-d descriptor of the released model.
    """

    def __init__(self, in_channels: int, out_channels: int = 1024, s1: int = 2, s2: int = 2):
        super().__init__()
        _check_positive(out_channels=out_channels, s1=s1, s2=s2)
        self.channel_pool = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)
        self.s1, self.s2 = s1, s2
        self.out_dim = out_channels * s1 * s2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel_pool(x)
        x = F.adaptive_avg_pool2d(x, (self.s1, self.s2))
        return F.normalize(x.flatten(1), p=2, dim=1)


def gem_pool(x: torch.Tensor, p: torch.Tensor, eps: float) -> torch.Tensor:
    """Generalised mean over H, W: (mean(x.clamp(eps) ** p)) ** (1 / p) -> [N, C]."""
    return F.avg_pool2d(x.clamp(min=eps).pow(p), x.shape[-2:]).pow(1.0 / p).flatten(1)


class GeM(nn.Module):
    """GeM pooling with a learnable exponent p (init 3), then L2. Descriptor dim = channels."""

    def __init__(self, in_channels: int, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps
        self.out_dim = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(gem_pool(x, self.p, self.eps), p=2, dim=1)


class _GeMPool(nn.Module):
    """GeM pooling alone (no normalisation), the middle step of the CosPlace head."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem_pool(x, self.p, self.eps)


class CosPlace(nn.Module):
    """CosPlace head: L2 over channels -> GeM -> linear to out_dim -> L2."""

    def __init__(self, in_channels: int, out_dim: int = 512, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        _check_positive(out_dim=out_dim)
        self.gem = _GeMPool(p, eps)
        self.fc = nn.Linear(in_channels, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gem(F.normalize(x, p=2, dim=1))
        return F.normalize(self.fc(x), p=2, dim=1)


class _FeatureMixer(nn.Module):
    """One MixVPR block over the flattened spatial axis: LayerNorm -> MLP, plus a residual."""

    def __init__(self, hw: int, mlp_ratio: float):
        super().__init__()
        hidden = int(hw * mlp_ratio)
        self.mix = nn.Sequential(
            nn.LayerNorm(hw), nn.Linear(hw, hidden), nn.ReLU(), nn.Linear(hidden, hw)
        )
        for m in self.mix:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(x)


class MixVPR(nn.Module):
    """MixVPR: flatten H*W, `mix_depth` feature-mixer blocks, channel projection C->out_channels,
    row projection H*W->out_rows, flatten, L2. Descriptor dim = out_channels * out_rows.

    The mixer layers are sized for one feature-map size `in_h` x `in_w`, so the model only
    accepts images of the size it was built for (VPRModel derives it from 320x320 by default).
    """

    def __init__(
        self,
        in_channels: int,
        in_h: int = 20,
        in_w: int = 20,
        out_channels: int = 512,
        out_rows: int = 4,
        mix_depth: int = 4,
        mlp_ratio: float = 1,
    ):
        super().__init__()
        _check_positive(in_h=in_h, in_w=in_w, out_channels=out_channels, out_rows=out_rows)
        if mix_depth < 0:
            raise ValueError(f"MixVPR: mix_depth must be >= 0, got {mix_depth}")
        self.in_h, self.in_w = in_h, in_w
        hw = in_h * in_w
        self.mix = nn.Sequential(*[_FeatureMixer(hw, mlp_ratio) for _ in range(mix_depth)])
        self.channel_proj = nn.Linear(in_channels, out_channels)
        self.row_proj = nn.Linear(hw, out_rows)
        self.out_dim = out_channels * out_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.in_h, self.in_w):
            raise ValueError(
                f"MixVPR was built for a {self.in_h}x{self.in_w} feature map, got "
                f"{tuple(x.shape[-2:])}: feed images of the size the model was built for "
                "(model.preprocess['image_size']) or rebuild with agg_config in_h/in_w"
            )
        x = self.mix(x.flatten(2))  # [N, C, HW]
        x = self.channel_proj(x.transpose(1, 2))  # [N, HW, out_channels]
        x = self.row_proj(x.transpose(1, 2))  # [N, out_channels, out_rows]
        return F.normalize(x.flatten(1), p=2, dim=1)


class NetVLAD(nn.Module):
    """NetVLAD: soft-assign each local feature to `clusters` centroids, sum the residuals,
    intra-normalise per cluster, flatten, L2. Descriptor dim = clusters * C.

    `reduce_dim` adds a 1x1 conv C -> reduce_dim first (ResNet50's 2048 x 64 = 131072-d
    descriptor is often too large). Local features are L2-normalised over channels first
    when `normalize_input` (as in the NetVLAD paper).

    Initialisation: the paper starts from k-means centroids of real local features, with the
    soft-assignment sharp around them: `init_from_features` (or `models.init_netvlad(model,
    images)`) does that. Without it the centroids are random unit vectors, to which high-
    dimensional features are all about equally close: the assignment starts nearly uniform
    and every image's descriptor nearly the same, so training starts behind.
    """

    def __init__(
        self,
        in_channels: int,
        clusters: int = 64,
        reduce_dim: int | None = None,
        normalize_input: bool = True,
    ):
        super().__init__()
        _check_positive(clusters=clusters)
        if reduce_dim is not None:
            _check_positive(reduce_dim=reduce_dim)
            self.reduce = nn.Conv2d(in_channels, reduce_dim, kernel_size=1, bias=True)
            dim = reduce_dim
        else:
            self.reduce = None
            dim = in_channels
        self.normalize_input = normalize_input
        self.assign = nn.Conv2d(dim, clusters, kernel_size=1, bias=True)
        # Without data: random unit centroids (local features are unit-length too), assignment
        # weights alpha * c_k with alpha = 10. See init_from_features for the paper's start.
        centroids = F.normalize(torch.randn(clusters, dim), dim=1)
        self.centroids = nn.Parameter(centroids)
        with torch.no_grad():
            self.assign.weight.copy_(10.0 * centroids[:, :, None, None])
            self.assign.bias.zero_()
        self.out_dim = clusters * dim

    @torch.no_grad()
    def init_from_features(self, features: torch.Tensor, iterations: int = 20, seed: int = 0):
        """The NetVLAD paper's start from local features [M, C] (after `reduce`, if any): the
        centroids are k-means centres (faiss) of the L2-normalised features, and the
        assignment is alpha * (unit centroid) . x with alpha set so that a feature's nearest
        centroid gets on average 100x the weight of the second nearest. Needs M >= clusters."""
        import faiss

        clusters, dim = self.centroids.shape
        if features.dim() != 2 or features.shape[1] != dim:
            raise ValueError(
                f"features must be [M, {dim}] local features, got {tuple(features.shape)}"
            )
        if features.shape[0] < clusters:
            raise ValueError(
                f"k-means of {clusters} clusters needs at least {clusters} local features, "
                f"got {features.shape[0]}: pass more or larger images"
            )
        x = features.detach().float().cpu()
        if self.normalize_input:
            x = F.normalize(x, p=2, dim=1)
        kmeans = faiss.Kmeans(dim, clusters, niter=iterations, seed=seed, verbose=False)
        kmeans.train(x.numpy(), init_centroids=_kmeans_plus_plus(x, clusters, seed).numpy())
        centres = torch.from_numpy(kmeans.centroids).float()
        unit = F.normalize(centres, p=2, dim=1)
        top2 = (x @ unit.T).topk(2, dim=1).values  # each feature's two nearest centroids
        gap = float((top2[:, 0] - top2[:, 1]).mean())
        if gap < 1e-4:  # (nearly) identical features: no clusters to find
            raise ValueError(
                f"the {len(x)} local features are (nearly) all the same: k-means cannot place "
                f"{clusters} distinct centroids; pass features of real, varied images"
            )
        alpha = math.log(100.0) / gap
        device = self.centroids.device
        self.centroids.copy_(centres.to(device))
        self.assign.weight.copy_((alpha * unit)[:, :, None, None].to(device))
        self.assign.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce is not None:
            x = self.reduce(x)
        if self.normalize_input:
            x = F.normalize(x, p=2, dim=1)
        a = F.softmax(self.assign(x).flatten(2), dim=1)  # [N, K, HW]
        feats = x.flatten(2)  # [N, C, HW]
        # sum_i a_ki (x_i - c_k) = sum_i a_ki x_i - c_k sum_i a_ki
        vlad = torch.einsum("nkp,ncp->nkc", a, feats) - a.sum(-1).unsqueeze(-1) * self.centroids
        vlad = F.normalize(vlad, p=2, dim=2)
        return F.normalize(vlad.flatten(1), p=2, dim=1)


def _kmeans_plus_plus(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k-means++ seeds: each next seed drawn with probability proportional to the squared
    distance to the nearest seed so far (faiss's own start, random points, can put two
    centres in one cluster and never recover)."""
    g = torch.Generator().manual_seed(seed)
    seeds = [x[torch.randint(len(x), (1,), generator=g)].squeeze(0)]
    nearest = ((x - seeds[0]) ** 2).sum(1)
    for _ in range(1, k):
        weights = nearest.clamp_min(0)
        if float(weights.sum()) <= 0:  # fewer distinct points than k: any point will do
            weights = torch.ones_like(weights)
        seeds.append(x[torch.multinomial(weights, 1, generator=g)].squeeze(0))
        nearest = torch.minimum(nearest, ((x - seeds[-1]) ** 2).sum(1))
    return torch.stack(seeds).contiguous()


class AvgPool(nn.Module):
    """Global average pooling, then L2. No parameters; descriptor dim = channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.out_dim = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.mean(dim=(-2, -1)), p=2, dim=1)


AGGREGATORS: dict[str, type[nn.Module]] = {
    "convap": ConvAP,
    "gem": GeM,
    "cosplace": CosPlace,
    "mixvpr": MixVPR,
    "netvlad": NetVLAD,
    "avg": AvgPool,
}


def aggregator_defaults(name: str) -> dict[str, Any]:
    """The config keys an aggregator accepts (besides in_channels), with their defaults."""
    cls = _aggregator_class(name)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name: p.default for p in params if p.name != "in_channels"}


def build_aggregator(name: str, in_channels: int, config: dict[str, Any] | None = None):
    """Build aggregator `name` for `in_channels` input channels with `config` overrides.

    Returns (module, resolved_config) where resolved_config holds every argument, defaults
    included, so it rebuilds the same module. Unknown names or config keys raise, listing
    the valid ones; an `in_channels` in config must equal the backbone's.
    """
    config = dict(config or {})
    defaults = aggregator_defaults(name)
    if "in_channels" in config:
        given = config.pop("in_channels")
        if given != in_channels:
            raise ValueError(
                f"agg_config in_channels={given} but the backbone outputs {in_channels} channels"
            )
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown agg_config key(s) {unknown} for aggregator {name!r}; "
            f"valid keys: {sorted(defaults)} (plus in_channels)"
        )
    resolved = {**defaults, **config}
    module = _aggregator_class(name)(in_channels, **resolved)
    return module, {"in_channels": in_channels, **resolved}


def _aggregator_class(name: str) -> type[nn.Module]:
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; valid names: {sorted(AGGREGATORS)}")
    return AGGREGATORS[name]


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
