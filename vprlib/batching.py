"""From a place dataset to training batches on the device.

`PlaceSampler` orders the places of an epoch from (seed, epoch) alone; `make_loader` wraps it
in a DataLoader of P-place batches (the epoch travels with every index, so persistent workers
see it); `device_batches` turns each batch into normalised images and labels on the device,
preparing the next ones in background threads (on CUDA on side streams) while the current
step runs. `fit` (train.py) iterates exactly this; bench/train_throughput.py measures it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from . import distributed
from .distributed import shard_places
from .transforms import prefetch_to_device, to_model_input


def check_seed(seed) -> int:
    """`seed` as an int, refused by name unless a whole number >= 0 (numpy's own error for a
    negative seed does not say which argument)."""
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


class PlaceSampler(torch.utils.data.Sampler):
    """Every place once per epoch, in an order that depends only on (seed, epoch).

    Yields (epoch, place index) pairs: the epoch travels with each index into the data-loading
    workers (see `_EpochItems`), so persistent workers see the right epoch too.
    `num_samples` keeps only the first places of each epoch's order (for short smoke runs).
    Under DDP (world_size > 1) each rank yields only its share of every global batch of
    `places_per_batch` places (see `distributed.shard_places`).
    """

    def __init__(
        self,
        num_places: int,
        seed: int = 0,
        num_samples: int | None = None,
        *,
        places_per_batch: int | None = None,
        world_size: int = 1,
        rank: int = 0,
    ):
        if num_places <= 0:
            raise ValueError(f"the training dataset is empty (num_places={num_places})")
        if world_size > 1 and places_per_batch is None:
            raise ValueError("PlaceSampler: world_size > 1 needs places_per_batch (global)")
        self.num_places = num_places
        self.seed = check_seed(seed)
        self.num_samples = num_places if num_samples is None else min(num_samples, num_places)
        self.places_per_batch, self.world_size, self.rank = places_per_batch, world_size, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
        order = torch.randperm(self.num_places, generator=g)[: self.num_samples].tolist()
        return shard_places(order, self.places_per_batch, self.world_size, self.rank)

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.num_samples
        mine = shard_places(
            list(range(self.num_samples)), self.places_per_batch, self.world_size, self.rank
        )
        return len(mine)

    def __iter__(self):
        return iter([(self.epoch, i) for i in self._order()])


class _EpochItems(torch.utils.data.Dataset):
    """Wraps the training dataset so `ds[(epoch, i)]` calls `ds.set_epoch(epoch)` when needed.

    Why: persistent DataLoader workers hold their own copy of the dataset, so a `set_epoch`
    call in the main process would not reach them; passing the epoch with each index does.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self.epoch = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if epoch != self.epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.epoch = epoch
        return self.dataset[index]


def make_loader(
    dataset,
    places_per_batch: int,
    seed: int,
    num_workers: int,
    device: torch.device,
    max_steps_per_epoch: int | None = None,
    world_size: int = 1,
    rank: int = 0,
) -> tuple[torch.utils.data.DataLoader, PlaceSampler]:
    """DataLoader of P-place batches over a `PlaceSampler`; the last batch may be smaller.

    Under DDP `places_per_batch` is the global batch: each rank loads P / world_size places.
    """
    num_samples = None if max_steps_per_epoch is None else max_steps_per_epoch * places_per_batch
    sampler = PlaceSampler(
        len(dataset),
        seed=seed,
        num_samples=num_samples,
        places_per_batch=places_per_batch,
        world_size=world_size,
        rank=rank,
    )
    loader = torch.utils.data.DataLoader(
        _EpochItems(dataset),
        batch_size=distributed.places_per_rank(places_per_batch, world_size),
        sampler=sampler,
        drop_last=False,
        collate_fn=getattr(dataset, "collate_fn", None),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )
    return loader, sampler


def device_batches(
    loader,
    dataset,
    device: torch.device,
    channels_last: bool = False,
    prefetch: int = 0,
    *,
    stages: int = 1,
    priority: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """fit's input pipeline after the DataLoader: each batch -> (normalised float images
    [N,3,H,W], labels [N]) on `device`, through the dataset's `batch_to_device` (decoding and
    augmenting on the device for decode="gpu"/"mixed") or `to_model_input`. With prefetch=n,
    up to n batches are prepared ahead in a background thread (on CUDA on a side stream of
    CUDA `priority`), so that work overlaps the training step; 0 keeps the plain loop.

    stages=2 (needs prefetch > 0): decoding and augmenting (`batch_stages`) run in two such
    threads, one batch apart, so that the wait for one batch's decode (nvJPEG returns only
    when done) overlaps the next batch's augmentation.
    """
    if stages not in (1, 2):
        raise ValueError(f"stages must be 1 or 2, got {stages!r}")
    if stages == 2:
        if prefetch <= 0:
            raise ValueError(
                f"stages=2 prepares batches in threads: it needs prefetch > 0, got {prefetch}"
            )
        decode, augment = batch_stages(dataset, device, channels_last)
        decoded = prefetch_to_device(iter(loader), decode, device, prefetch, priority)
        return prefetch_to_device(decoded, augment, device, 1, priority)
    to_device = batch_preparer(dataset, device, channels_last)
    return prefetch_to_device(loader, to_device, device, prefetch, priority)


def default_stages(device: torch.device, prefetch: int) -> int:
    """The `stages` fit uses: two preparation threads on CUDA (with a prefetch), where the
    decode waits for the GPU; one elsewhere."""
    return 2 if torch.device(device).type == "cuda" and prefetch > 0 else 1


def batch_preparer(dataset, device: torch.device, channels_last: bool = False) -> Callable:
    """The function `device_batches` applies to each DataLoader batch: (images, labels) ->
    (normalised float images [N,3,H,W], labels [N]) on `device`: the two `batch_stages`
    in a row."""
    decode, augment = batch_stages(dataset, device, channels_last)
    return lambda batch: augment(decode(batch))


def batch_stages(
    dataset, device: torch.device, channels_last: bool = False
) -> tuple[Callable, Callable]:
    """The preparation of a batch cut in two (device_batches(stages=2) runs them in two
    threads): (images, labels) -> (decoded, labels on `device`) through the dataset's
    `decode_on_device`, then -> (normalised float images, labels) through its
    `augment_on_device`. A dataset without them: nothing, then its `batch_to_device` (or
    `to_model_input` for plain image batches)."""
    if hasattr(dataset, "decode_on_device"):
        to_decoded, to_model = dataset.decode_on_device, dataset.augment_on_device
    else:
        to_decoded, to_model = _unchanged, getattr(dataset, "batch_to_device", to_model_input)

    def decode(batch):
        images, labels = batch
        return to_decoded(images, device), labels.reshape(-1).to(device, non_blocking=True)

    def augment(batch):
        decoded, labels = batch
        return to_model(decoded, device, channels_last=channels_last), labels

    return decode, augment


def _unchanged(images, device):
    """The first stage of a dataset that has no decoding on the device."""
    return images
