"""Where the images come from: a bucket dataset staged once per node, DICE converted into the cache,
the scan (ImageFolder or manifest), and the train/val DataLoaders with their distributed samplers.

Used by the training loop (``engine.fit``), the driver's preflight (``ray_train.preflight``) and
``raytimm evaluate`` (``predict``); none of them needs the training loop to get data.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import torch
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


class ClassBalancedDistributedSampler(DistributedSampler):
    """Class-balanced sampling with replacement, split across ranks (``data.balance: sampler``).

    Each epoch makes ONE weighted draw of ``num_replicas * ceil(len / num_replicas)`` indices (weight
    1 / images of the class), seeded by (seed, epoch), and rank r takes positions r, r+world, ...: the
    ranks' shares are disjoint parts of the same draw, every class is drawn about equally often, and a
    resumed run (``set_epoch``) draws the same again. A DistributedSampler subclass, so Ray's
    ``prepare_data_loader`` keeps it.
    """

    def __init__(self, dataset, labels: Sequence[int], num_replicas: int, rank: int, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        labels_t = torch.as_tensor(list(labels), dtype=torch.long)
        counts = torch.bincount(labels_t).double()
        self.weights = 1.0 / counts[labels_t]
        self.num_samples = -(-len(labels_t) // num_replicas)
        self.total_size = self.num_samples * num_replicas

    def draw(self) -> torch.Tensor:
        """This epoch's whole draw (every rank's share), the same on every rank."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.multinomial(self.weights, self.total_size, replacement=True, generator=g)

    def __iter__(self):
        return iter(self.draw()[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def stage_dataset(path: str, cache_dir: str, *, max_gb: Optional[float] = None) -> str:
    """A remote dataset URI mirrored once into ``<cache_dir>/datasets`` on this node; a local path as given."""
    from raytimm import storage

    if not storage.is_remote(path):
        return path
    return storage.stage(path, os.path.join(os.path.expanduser(cache_dir), "datasets"), max_gb=max_gb)


def prepare_dataset_root(cfg) -> str:
    """Local dataset for ``cfg.data``: stage a remote URI, convert DICE into the cache.

    Returns an ImageFolder root, or the path of a manifest CSV (data.format manifest, and multi-label
    DICE, which converts into images + a manifest). A manifest in a bucket is staged with its folder.
    """
    root = cfg.data.path
    if not root:
        raise ConfigError("data.path is empty: point it at an ImageFolder, DICE export or manifest CSV")
    cache = os.path.expanduser(cfg.data.cache_dir)
    # Local rank 0 stages/converts first; the others then find the cache ready (no duplicate work).
    first = dist_utils.get_local_rank() == 0
    if not first:
        dist_utils.barrier()
    try:
        if cfg.data.format == "manifest":
            folder, name = manifest_folder(root)
            root = os.path.join(stage_dataset(folder, cache, max_gb=cfg.data.cache_max_gb), name)
        else:
            root = stage_dataset(root, cache, max_gb=cfg.data.cache_max_gb)
        if cfg.data.format == "dice":
            from raytimm.data.dice import MULTILABEL_MANIFEST, ensure_dice_converted

            root = ensure_dice_converted(root, os.path.join(cache, "dice"), split_ratio=cfg.data.split_ratio,
                                         seed=cfg.data.split_seed, cache_max_gb=cfg.data.cache_max_gb, log=log.info,
                                         multi_label=cfg.data.multi_label)
            if cfg.data.multi_label:
                root = os.path.join(root, MULTILABEL_MANIFEST)
    finally:
        if first:
            dist_utils.barrier()
    return root


def manifest_folder(path: str) -> tuple[str, str]:
    """(folder, CSV name) of data.path in manifest format: the folder is what gets staged (and preflighted)."""
    from raytimm import storage
    from raytimm.data.manifest import is_manifest

    if storage.is_remote(path):
        folder, _, name = str(path).rpartition("/")
        folder = folder if "/" in folder.partition("://")[2] else folder + "/"  # a CSV at the bucket's top
    else:
        folder, name = os.path.split(os.path.abspath(os.path.expanduser(str(path))))
    if not is_manifest(name):
        raise ConfigError(f"data.path={path!r}: with data.format=manifest it must name a .csv file "
                          f"(header file,labels), e.g. s3://bucket/dataset/labels.csv")
    return folder, name


def scan_dataset(root: str, cfg) -> "ScanResult":  # noqa: F821 - folder.ScanResult, imported lazily
    """Scan what ``prepare_dataset_root`` returned: a manifest CSV or an ImageFolder, with cfg.data's split."""
    d = cfg.data
    if d.format == "manifest" or (d.format == "dice" and d.multi_label):
        from raytimm.data.manifest import scan_manifest

        return scan_manifest(root, multi_label=d.multi_label, split_ratio=d.split_ratio, seed=d.split_seed,
                             verify=d.verify_images, max_pixels=d.max_image_pixels)
    from raytimm.data.folder import scan_imagefolder

    return scan_imagefolder(root, split_ratio=d.split_ratio, seed=d.split_seed, verify=d.verify_images,
                            max_pixels=d.max_image_pixels)


def build_loaders(train_ds, val_ds, *, batch_size: int, eval_batch_size: int, num_workers: int, pin_memory: bool,
                  seed: int, world_size: int, rank: int, balance: str = "none") -> tuple[DataLoader, DataLoader, DistributedSampler]:
    """Train/val DataLoaders with distributed samplers (also with one process: shuffling is then a
    pure function of seed and epoch, so a resumed run sees the same order). ``balance="sampler"``:
    class-balanced draws (ClassBalancedDistributedSampler over ``train_ds.targets``)."""
    if balance == "sampler":
        train_sampler = ClassBalancedDistributedSampler(train_ds, train_ds.targets, world_size, rank, seed=seed)
    else:
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
