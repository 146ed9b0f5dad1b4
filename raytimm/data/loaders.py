"""Where the images come from: a bucket dataset staged once per node, DICE converted into the cache,
and the train/val DataLoaders with their distributed samplers.

Used by the training loop (``engine.fit``), the driver's preflight (``ray_train.preflight``) and
``raytimm evaluate`` (``predict``); none of them needs the training loop to get data.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from torch.utils.data import DataLoader, DistributedSampler

from raytimm import distributed as dist_utils
from raytimm.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank r gets indices r, r+world, r+2*world, ...: no padding, so every sample is seen exactly once.

    It subclasses DistributedSampler on purpose: Ray's ``prepare_data_loader`` keeps a loader's
    sampler only when it is a DistributedSampler, and would otherwise swap in a padding one.
    """

    def __init__(self, dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def stage_dataset(path: str, cache_dir: str, *, max_gb: Optional[float] = None) -> str:
    """A remote dataset URI mirrored once into ``<cache_dir>/datasets`` on this node; a local path as given."""
    from raytimm import storage

    if not storage.is_remote(path):
        return path
    return storage.stage(path, os.path.join(os.path.expanduser(cache_dir), "datasets"), max_gb=max_gb)


def prepare_dataset_root(cfg) -> str:
    """Local ImageFolder root for ``cfg.data``: stage a remote URI, convert DICE into the cache."""
    root = cfg.data.path
    if not root:
        raise ConfigError("data.path is empty: point it at an ImageFolder or DICE export")
    cache = os.path.expanduser(cfg.data.cache_dir)
    # Local rank 0 stages/converts first; the others then find the cache ready (no duplicate work).
    first = dist_utils.get_local_rank() == 0
    if not first:
        dist_utils.barrier()
    try:
        root = stage_dataset(root, cache, max_gb=cfg.data.cache_max_gb)
        if cfg.data.format == "dice":
            from raytimm.data.dice import ensure_dice_converted

            root = ensure_dice_converted(root, os.path.join(cache, "dice"), split_ratio=cfg.data.split_ratio,
                                         seed=cfg.data.split_seed, cache_max_gb=cfg.data.cache_max_gb, log=log.info)
    finally:
        if first:
            dist_utils.barrier()
    return root


def build_loaders(train_ds, val_ds, *, batch_size: int, eval_batch_size: int, num_workers: int, pin_memory: bool,
                  seed: int, world_size: int, rank: int) -> tuple[DataLoader, DataLoader, DistributedSampler]:
    """Train/val DataLoaders with distributed samplers (also with one process: shuffling is then a
    pure function of seed and epoch, so a resumed run sees the same order)."""
    train_sampler = DistributedSampler(train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    if len(train_sampler) < batch_size:
        raise DataError(f"the train split has {len(train_ds)} images, fewer than train.batch_size={batch_size} "
                        f"per worker x {world_size} worker(s); lower train.batch_size")
    val_sampler = UnpaddedDistributedSampler(val_ds, world_size, rank)
    common = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
    # drop_last keeps batch sizes equal (mixup needs even batches; BatchNorm dislikes a batch of 1).
    train_loader = DataLoader(train_ds, batch_size=batch_size, sampler=train_sampler, drop_last=True, **common)
    val_loader = DataLoader(val_ds, batch_size=eval_batch_size, sampler=val_sampler, drop_last=False, **common)
    return train_loader, val_loader, train_sampler
