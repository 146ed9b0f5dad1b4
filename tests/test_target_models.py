"""Every shipped target-model config builds its model with a new head and takes one real training step.

Each YAML in configs/train/ is loaded through the real config layer (only the weights, the input
size and the batch size are overridden, since there is no hub access and the machine is 2 CPUs),
then the model, optimizer, scheduler and loss are built from the config's own values and
``engine.train_one_epoch`` runs on a tiny in-memory batch set made by the config's train transform.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from raytimm import engine
from raytimm.config import load_config
from raytimm.data.transforms import build_train_transform, resolve_data_config
from raytimm.model import build_model

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "train"
TARGET_MODELS = {
    "resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
    "vit_small_patch16_224", "vit_base_patch16_224", "mobilenetv3_large_100", "mobilenetv3_small_100",
}
SLOW = {"resnet101", "vit_base_patch16_224"}  # the biggest two: seconds each even at 32 px
NUM_CLASSES = 3
IMG_SIZE = 32  # a multiple of every target's stride and of the ViTs' 16 px patches
BATCH, BATCHES = 2, 2


def _params(path: Path):
    marks = [pytest.mark.slow] if path.stem in SLOW else []
    return pytest.param(path, id=path.stem, marks=marks)


CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on 2 shared cores, 2 threads spin against other processes and run many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_every_target_model_has_a_config():
    assert {p.stem for p in CONFIGS} >= TARGET_MODELS


class _ImageSet(torch.utils.data.Dataset):
    """A few random RGB images through a real train transform, labels cycling over the classes."""

    def __init__(self, transform, n: int, size: int):
        rng = np.random.default_rng(0)
        # Larger than the crop, as real photos are, so resize/crop steps have work to do.
        self.images = [rng.integers(0, 256, (size + 8, size + 12, 3), dtype=np.uint8) for _ in range(n)]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), i % NUM_CLASSES


@pytest.mark.parametrize("path", [_params(p) for p in CONFIGS])
def test_config_builds_model_and_trains_one_step(path):
    shipped = load_config(str(path))
    name = shipped.model.name
    assert name == path.stem, f"{path.name}: model.name={name!r} does not match the file name"
    # The shipped data config (full size) must resolve, since checkpoints and Serve depend on it.
    full = resolve_data_config(name, shipped.model.img_size)
    assert full["input_size"] == [3, shipped.model.img_size, shipped.model.img_size]
    assert len(full["mean"]) == len(full["std"]) == 3

    cfg = load_config(str(path), ["model.pretrained=false", f"model.img_size={IMG_SIZE}",
                                  f"train.batch_size={BATCH}", "data.num_workers=0"])
    tc = cfg.train
    torch.manual_seed(0)
    model = build_model(name, num_classes=NUM_CLASSES, pretrained=False, drop_rate=cfg.model.drop_rate,
                        drop_path_rate=cfg.model.drop_path_rate, img_size=cfg.model.img_size)
    assert model.get_classifier().out_features == NUM_CLASSES

    train_config = resolve_data_config(model, cfg.model.img_size, use_test_size=False)
    assert train_config["input_size"] == [3, IMG_SIZE, IMG_SIZE]
    transform = build_train_transform(train_config, rrc=cfg.data.rrc, rrc_scale=tuple(cfg.data.rrc_scale),
                                      rrc_ratio=tuple(cfg.data.rrc_ratio), hflip=cfg.data.hflip,
                                      color_jitter=cfg.data.color_jitter, seed=tc.seed)
    loader = DataLoader(_ImageSet(transform, BATCH * BATCHES, IMG_SIZE), batch_size=tc.batch_size, shuffle=False)

    optimizer = engine.build_optimizer(model, opt=tc.opt, lr=tc.lr, weight_decay=tc.weight_decay,
                                       momentum=tc.momentum)
    scheduler = engine.build_scheduler(optimizer, sched=tc.sched, epochs=tc.epochs, warmup_epochs=tc.warmup_epochs,
                                       warmup_lr=tc.warmup_lr, min_lr=tc.min_lr, on_updates=tc.sched_on_updates,
                                       updates_per_epoch=len(loader), mode=cfg.checkpoint.mode)
    loss_fn, mixup_fn = engine.build_losses(num_classes=NUM_CLASSES, label_smoothing=tc.label_smoothing,
                                            mixup=tc.mixup, cutmix=tc.cutmix, mixup_prob=tc.mixup_prob)
    device = torch.device("cpu")
    before = [p.detach().clone() for p in model.parameters()]

    stats, updates = engine.train_one_epoch(
        model, loader, optimizer, loss_fn, device, scheduler=scheduler, num_updates=0,
        accum_steps=tc.grad_accum_steps, clip_grad=tc.clip_grad, amp_dtype=engine.resolve_amp_dtype(tc.amp, device),
        channels_last=engine.resolve_channels_last(tc.channels_last, device), mixup_fn=mixup_fn)

    assert math.isfinite(stats["loss"]) and stats["loss"] > 0
    assert stats["count"] == BATCH * BATCHES
    assert updates == math.ceil(BATCHES / tc.grad_accum_steps)
    changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
    # Every trainable tensor gets a gradient (stochastic depth may skip a block on one step, not on all).
    assert changed > 0.9 * len(before), f"{name}: only {changed}/{len(before)} parameter tensors changed"
    assert not torch.equal(before[-1], list(model.parameters())[-1]), f"{name}: the new head did not train"
