"""What a checkpoint's train_state.pt holds and how a resume restores it.

``LoopState`` is what the training loop (engine.py) carries across epochs; ``train_state_dict`` turns it,
with the optimizer, scheduler, scaler, EMA and every rank's RNG, into train_state.pt's content (tensors and
plain containers only, so ``torch.load(weights_only=True)`` reads it); ``restore_train_state`` loads that back
into freshly built objects. The file itself is read and written by checkpoint.py.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from typing import Optional

import numpy as np
import timm.scheduler
import torch

from raytimm import distributed as dist_utils
from raytimm import runs
from raytimm.model import unwrap_model

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoopState:
    """What survives across epochs and goes into train_state.pt."""

    epoch: int = 0
    num_updates: int = 0
    best_value: Optional[float] = None
    best_epoch: int = 0
    best_metrics: dict = dataclasses.field(default_factory=dict)
    best_confusion_matrix: Optional[list] = None
    history: list = dataclasses.field(default_factory=list)
    epochs_without_improvement: int = 0
    best_per_class: Optional[list] = None  # multi-label: the best epoch's per-label rows

    def record(self, metrics: dict, confusion_matrix: Optional[list], *, metric: str, mode: str,
               per_class: Optional[list] = None) -> bool:
        """Append an epoch's metrics; returns whether it is the best so far (runs.is_better: a tie
        goes to this later epoch, as the `best` pointer's does). Patience counts strict improvements."""
        best_so_far = self.best_metrics or None
        if runs.improves(metrics, best_so_far, metric=metric, mode=mode):
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        is_best = runs.is_better(metrics, best_so_far, metric=metric, mode=mode)
        if is_best:
            self.best_value, self.best_epoch = float(metrics[metric]), int(metrics["epoch"])
            self.best_metrics, self.best_confusion_matrix = dict(metrics), confusion_matrix
            self.best_per_class = per_class
        self.history.append(dict(metrics))
        self.epoch = int(metrics["epoch"])
        return is_best


# ------------------------------------------------------------------ RNG state (weights_only-loadable)

def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and plain containers (torch.load weights_only works)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [int(version), torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal.tolist()), gauss))
    npk = state["numpy"]
    np.random.set_state(("MT19937", npk["keys"].numpy().astype(np.uint32), npk["pos"], npk["has_gauss"],
                         npk["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ train_state.pt

def train_state_dict(state: LoopState, *, model, optimizer, scheduler, scaler, ema, epochs: int, rng: list,
                     class_names: list[str]) -> dict:
    """train_state.pt content: only tensors and plain containers, so torch.load(weights_only=True) reads it."""
    return {
        "epoch": state.epoch, "num_updates": state.num_updates, "epochs_total": epochs,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        # With EMA on, model.safetensors holds the EMA weights; the raw weights are needed to resume.
        "model": unwrap_model(model).state_dict() if ema is not None else None,
        "rng": rng, "best_value": state.best_value, "best_epoch": state.best_epoch,
        "best_metrics": state.best_metrics, "best_confusion_matrix": state.best_confusion_matrix,
        "best_per_class": state.best_per_class,
        "history": state.history, "epochs_without_improvement": state.epochs_without_improvement,
        "class_names": class_names,
    }


def restore_train_state(ts: dict, ckpt_dir: str, *, model, optimizer, scheduler, scaler, ema, epochs: int, seed: int,
                        rank: int, world: int) -> LoopState:
    """Load a checkpoint's weights and train state into the freshly built objects; returns the loop state."""
    from raytimm import checkpoint as ckpt

    raw = ts.get("model")
    if raw is None:
        raw = ckpt.load_model_state(ckpt_dir)  # EMA was off: model.safetensors holds the training weights
    unwrap_model(model).load_state_dict(raw)
    optimizer.load_state_dict(ts["optimizer"])
    if ts.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ts["scaler"])
    if ema is not None:
        if ts.get("ema") is not None:
            ema.load_state_dict(ts["ema"])
        else:  # EMA switched on at resume: start it from the current weights
            ema.set(unwrap_model(model))
    epoch, num_updates = int(ts["epoch"]), int(ts.get("num_updates", 0))
    if int(ts.get("epochs_total", epochs)) == epochs:
        scheduler.load_state_dict(ts["scheduler"])
    else:
        log.info("train.epochs changed from %s to %s: the lr schedule is rebuilt for the new length",
                 ts.get("epochs_total"), epochs)
    if not isinstance(scheduler, timm.scheduler.PlateauLRScheduler):
        # timm schedulers are functions of (epoch, update): put the optimizer's lr where the run left off.
        # (Plateau depends on past metrics instead; its loaded state and the optimizer's lr carry that.)
        scheduler.step(epoch)
        scheduler.step_update(num_updates=num_updates)
    rng = ts.get("rng") or []
    if len(rng) == world:
        set_rng_state(rng[rank])
    else:
        dist_utils.seed_everything(seed + 1000 * epoch, rank)  # another world size: fresh, distinct per-rank seeds
    log.info("resumed from %s at epoch %d", ckpt_dir, epoch)
    return LoopState(epoch=epoch, num_updates=num_updates, best_value=ts.get("best_value"),
                     best_epoch=int(ts.get("best_epoch", 0)), best_metrics=dict(ts.get("best_metrics") or {}),
                     best_confusion_matrix=ts.get("best_confusion_matrix"), history=list(ts.get("history") or []),
                     best_per_class=ts.get("best_per_class"),
                     epochs_without_improvement=int(ts.get("epochs_without_improvement", 0)))
