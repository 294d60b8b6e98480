"""Losses and miners: the paper's defaults, equality with pytorch-metric-learning, b_acc."""

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners

from vprlib.losses import (
    DenseMultiSimilarity,
    batch_accuracy,
    batch_accuracy_tensor,
    get_loss,
    get_miner,
    loss_names,
    miner_names,
)


def _batch(places=6, per_place=4, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(places * per_place, dim, generator=g), dim=1)
    labels = torch.arange(places).repeat_interleave(per_place)
    return emb, labels


def test_default_loss_has_paper_parameters():
    loss = get_loss()
    assert isinstance(loss, losses.MultiSimilarityLoss)
    assert (loss.alpha, loss.beta, loss.base) == (1.0, 50.0, 0.0)
    assert isinstance(loss.distance, distances.DotProductSimilarity)


def test_default_miner_has_paper_parameters():
    miner = get_miner()
    assert isinstance(miner, miners.MultiSimilarityMiner)
    assert miner.epsilon == 0.1
    assert isinstance(miner.distance, distances.CosineSimilarity)


def test_loss_and_miner_equal_library_called_directly():
    emb, labels = _batch()
    ref_miner = miners.MultiSimilarityMiner(epsilon=0.1, distance=distances.CosineSimilarity())
    ref_loss = losses.MultiSimilarityLoss(
        alpha=1, beta=50, base=0, distance=distances.DotProductSimilarity()
    )
    ours_mined = get_miner()(emb, labels)
    ref_mined = ref_miner(emb, labels)
    assert len(ours_mined) == 4
    for a, b in zip(ours_mined, ref_mined, strict=True):
        assert torch.equal(a, b)
    assert ours_mined[0].numel() > 0  # random embeddings: some hard pairs exist
    ours = get_loss()(emb, labels, ours_mined)
    ref = ref_loss(emb, labels, ref_mined)
    assert ours.item() > 0
    assert torch.allclose(ours, ref, rtol=0, atol=1e-7)


def test_overrides_and_other_classes_by_name():
    loss = get_loss("MultiSimilarityLoss", alpha=2.0)
    assert (loss.alpha, loss.beta) == (2.0, 50.0)
    emb, labels = _batch(seed=1)
    trip = get_loss("TripletMarginLoss", margin=0.2)
    assert isinstance(trip, losses.TripletMarginLoss)
    ref = losses.TripletMarginLoss(margin=0.2)
    assert torch.allclose(trip(emb, labels), ref(emb, labels))
    hard = get_miner("BatchHardMiner")
    assert isinstance(hard, miners.BatchHardMiner)
    assert "MultiSimilarityLoss" in loss_names() and "BatchHardMiner" in miner_names()


@pytest.mark.parametrize(
    ("getter", "name", "listed"),
    [(get_loss, "MultiSimilarity", "MultiSimilarityLoss"), (get_miner, "Hard", "BatchHardMiner")],
)
def test_unknown_name_lists_valid_ones(getter, name, listed):
    with pytest.raises(ValueError, match=listed) as info:
        getter(name)
    assert repr(name) in str(info.value)


def test_batch_accuracy_hand_built():
    # 8 images; the positive pairs have anchors 0, 0, 1, 5, 5 -> 3 distinct anchors.
    a1 = torch.tensor([0, 0, 1, 5, 5])
    p = torch.tensor([1, 2, 0, 4, 6])
    a2 = torch.tensor([0, 3, 7])
    n = torch.tensor([7, 4, 1])
    assert batch_accuracy((a1, p, a2, n), 8) == pytest.approx(1 - 3 / 8)
    # Triplet form (anchor, positive, negative): anchors 2, 2 -> 1 distinct.
    assert batch_accuracy((torch.tensor([2, 2]), p[:2], n[:2]), 4) == pytest.approx(0.75)
    # Nothing mined: every image is "easy".
    empty = torch.empty(0, dtype=torch.long)
    assert batch_accuracy((empty, empty, empty, empty), 8) == 1.0


def test_batch_accuracy_on_real_miner_output():
    emb, labels = _batch(places=5, per_place=4, seed=3)
    mined = get_miner()(emb, labels)
    expected = 1 - len(set(mined[0].tolist())) / len(labels)
    assert batch_accuracy(mined, len(labels)) == pytest.approx(expected)
    # Perfectly separated places (one-hot per place): nothing is hard, b_acc = 1.
    easy = F.one_hot(labels, 8).float()
    assert batch_accuracy(get_miner()(easy, labels), len(labels)) == 1.0


def test_batch_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="batch_size"):
        batch_accuracy((torch.tensor([0]),) * 4, 0)
    with pytest.raises(ValueError, match="miner_output"):
        batch_accuracy(torch.tensor([0, 1]), 4)


def _library_pair(x, labels, epsilon=0.1, **loss_kw):
    mined = get_miner(epsilon=epsilon)(x, labels)
    return get_loss(**loss_kw)(x, labels, mined), mined


@pytest.mark.parametrize("seed", range(60))
def test_dense_multi_similarity_equals_the_library_miner_and_loss(seed):
    """Value, gradients and b_acc of DenseMultiSimilarity against pytorch-metric-learning's
    miner + loss, over random batches: unnormalised descriptors of several scales (easy and
    hard batches), shuffled labels, uneven places, one place only, one image per place."""
    g = torch.Generator().manual_seed(seed)
    places, per_place = [(6, 4), (1, 5), (7, 1), (3, 3), (2, 2)][seed % 5]
    sizes = torch.randint(1, per_place + 1, (places,), generator=g) if seed % 7 == 0 else None
    labels = torch.arange(places).repeat_interleave(per_place if sizes is None else sizes)
    labels = labels[torch.randperm(labels.numel(), generator=g)] * 3 + 5  # any label values
    scale = [0.05, 1.0, 8.0][seed % 3]
    kw = {"alpha": 2.0, "beta": 40.0, "base": 0.5} if seed % 4 == 3 else {}
    x_lib = (torch.randn(labels.numel(), 8, generator=g) * scale).requires_grad_()
    x_dense = x_lib.detach().clone().requires_grad_()
    want, mined = _library_pair(x_lib, labels, **kw)
    dense = DenseMultiSimilarity(**kw)
    got = dense(x_dense, labels)
    assert got.shape == () and torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    if want.requires_grad:
        want.backward()
    want_grad = x_lib.grad if x_lib.grad is not None else torch.zeros_like(x_lib)
    assert torch.allclose(x_dense.grad, want_grad, rtol=1e-4, atol=1e-6)
    assert dense.last_b_acc.item() == pytest.approx(batch_accuracy(mined, labels.numel()))


@pytest.mark.parametrize("epsilon", [0.0, 0.5, 0.1])
@pytest.mark.parametrize("seed", range(12))
def test_dense_multi_similarity_breaks_ties_like_the_library(seed, epsilon):
    """Descriptors on a coarse grid: many similarities equal each other and sit exactly at
    the mining threshold, where < and <= differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (12, 4), generator=g).float()
    labels = torch.arange(4).repeat_interleave(3)
    want, mined = _library_pair(x, labels, epsilon=epsilon)
    dense = DenseMultiSimilarity(epsilon=epsilon)
    assert torch.allclose(dense(x, labels), want, rtol=1e-6, atol=1e-7)
    assert dense.last_b_acc.item() == pytest.approx(batch_accuracy(mined, 12))


def test_dense_multi_similarity_skips_nan_like_the_library():
    """A NaN descriptor (an overflowed fp16 step): the library's sort puts NaN last, so a NaN
    similarity is never a row's least similar positive; the dense form agrees."""
    emb, labels = _batch()
    emb = emb.clone()
    emb[5] = math.nan
    want, mined = _library_pair(emb, labels)
    dense = DenseMultiSimilarity()
    got = dense(emb, labels)
    assert torch.isfinite(want) and torch.allclose(got, want, rtol=1e-6)
    assert dense.last_b_acc.item() == pytest.approx(batch_accuracy(mined, labels.numel()))


def test_dense_multi_similarity_covers_the_interesting_cases():
    """The random batches above include batches with and without hard pairs and the
    library's zero-loss case (at most one pair of each kind), so equality means something."""
    emb, labels = _batch()
    assert get_loss("DenseMultiSimilarity")(emb, labels).item() > 0
    easy = F.normalize(torch.eye(4).repeat_interleave(2, 0), dim=1)  # same place: identical
    easy_labels = torch.arange(4).repeat_interleave(2)
    dense = DenseMultiSimilarity()
    assert dense(easy, easy_labels).item() == pytest.approx(0.0, abs=1e-6)
    assert dense.last_b_acc.item() == 1.0
    # one hard positive pair (0, 1) and one hard negative pair (0, 2), nothing else: the
    # library gives 0 (too few pairs), and so must the dense form
    angles = torch.deg2rad(torch.tensor([0.0, 60.0, -50.0]))
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels2 = torch.tensor([0, 0, 1])
    want, mined = _library_pair(x, labels2)
    assert [m.tolist() for m in mined] == [[0], [1], [0], [2]] and want.item() == 0.0
    assert dense(x, labels2).item() == 0.0
    x3 = torch.cat([x, x[2:] * torch.tensor([1.0, -1.0])])  # a 4th image: more hard pairs
    labels3 = torch.tensor([0, 0, 1, 1])
    want3, _ = _library_pair(x3, labels3)
    assert want3.item() > 0 and dense(x3, labels3).item() == pytest.approx(want3.item())


def test_dense_multi_similarity_has_no_data_dependent_shapes():
    """Traced as one graph (torch.compile fullgraph): no op whose output size depends on the
    data and no value read back, the two things that make a GPU step wait for the host.
    The library pair cannot be traced so, which shows the check can fail."""
    emb, labels = _batch()
    want = DenseMultiSimilarity()(emb, labels)
    traced = torch.compile(DenseMultiSimilarity(), backend="eager", fullgraph=True)
    assert torch.allclose(traced(emb, labels), want)
    library = torch.compile(lambda x, y: _library_pair(x, y)[0], backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="data-dependent"):
        library(emb, labels)


def test_dense_multi_similarity_rejects_a_miner_and_bad_shapes():
    emb, labels = _batch()
    with pytest.raises(ValueError, match="miner=None"):
        DenseMultiSimilarity()(emb, labels, get_miner()(emb, labels))
    with pytest.raises(ValueError, match=r"labels \(B,\)"):
        DenseMultiSimilarity()(emb, labels[:-1])
    assert "DenseMultiSimilarity" in loss_names()
    assert isinstance(get_loss("DenseMultiSimilarity", epsilon=0.2), DenseMultiSimilarity)


def test_batch_accuracy_tensor_counts_distinct_anchors():
    a1 = torch.tensor([0, 0, 3, 5, 5, 5])
    want = 1 - torch.unique(a1).numel() / 8
    got = batch_accuracy_tensor((a1, a1, a1, a1), 8)
    assert got.shape == () and got.item() == pytest.approx(want)
    empty = torch.tensor([], dtype=torch.long)
    assert batch_accuracy_tensor((empty,) * 4, 8).item() == 1.0
