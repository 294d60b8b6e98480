"""Losses and miners: the paper's defaults, equality with pytorch-metric-learning, b_acc."""

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners

from vprlib.losses import batch_accuracy, get_loss, get_miner, loss_names, miner_names


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
