"""The per-worker training loop: plain PyTorch + timm, one process or many.

``fit(cfg)`` runs on its own in one process. The Ray layer passes ``prepare_model`` /
``prepare_loader`` (Ray Train's DDP and device hooks) and a ``report`` callback; nothing else
differs between one process and N workers. Distributed facts come from ``distributed.py``, data
from ``data/loaders.py``, metric counting from ``metrics.py``, the run folder's rules from ``runs.py``,
the loop state and train_state.pt (save and resume) from ``train_state.py``.

Per epoch: train, sync buffers, validate exactly (every val image once across ranks), save a
checkpoint folder on rank 0, report it. Multi-label runs (data.multi_label) differ only at the seams:
BCE instead of CE, multi-hot targets, and validation by gathered scores (mAP, F1 at thresholds). Without a ``report`` callback the reporter is
``runs.LocalReporter``, which publishes into the run folder as Ray's controller does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import timm
import timm.optim
import timm.scheduler
import timm.utils
import torch
from torch import nn
from torch.utils.data import DataLoader

from raytimm import distributed as dist_utils
from raytimm import runs
from raytimm.data.loaders import build_loaders, prepare_dataset_root, scan_dataset
from raytimm.errors import ConfigError, DataError
from raytimm.losses import auto_pos_weight, build_losses, class_weights
from raytimm.metrics import ClassificationSums, MultiLabelScores, per_class_accuracy
from raytimm.model import build_model, unwrap_model
from raytimm.train_state import LoopState, restore_train_state, rng_state, train_state_dict

log = logging.getLogger(__name__)


ReportFn = Callable[[dict, Optional[str]], None]


@dataclasses.dataclass
class FitResult:
    """What a training run ended with; the same on every rank except the checkpoint paths (rank 0 only)."""

    best_metrics: dict
    best_epoch: int
    history: list[dict]
    last_epoch: int
    stopped_early: bool
    class_names: list[str]
    confusion_matrix: Optional[list[list[int]]]  # best epoch, rows = true class, cols = predicted (single-label)
    per_class: list[dict] = dataclasses.field(default_factory=list)  # best epoch: class, support, top1 | ap, f1, ...
    # Where runs.LocalReporter published (rank 0 of a fit without a report callback); None otherwise.
    run_dir: Optional[str] = None
    best_checkpoint: Optional[str] = None
    latest_checkpoint: Optional[str] = None


# ------------------------------------------------------------------ small resolvers

def resolve_amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``train.amp``; 'auto' means bf16 (or fp16) on GPU and nothing on CPU."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def resolve_channels_last(setting: str, device: torch.device) -> bool:
    """channels_last pays off on GPU tensor cores; on CPU it is often slower, so 'auto' skips it."""
    return device.type == "cuda" if setting == "auto" else setting == "true"


def resolve_num_threads(num_threads: Optional[int], cfg_threads: Optional[int]) -> int:
    """Intra-op threads: explicit > train.threads > OMP_NUM_THREADS (Ray sets it per worker) > usable CPUs."""
    if num_threads or cfg_threads:
        return int(num_threads or cfg_threads)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _progress(iterable, *, total: int, desc: str):
    """A tqdm bar on rank 0 when stderr is a terminal (TQDM_DISABLE=1 also turns it off)."""
    if not (dist_utils.is_main_process() and sys.stderr.isatty()):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------ optimisation

def build_optimizer(model: nn.Module, *, opt: str, lr: float, weight_decay: float, momentum: float):
    """timm.optim.create_optimizer_v2 (no weight decay on norms and biases); errors name train.opt."""
    try:
        return timm.optim.create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, momentum=momentum)
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"train.opt={opt!r}: {e} (try adamw, sgd, lamb, adam, rmsprop)") from e


def build_scheduler(optimizer, *, sched: str, epochs: int, warmup_epochs: int, warmup_lr: float, min_lr: float,
                    on_updates: bool, updates_per_epoch: int, mode: str):
    """timm.scheduler.create_scheduler_v2; plateau can only step per epoch."""
    step_on_epochs = (not on_updates) or sched == "plateau"
    try:
        scheduler, _ = timm.scheduler.create_scheduler_v2(
            optimizer, sched=sched, num_epochs=epochs, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr,
            min_lr=min_lr, step_on_epochs=step_on_epochs, updates_per_epoch=updates_per_epoch, plateau_mode=mode)
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"train.sched={sched!r}: {e} (try cosine, step, multistep, plateau, poly, tanh)") from e
    return scheduler


def _mean_lr(optimizer) -> float:
    lrs = [g["lr"] for g in optimizer.param_groups]
    return float(sum(lrs) / len(lrs))


# ------------------------------------------------------------------ train / evaluate

def train_one_epoch(model: nn.Module, loader, optimizer, loss_fn, device: torch.device, *, scheduler,
                    num_updates: int, accum_steps: int = 1, clip_grad: Optional[float] = None,
                    scaler: Optional[torch.amp.GradScaler] = None, amp_dtype: Optional[torch.dtype] = None,
                    channels_last: bool = False, mixup_fn=None, ema=None, desc: str = "train") -> tuple[dict, int]:
    """One pass over ``loader``; returns ({loss, top1, count, throughput, lr} over all ranks, num_updates).
    top1 is 0 for multi-label targets."""
    model.train()
    t0 = time.perf_counter()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    num_batches = len(loader)
    # The last accumulation group may be shorter; divide its losses by its real size.
    full_groups_end = (num_batches // accum_steps) * accum_steps
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss * n, correct, n, seconds
    lr = _mean_lr(optimizer)
    optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(_progress(loader, total=num_batches, desc=desc)):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        hard_targets = targets
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        is_update = (i + 1) % accum_steps == 0 or i + 1 == num_batches
        group_size = accum_steps if i < full_groups_end else num_batches - full_groups_end
        # Skip DDP's gradient all-reduce on micro-steps that do not end in an optimizer step.
        no_sync = getattr(model, "no_sync", None)
        sync_ctx = no_sync() if (not is_update and no_sync is not None) else contextlib.nullcontext()
        with sync_ctx:
            with _autocast(device, amp_dtype):
                output = model(images)
                loss = loss_fn(output, targets)
            scaler.scale(loss / group_size).backward()
        if is_update:
            if clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if ema is not None:
                ema.update(unwrap_model(model), step=num_updates)
            lr = _mean_lr(optimizer)
            scheduler.step_update(num_updates=num_updates)
        # Accumulate on the device: calling .item() here would be a CPU-GPU sync point every step.
        n = hard_targets.size(0)
        sums[0] += loss.detach().double() * n
        if hard_targets.ndim == 1:  # multi-label targets (N x labels) have no top-1
            sums[1] += (output.detach().argmax(dim=-1) == hard_targets).sum()
        sums[2] += n
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: wait for it before reading the clock
    sums[3] = time.perf_counter() - t0
    dist_utils.all_reduce_sum(sums)  # one collective for all sums, so every rank reports the same numbers
    count = max(float(sums[2]), 1.0)
    mean_seconds = float(sums[3]) / dist_utils.get_world_size()
    return {"loss": float(sums[0]) / count, "top1": 100.0 * float(sums[1]) / count, "count": int(sums[2]),
            "throughput": float(sums[2]) / max(mean_seconds, 1e-9), "lr": lr}, num_updates


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, num_classes: int,
             amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False, desc: str = "val") -> dict:
    """Loss, top-1/top-5 (percent) and confusion matrix over the whole loader, summed across ranks.

    Exact when each rank's loader holds a disjoint share of the set (UnpaddedDistributedSampler).
    Pass the unwrapped model: a DDP forward would broadcast buffers, a collective that deadlocks
    when ranks have different numbers of val batches.
    """
    sums = ClassificationSums(num_classes, device)
    _count_val(model, loader, device, sums, amp_dtype=amp_dtype, channels_last=channels_last, desc=desc)
    sums.all_reduce()
    return sums.result()


@torch.no_grad()
def evaluate_multilabel(model: nn.Module, loader, device: torch.device, *, class_names: list[str],
                        thresholds: Optional[list[float]] = None, calibrate: bool = False,
                        amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
                        desc: str = "val") -> dict:
    """Multi-label validation: loss, mAP, f1_micro, f1_macro (percent), thresholds, per_class rows.

    Scores and targets are gathered from every rank (AP is not a sum) and every rank computes the
    same numbers; exact under the same sampler condition as ``evaluate``. ``calibrate``: thresholds
    are each label's F1-optimal one on this set (metrics.calibrate_thresholds), else ``thresholds``
    (default 0.5). Pass the unwrapped model.
    """
    scores = MultiLabelScores(len(class_names), device)
    _count_val(model, loader, device, scores, amp_dtype=amp_dtype, channels_last=channels_last, desc=desc)
    return scores.result(class_names, thresholds=thresholds, calibrate=calibrate)


def _count_val(model: nn.Module, loader, device: torch.device, counter, *, amp_dtype, channels_last: bool,
               desc: str) -> None:
    """Forward every val batch in eval mode and add its logits to ``counter`` (.add(logits, targets))."""
    was_training = model.training
    model.eval()
    for images, targets in _progress(loader, total=len(loader), desc=desc):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            output = model(images)
        counter.add(output, targets)
    model.train(was_training)


# ------------------------------------------------------------------ loop helpers

def _summary_line(epoch: int, epochs: int, m: dict, is_best: bool) -> str:
    if "val/mAP" in m:
        scores = (f"train/loss {m['train/loss']:.4f}  val/loss {m['val/loss']:.4f}  val/mAP {m['val/mAP']:.1f}  "
                  f"val/f1_micro {m['val/f1_micro']:.1f}  val/f1_macro {m['val/f1_macro']:.1f}")
    else:
        scores = (f"train/loss {m['train/loss']:.4f}  train/top1 {m['train/top1']:.1f}  val/loss {m['val/loss']:.4f}  "
                  f"val/top1 {m['val/top1']:.1f}  val/top5 {m['val/top5']:.1f}  "
                  f"val/balanced_acc {m['val/balanced_acc']:.1f}")
    return (f"epoch {epoch}/{epochs}  {scores}  lr {m['lr']:.2e}  {m['throughput']:.0f} img/s"
            + ("  *best" if is_best else ""))


def _default_prepare_model(model: nn.Module) -> nn.Module:
    """Without Ray: DDP when a process group with several ranks exists (e.g. torchrun), else as is."""
    if dist_utils.get_world_size() > 1:
        device = next(model.parameters()).device
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return model


# ------------------------------------------------------------------ fit

def fit(cfg, *, prepare_model: Optional[Callable[[nn.Module], nn.Module]] = None,
        prepare_loader: Optional[Callable[[DataLoader], Any]] = None, report: Optional[ReportFn] = None,
        resume_state_dir: Optional[str] = None, device: Optional[torch.device] = None,
        num_threads: Optional[int] = None) -> FitResult:
    """Train ``cfg`` on this process (one DDP rank when a process group exists) and return the result.

    ``report(metrics, checkpoint_dir)`` is called on every rank each epoch, with a checkpoint
    folder on rank 0 and None elsewhere; the folder is deleted when report returns, so report
    must persist it synchronously. The default reporter is ``runs.LocalReporter``: the run folder
    ``<storage.path>/<run.name>/`` gets ``checkpoint_<epoch>``, the pointers and progress.json,
    and the result names its run folder and checkpoints.
    """
    kwargs = dict(prepare_model=prepare_model, prepare_loader=prepare_loader, resume_state_dir=resume_state_dir,
                  device=device, num_threads=num_threads)
    if report is not None:
        return _fit(cfg, report=report, **kwargs)
    if not dist_utils.is_main_process():  # a torchrun group: rank 0 alone publishes
        return _fit(cfg, report=lambda metrics, checkpoint_dir: None, **kwargs)
    local = runs.LocalReporter.from_config(cfg)
    local.folder.start()
    try:
        result = _fit(cfg, report=local, **kwargs)
    except BaseException as e:
        local.folder.finish("failed", runs.error_line(e))
        raise
    local.folder.finish("stopped_early" if result.stopped_early else "finished")
    best = local.folder.best
    return dataclasses.replace(result, run_dir=local.run_dir, best_checkpoint=best["checkpoint"] if best else None,
                               latest_checkpoint=local.folder.latest_checkpoint)


def _fit(cfg, *, report: ReportFn, prepare_model, prepare_loader, resume_state_dir, device, num_threads) -> FitResult:
    """The loop itself; ``fit`` documents the arguments."""
    from raytimm import checkpoint as ckpt
    from raytimm.config import config_to_dict
    from raytimm.data.folder import ImageDataset
    from raytimm.data.transforms import build_eval_transform, build_train_transform, resolve_data_config

    tc = cfg.train
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    device = torch.device(device) if device is not None else dist_utils.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    torch.set_num_threads(resolve_num_threads(num_threads, tc.threads))
    prepare_model = prepare_model or _default_prepare_model
    prepare_loader = prepare_loader or (lambda loader: loader)
    if (tc.mixup > 0 or tc.cutmix > 0) and tc.batch_size % 2:
        raise ConfigError(f"train.batch_size={tc.batch_size} must be even when mixup/cutmix is on")

    # ---- data
    multi_label = cfg.data.multi_label
    root = prepare_dataset_root(cfg)
    scan = scan_dataset(root, cfg)
    class_names = list(scan.class_names)
    num_classes = len(class_names)
    if cfg.model.num_classes is not None and cfg.model.num_classes != num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but {root} has {num_classes} classes")
    if not scan.val:
        raise DataError(f"{root}: the validation split is empty; add val/ or lower data.split_ratio")

    # ---- resume state (read before building the model: pretrained weights would be overwritten anyway)
    train_state, resume_meta = None, None
    if resume_state_dir:
        resume_meta = ckpt.load_meta(resume_state_dir)
        train_state = ckpt.load_train_state(resume_state_dir)
        if list(resume_meta.get("class_names") or []) != class_names:
            raise ConfigError(f"cannot resume from {resume_state_dir}: its classes {resume_meta.get('class_names')} "
                              f"differ from the dataset's {class_names}")
        if bool(resume_meta.get("multi_label")) != multi_label:
            raise ConfigError(f"cannot resume from {resume_state_dir}: it was trained with data.multi_label="
                              f"{str(bool(resume_meta.get('multi_label'))).lower()}")

    # ---- model: the same seed on every rank, so the initial weights (and an EMA copy made before DDP
    # broadcasts rank 0's parameters) agree; afterwards each rank gets its own stream for augmentation.
    dist_utils.seed_everything(tc.seed, 0)
    model = build_model(cfg.model.name, num_classes=num_classes,
                        pretrained=cfg.model.pretrained and train_state is None,
                        pretrained_file=cfg.model.pretrained_file if train_state is None else None,
                        init_checkpoint=cfg.model.init_checkpoint if train_state is None else None,
                        drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate,
                        img_size=cfg.model.img_size, cache_dir=cfg.data.cache_dir)
    # Train at the model's train size; validate (and serve, from meta.json) with the eval config,
    # which uses the model's test-time size where it has one: timm's inference convention.
    dist_utils.seed_everything(tc.seed, rank)
    data_config = resolve_data_config(model, cfg.model.img_size)
    train_data_config = resolve_data_config(model, cfg.model.img_size, use_test_size=False)
    amp_dtype = resolve_amp_dtype(tc.amp, device)
    channels_last = resolve_channels_last(tc.channels_last, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    train_ds = ImageDataset(scan.train, build_train_transform(
        train_data_config, rrc=cfg.data.rrc, rrc_scale=tuple(cfg.data.rrc_scale), rrc_ratio=tuple(cfg.data.rrc_ratio),
        hflip=cfg.data.hflip, color_jitter=cfg.data.color_jitter, seed=tc.seed + rank),
        max_pixels=cfg.data.max_image_pixels, num_labels=num_classes if multi_label else None)
    val_ds = ImageDataset(scan.val, build_eval_transform(data_config), max_pixels=cfg.data.max_image_pixels,
                          num_labels=num_classes if multi_label else None)
    train_loader, val_loader, train_sampler = build_loaders(
        train_ds, val_ds, batch_size=tc.batch_size, eval_batch_size=tc.eval_batch_size or 2 * tc.batch_size,
        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda", seed=tc.seed, world_size=world, rank=rank,
        balance=cfg.data.balance)
    updates_per_epoch = math.ceil(len(train_loader) / tc.grad_accum_steps)

    # ---- optimisation
    optimizer = build_optimizer(model, opt=tc.opt, lr=tc.lr, weight_decay=tc.weight_decay, momentum=tc.momentum)
    scheduler = build_scheduler(optimizer, sched=tc.sched, epochs=tc.epochs, warmup_epochs=tc.warmup_epochs,
                                warmup_lr=tc.warmup_lr, min_lr=tc.min_lr, on_updates=tc.sched_on_updates,
                                updates_per_epoch=updates_per_epoch, mode=cfg.checkpoint.mode)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # Weights come from the train split, the same on every rank (the scan is deterministic).
    train_labels = [label for _, label in scan.train]
    train_loss_fn, mixup_fn = build_losses(
        num_classes=num_classes, label_smoothing=tc.label_smoothing, mixup=tc.mixup, cutmix=tc.cutmix,
        mixup_prob=tc.mixup_prob, multi_label=multi_label,
        pos_weight=auto_pos_weight(train_labels, num_classes) if tc.pos_weight == "auto" else None,
        class_weight=class_weights(train_labels, num_classes) if cfg.data.balance == "loss" else None)
    train_loss_fn.to(device)
    # Warmup lets the EMA follow the weights early on; a fixed 0.9998 would barely move in short runs.
    ema = timm.utils.ModelEmaV3(model, decay=tc.ema_decay, use_warmup=True) if tc.ema else None

    state = LoopState()
    if train_state is not None:
        state = restore_train_state(train_state, resume_state_dir, model=model, optimizer=optimizer,
                                    scheduler=scheduler, scaler=scaler, ema=ema, epochs=tc.epochs, seed=tc.seed,
                                    rank=rank, world=world)

    model = prepare_model(model)
    if tc.compile:
        model = torch.compile(model)
    train_loader = prepare_loader(train_loader)
    val_loader = prepare_loader(val_loader)

    meta_base = {"model_name": cfg.model.name, "num_classes": num_classes, "class_names": class_names,
                 "data_config": data_config, "config": config_to_dict(cfg), "ema": bool(ema)}
    if multi_label:  # the inference contract (docs/internals.md "Multi-label checkpoints")
        meta_base["multi_label"] = True
    if dist_utils.is_main_process():
        log.info("training %s (%d classes) on %d train / %d val images, %d worker(s), device %s",
                 cfg.model.name, num_classes, len(train_ds), len(val_ds), world, device)

    stopped_early = False
    if tc.patience and state.epochs_without_improvement >= tc.patience:
        stopped_early = True
    start_epoch = state.epoch + 1
    for epoch in range(start_epoch, tc.epochs + 1):
        if stopped_early:
            break
        train_sampler.set_epoch(epoch)
        train_stats, state.num_updates = train_one_epoch(
            model, train_loader, optimizer, train_loss_fn, device, scheduler=scheduler, num_updates=state.num_updates,
            accum_steps=tc.grad_accum_steps, clip_grad=tc.clip_grad, scaler=scaler, amp_dtype=amp_dtype,
            channels_last=channels_last, mixup_fn=mixup_fn, ema=ema, desc=f"epoch {epoch}/{tc.epochs}")
        # DDP syncs BatchNorm stats only at the next forward: give every rank rank 0's buffers now,
        # so validation and the saved weights are the same model on all ranks.
        dist_utils.broadcast_buffers(unwrap_model(model))
        eval_model = ema.module if ema is not None else unwrap_model(model)
        if ema is not None:
            dist_utils.broadcast_buffers(ema.module)
        if multi_label:
            val = evaluate_multilabel(eval_model, val_loader, device, class_names=class_names,
                                      calibrate=tc.calibrate_thresholds, amp_dtype=amp_dtype,
                                      channels_last=channels_last, desc=f"val {epoch}/{tc.epochs}")
            metrics = {"train/loss": train_stats["loss"], "val/loss": val["loss"], "val/mAP": val["mAP"],
                       "val/f1_micro": val["f1_micro"], "val/f1_macro": val["f1_macro"]}
            per_class, cm = val["per_class"], None
        else:
            val = evaluate(eval_model, val_loader, device, num_classes=num_classes, amp_dtype=amp_dtype,
                           channels_last=channels_last, desc=f"val {epoch}/{tc.epochs}")
            metrics = {"train/loss": train_stats["loss"], "train/top1": train_stats["top1"], "val/loss": val["loss"],
                       "val/top1": val["top1"], "val/top5": val["top5"], "val/balanced_acc": val["balanced_acc"]}
            cm = val["confusion_matrix"]
            per_class = per_class_accuracy(cm, class_names)
        metrics.update({"lr": train_stats["lr"], "throughput": train_stats["throughput"], "epoch": epoch})
        is_best = state.record(metrics, cm, metric=cfg.checkpoint.metric, mode=cfg.checkpoint.mode,
                               per_class=per_class if multi_label else None)
        # timm: at the end of an epoch, set the next epoch's value (a no-op when stepping per update).
        scheduler.step(epoch, float(metrics[cfg.checkpoint.metric]))

        rng_all = dist_utils.all_gather_object(rng_state())  # each rank's RNG, so a resume restores all of them
        ckpt_dir = None
        if dist_utils.is_main_process():
            print(_summary_line(epoch, tc.epochs, metrics, is_best), flush=True)
            ckpt_dir = tempfile.mkdtemp(prefix="raytimm-ckpt-")
        try:
            if ckpt_dir:
                meta = dict(meta_base, epoch=epoch, metrics=metrics, confusion_matrix=cm, per_class=per_class,
                            best_epoch=state.best_epoch, history=state.history,
                            epochs_without_improvement=state.epochs_without_improvement)
                if multi_label:  # each checkpoint carries its own thresholds, so `best` has the best epoch's
                    meta["thresholds"] = val["thresholds"]
                weights = ema.module.state_dict() if ema is not None else unwrap_model(model).state_dict()
                ckpt.save_checkpoint(ckpt_dir, model_state=weights, meta=meta, train_state=train_state_dict(
                    state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema,
                    epochs=tc.epochs, rng=rng_all, class_names=class_names))
            # The reporter persists the folder (run folder, or Ray's storage) before it returns.
            report(metrics, ckpt_dir)
        finally:
            if ckpt_dir:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
        if tc.patience and state.epochs_without_improvement >= tc.patience:
            stopped_early = True
            if dist_utils.is_main_process():
                best = "none" if state.best_value is None else f"{state.best_value:.4f} (epoch {state.best_epoch})"
                print(f"early stop: {cfg.checkpoint.metric} did not improve for {tc.patience} epoch(s); "
                      f"best {best}", flush=True)

    cm = state.best_confusion_matrix
    per_class = state.best_per_class if multi_label else (per_class_accuracy(cm, class_names) if cm else [])
    return FitResult(best_metrics=state.best_metrics, best_epoch=state.best_epoch, history=state.history,
                     last_epoch=state.epoch, stopped_early=stopped_early, class_names=class_names,
                     confusion_matrix=cm, per_class=per_class or [])
