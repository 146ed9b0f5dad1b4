"""A sweep's results: one summary per trial read from its run folder, the best trial, the table
and trials.csv, and the pointers published into the tune folder.

The best checkpoint of a trial and the best trial follow the run folder's ranking rule
(``runs.best_of``: a tie goes to the later one, NaN never wins).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
from typing import Any, Mapping, Optional, Sequence

from raytimm import runs
from raytimm.config import Config
from raytimm.metrics import METRIC_KEYS
from raytimm.tune_space import TRIAL_PREFIX, Dimension, _is_number

log = logging.getLogger("raytimm.tune")


@dataclasses.dataclass
class TrialSummary:
    """One trial of a sweep, as `trials.csv` and `--result-json` report it."""

    trial_id: str
    config: dict
    best_metrics: dict
    epochs: int
    status: str  # completed | stopped (early, by the scheduler) | error | pending
    checkpoint: Optional[str]
    run_dir: str = ""
    latest_checkpoint: Optional[str] = None
    error: Optional[str] = None
    # Per-epoch metrics Tune received (for MLflow backfill); not part of the JSON summary.
    history: list = dataclasses.field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "history"}


@dataclasses.dataclass
class TuneResult:
    """What `raytimm tune --result-json` writes: the best trial as for a train run, plus all trials."""

    run_dir: str
    best_checkpoint: Optional[str]
    best_metrics: dict
    best_config: dict
    best_trial_id: Optional[str]
    latest_checkpoint: Optional[str]
    mlflow_run_id: Optional[str]
    trials: list[TrialSummary]
    metric: str = "val/top1"
    mode: str = "max"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["trials"] = [t.to_dict() for t in self.trials]
        return d


def pick_best(trials: Sequence[TrialSummary], metric: str, mode: str) -> Optional[TrialSummary]:
    """The trial whose best checkpoint has the best ``metric`` (runs.best_of: on a tie the later
    trial in ``trials``' order); trials without a checkpoint are skipped."""
    return runs.best_of([t for t in trials if t.checkpoint], metric=metric, mode=mode,
                        metrics_of=lambda t: t.best_metrics)


def trials_table(trials: Sequence[TrialSummary], swept: Sequence[str], metric: str) -> list[list[str]]:
    """Rows (header first) of the results table: swept values, best metric, epochs, status, checkpoint."""
    rows = [["trial_id", *swept, metric, "epochs", "status", "checkpoint"]]
    for t in trials:
        value = t.best_metrics.get(metric)
        rows.append([t.trial_id, *(_fmt(t.config.get(k)) for k in swept),
                     f"{value:.4f}" if _is_number(value) else "", str(t.epochs), t.status, t.checkpoint or ""])
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


def format_table(rows: list[list[str]]) -> str:
    """Fixed-width text table for the terminal."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table_csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _trial_id(result) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    base = os.path.basename(str(result.path).rstrip("/"))
    return base[len("tune_"):] if base.startswith("tune_") else base


def trial_checkpoints(run_dir: str) -> list[tuple[str, dict]]:
    """(URI, metrics) of every complete checkpoint in a trial's run folder, oldest first.

    The folder is the truth: ASHA kills a trial's driver between epochs, so the trial's own
    `best` pointer can lag (or name a checkpoint Ray's num_to_keep has since deleted), and a
    stopped trial may have finished one more epoch than Tune saw.
    """
    from raytimm.checkpoint import load_meta

    out = []
    for uri, _, complete in runs.list_checkpoints(run_dir):
        if not complete:
            continue  # still being written, or torn by a kill
        try:
            meta = load_meta(uri)
        except Exception as e:  # one unreadable checkpoint must not hide the others
            log.warning("skipping checkpoint %s: %s", uri, e)
            continue
        metrics = _numbers(meta.get("metrics") or {})
        if _is_number(meta.get("epoch")):
            metrics["epoch"] = float(meta["epoch"])
        out.append((uri, metrics))
    return out


def _trial_status(error: Any, epochs: int, max_epochs: int) -> str:
    if error is not None:
        return "error"
    if epochs >= max_epochs:
        return "completed"
    return "stopped" if epochs > 0 else "pending"


def summarize(grid, cfg: Config, dims: Sequence[Dimension], tune_dir: str,
              mlflow_run_id: Optional[str]) -> TuneResult:
    """TuneResult from Tune's ResultGrid plus the checkpoints each trial's run folder holds."""
    from raytimm import storage

    swept = [d.key for d in dims]
    trials = []
    for r in grid:
        tid = _trial_id(r)
        run_dir = storage.join(tune_dir, f"{TRIAL_PREFIX}{tid}")
        ckpts = trial_checkpoints(run_dir)
        seen = int((r.metrics or {}).get("epoch") or 0)
        if seen:
            # A stopped trial's workers often finish one more epoch before the kill lands; the
            # sweep reports what the scheduler saw and decided on, so skip checkpoints past it.
            ckpts = [c for c in ckpts if c[1].get("epoch", 0) <= seen]
        best = runs.best_of(ckpts, metric=cfg.tune.metric, mode=cfg.tune.mode, metrics_of=lambda c: c[1])
        # A restored trial whose training had already finished reports nothing new to Tune.
        epochs = seen or int(max([c[1].get("epoch", 0) for c in ckpts] + [0]))
        trials.append(TrialSummary(
            trial_id=tid, config={k: (r.config or {}).get(k) for k in swept},
            best_metrics=best[1] if best else {}, epochs=epochs,
            status=_trial_status(r.error, epochs, cfg.train.epochs), checkpoint=best[0] if best else None,
            run_dir=run_dir, latest_checkpoint=ckpts[-1][0] if ckpts else None, history=_history(r),
            error=(f"{type(r.error).__name__}: {r.error}".splitlines()[0][:500] if r.error is not None else None)))
    trials.sort(key=lambda t: t.trial_id)
    best = pick_best(trials, cfg.tune.metric, cfg.tune.mode)
    return TuneResult(run_dir=tune_dir, best_checkpoint=best.checkpoint if best else None,
                      best_metrics=best.best_metrics if best else {}, best_config=best.config if best else {},
                      best_trial_id=best.trial_id if best else None,
                      latest_checkpoint=best.latest_checkpoint if best else None,
                      mlflow_run_id=mlflow_run_id, trials=trials, metric=cfg.tune.metric, mode=cfg.tune.mode)


def _history(result) -> list[dict]:
    """Per-epoch metrics Tune recorded for one trial (empty when its logs are missing)."""
    df = getattr(result, "metrics_dataframe", None)
    if df is None or "epoch" not in getattr(df, "columns", ()):
        return []
    keep = [c for c in df.columns if c in METRIC_KEYS]
    return [_numbers(row) for row in df[keep].to_dict("records")]


def _numbers(m: Mapping) -> dict:
    return {str(k): float(v) for k, v in m.items() if _is_number(v)}


# A trial's status as its run folder's progress.json says it (a pending trial never ran).
PROGRESS_STATUS = {"completed": "finished", "stopped": "stopped_early", "error": "failed"}


def publish(result: TuneResult, cfg: Config, dims: Sequence[Dimension], tune_dir: str) -> None:
    """Print the table, write trials.csv, settle each trial's run folder, and point the tune
    folder's `best` at the best checkpoint."""
    from raytimm import storage
    from raytimm.checkpoint import write_best_pointer

    rows = trials_table(result.trials, [d.key for d in dims], cfg.tune.metric)
    print(format_table(rows))
    storage.write_text(storage.join(tune_dir, "trials.csv"), table_csv(rows))
    for t in result.trials:
        # ASHA kills a trial's driver right after the result it stops on, often before the trial's
        # own pointer and progress.json update: rewrite them from the checkpoints so each trial
        # folder stays servable and says how the trial ended.
        folder = runs.RunFolder(t.run_dir, run_name=f"{TRIAL_PREFIX}{t.trial_id}", metric=cfg.tune.metric,
                                mode=cfg.tune.mode, epochs=cfg.train.epochs)
        if t.checkpoint:
            folder.set_best(t.checkpoint, t.best_metrics)
        if t.latest_checkpoint:
            folder.set_latest(t.latest_checkpoint, {"epoch": t.epochs})
        if t.status in PROGRESS_STATUS:
            folder.finish(PROGRESS_STATUS[t.status], t.error)
    if result.best_checkpoint:
        write_best_pointer(tune_dir, result.best_checkpoint, result.best_metrics)
        print(f"best trial {result.best_trial_id}: {cfg.tune.metric}={result.best_metrics.get(cfg.tune.metric)} "
              f"{json.dumps(result.best_config)}")
