"""One background sender per tracking run: callers hand data over and never wait on the server.

``Sender`` owns one daemon thread and what is still to be sent: params, tags, metrics keyed by
(key, step), artifact files and the final status. Callers only update that state under a lock.
The thread delivers it through a ``Sink`` (tracking.py's MLflow calls) and, when a call fails,
stops calling for ``cooldown_s``: a dead server costs one failed call (at most the HTTP timeout)
per cooldown, never one per caller. The first call after an outage re-reads what the server
already has (``Sink.sync``), so data whose answer was lost, or that is sent again, is never
stored twice. ``flush``/``finish`` wait with a deadline and make one attempt even while cooling
down, and give up when no call completes within their idle bound; what is left after a failed
final attempt is dropped with one warning.

When full, the metrics table drops its oldest entries (not the newest): epochs arrive in order,
the newest are what a dashboard shows now, and every epoch is also in the checkpoints' history,
from which ``raytimm train`` backfills the run at the end. Files are few (plots, config) and
also drop the oldest when full.
"""
from __future__ import annotations

import collections
import logging
import shutil
import threading
import time
from typing import Any, Callable, Optional, Protocol

log = logging.getLogger("raytimm.tracking")

MAX_PENDING_METRICS = 20_000  # (key, step) values: ~2,500 epochs of raytimm's 8 metrics
MAX_PENDING_FILES = 64


class Sink(Protocol):
    """The calls the sender makes; each may raise (the sender catches everything)."""

    def sync(self) -> tuple[dict[str, str], set[tuple[str, int]]]: ...  # params and (key, step) on the server

    def send_params(self, params: dict[str, str]) -> None: ...

    def send_tags(self, tags: dict[str, str]) -> None: ...

    def send_metrics(self, metrics: list[tuple[str, float, int, int]]) -> None: ...  # (key, value, ts_ms, step)

    def send_file(self, kind: str, payload: str, target: Optional[str]) -> None: ...  # "file"/"folder" path | "text"

    def send_status(self, status: str) -> None: ...


class Sender:
    """Delivers one run's tracking data from a daemon thread, with a cooldown after each failure."""

    def __init__(self, sink: Sink, *, where: str, cooldown_s: float, describe: Callable[[BaseException], str],
                 max_metrics: int = MAX_PENDING_METRICS, max_files: int = MAX_PENDING_FILES):
        """``where`` names the server in warnings (no credentials); ``describe`` turns an error into one
        short line. The first pass reads the server's history unless ``mark_synced`` gave it."""
        self._sink = sink
        self._where = where
        self._what = "sync"  # the call in progress, for the warning
        self._cooldown_s = float(cooldown_s)
        self._describe = describe
        self._max_metrics = max_metrics
        self._max_files = max_files
        self._cond = threading.Condition()
        # Pending: what callers asked for and the server does not have yet.
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._metrics: collections.OrderedDict[tuple[str, int], tuple[float, int]] = collections.OrderedDict()
        self._files: collections.deque = collections.deque()
        self._status: Optional[str] = None
        # Known to be on the server (from sync and from calls that succeeded).
        self.known_params: dict[str, str] = {}
        self.known_steps: set[tuple[str, int]] = set()
        self._need_sync = True
        self._sync_asked = 0  # resync() calls so far
        self._down_until = 0.0
        self._in_outage = False
        self._busy = False
        self._urgent = False  # a flush waits: try once even while cooling down
        self._urgent_failed = False
        self._stopped = False
        self._dropped = 0
        self._progress = 0  # calls completed
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self, opener: Optional[Callable[[], Any]] = None, timeout_s: float = 0.0) -> None:
        """Start the thread; with ``opener``, run it there first and wait up to ``timeout_s`` for it.

        The opener's exception (or TimeoutError) is raised here and the sender stops; a hung
        opener is left to finish on the daemon thread, which then exits.
        """
        box: dict[str, Any] = {}
        opened = threading.Event()

        def main() -> None:
            if opener is not None:
                try:
                    opener()
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                    box["error"] = exc
                    with self._cond:
                        self._stopped = True
                opened.set()
            self._loop()

        self._thread = threading.Thread(target=main, name="raytimm-mlflow-sender", daemon=True)
        self._thread.start()
        if opener is None:
            return
        if not opened.wait(timeout_s):
            self.stop()
            raise TimeoutError(f"no answer within {timeout_s:.0f}s")
        if "error" in box:
            raise box["error"]

    def mark_synced(self, params: dict[str, str], steps: set[tuple[str, int]]) -> None:
        """What the server holds, read by the opener: no sync needed before the first send."""
        with self._cond:
            self.known_params.update(params)
            self.known_steps |= steps
            self._need_sync = False

    def stop(self) -> None:
        """End the thread after its current call; pending data is dropped."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def resync(self) -> None:
        """Re-read the server's history before the next send (another process may have logged)."""
        with self._cond:
            self._need_sync = True
            self._sync_asked += 1

    # -- callers (never block on the server) ---------------------------------------------

    def add_params(self, params: dict[str, str]) -> list[str]:
        """Queue params not logged yet; returns keys already logged (or queued) with another value."""
        changed = []
        with self._cond:
            for key, value in params.items():
                old = self.known_params.get(key, self._params.get(key))
                if old is None:
                    self._params[key] = value
                elif old != value:
                    changed.append(key)
            self._cond.notify_all()
        return changed

    def add_tags(self, tags: dict[str, str]) -> None:
        """Queue tags; a later value for the same tag replaces an unsent one."""
        with self._cond:
            self._tags.update(tags)
            self._cond.notify_all()

    def add_metrics(self, values: dict[str, float], step: int) -> None:
        """Queue metric values at ``step``; a (key, step) already on the server is skipped."""
        now_ms = int(time.time() * 1000)
        with self._cond:
            for key, value in values.items():
                if (key, step) in self.known_steps:
                    continue
                self._metrics.pop((key, step), None)
                self._metrics[(key, step)] = (value, now_ms)
            while len(self._metrics) > self._max_metrics:
                self._metrics.popitem(last=False)
                self._dropped += 1
            self._cond.notify_all()

    def add_file(self, kind: str, payload: str, target: Optional[str], cleanup: Optional[str] = None) -> None:
        """Queue an artifact: a "file" or "folder" path, or a "text"; ``cleanup`` is deleted once it is done."""
        with self._cond:
            self._files.append((kind, payload, target, cleanup))
            while len(self._files) > self._max_files:
                self._discard_file(self._files.popleft())
                self._dropped += 1
            self._cond.notify_all()

    def set_status(self, status: str) -> None:
        """Queue the run's final status; it is sent after everything queued before it."""
        with self._cond:
            self._status = status
            self._cond.notify_all()

    def flush(self, idle_timeout_s: float, max_s: Optional[float] = None) -> bool:
        """Wait until everything queued so far was sent; False when that fails.

        Gives up after one failed attempt (made even during a cooldown, so a dead server costs at
        most one call here), when no call completes within ``idle_timeout_s`` (a hung server), or
        after ``max_s`` (default 10 x ``idle_timeout_s``) however busy the server still is.
        """
        start = time.monotonic()
        end = start + (10 * idle_timeout_s if max_s is None else max_s)
        with self._cond:
            self._urgent, self._urgent_failed = True, False
            self._cond.notify_all()
            progress, idle_until = self._progress, start + idle_timeout_s
            while (self._has_work() or self._busy) and not self._urgent_failed and not self._stopped:
                now = time.monotonic()
                if self._progress != progress:
                    progress, idle_until = self._progress, now + idle_timeout_s
                remaining = min(idle_until, end) - now
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            done = not self._has_work() and not self._busy
            self._urgent = False
            return done

    def pending_summary(self) -> str:
        """What is still unsent, in words (empty when nothing is)."""
        with self._cond:
            parts = [f"{n} {what}" for n, what in ((len(self._metrics), "metric values"), (len(self._params), "params"),
                                                   (len(self._tags), "tags"), (len(self._files), "files"))
                     if n]
            if self._status:
                parts.append(f"status {self._status}")
            return ", ".join(parts)

    def discard_pending(self) -> None:
        """Forget what is still unsent (after a final attempt failed)."""
        with self._cond:
            self._params.clear()
            self._tags.clear()
            self._metrics.clear()
            while self._files:
                self._discard_file(self._files.popleft())
            self._status = None

    # -- the thread ---------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._params or self._tags or self._metrics or self._files or self._status)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    urgent = self._urgent and not self._urgent_failed  # one attempt per flush
                    if self._has_work() and (urgent or time.monotonic() >= self._down_until):
                        break
                    wait = None
                    if self._has_work():
                        wait = max(self._down_until - time.monotonic(), 0.01)
                    self._cond.wait(wait)
                self._busy = True
            try:
                self._deliver()
                failure = None
            except Exception as exc:  # noqa: BLE001 - tracking never kills training
                failure = exc
            with self._cond:
                self._busy = False
                if failure is None:
                    self._recovered()
                else:
                    self._failed(failure)
                self._cond.notify_all()

    def _take(self, snapshot: Callable[[], Any]) -> Any:
        """``snapshot()`` of pending data, taken under the lock only once the server's history is
        known: a resync asked for while a pass is running (``backfill``) is done before what was
        added with it is sent."""
        while True:
            with self._cond:
                if not self._need_sync:
                    return snapshot()
                asked = self._sync_asked
            params, steps = self._call("sync", self._sink.sync)
            with self._cond:
                self.known_params.update(params)
                self.known_steps |= steps
                for key in [k for k in self._params if k in self.known_params]:
                    del self._params[key]
                for key in [k for k in self._metrics if k in self.known_steps]:
                    del self._metrics[key]
                # A resync asked for while this one ran needs a read that started after it.
                self._need_sync = self._sync_asked != asked

    def _deliver(self) -> None:
        """One pass: sync if needed, then params, tags, metrics, files and status, in that order."""
        params = self._take(lambda: dict(self._params))
        if params:
            self._call("log_params", self._sink.send_params, params)
            with self._cond:
                self.known_params.update(params)
                for k, v in params.items():
                    if self._params.get(k) == v:
                        del self._params[k]
        tags = self._take(lambda: dict(self._tags))
        if tags:
            self._call("set_tags", self._sink.send_tags, tags)
            with self._cond:
                for k, v in tags.items():
                    if self._tags.get(k) == v:
                        del self._tags[k]
        metrics = self._take(lambda: list(self._metrics.items()))
        if metrics:
            self._call("log_metrics", self._sink.send_metrics, [(k, v, ts, step) for (k, step), (v, ts) in metrics])
            with self._cond:
                for key, entry in metrics:
                    self.known_steps.add(key)
                    if self._metrics.get(key) == entry:
                        del self._metrics[key]
        while True:
            item = self._take(lambda: self._files[0] if self._files else None)
            if item is None:
                break
            self._call("log_artifact", self._sink.send_file, *item[:3])
            with self._cond:
                if self._files and self._files[0] is item:
                    self._files.popleft()
                    self._discard_file(item)
        status = self._take(lambda: self._status)
        if status:
            self._call("finish", self._sink.send_status, status)
            with self._cond:
                if self._status == status:
                    self._status = None

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        self._what = what
        out = fn(*args)
        with self._cond:
            self._progress += 1  # a flush keeps waiting while calls keep completing
            self._cond.notify_all()
        return out

    def _failed(self, exc: BaseException) -> None:
        # Called with the lock held. The answer may have been lost after the server stored the
        # data, so the next attempt re-reads the server's history first.
        self._need_sync = True
        self._down_until = time.monotonic() + self._cooldown_s
        if self._urgent:
            self._urgent_failed = True
        if not self._in_outage:
            self._in_outage = True
            log.warning("MLflow %s to %s failed (%s); training continues, retrying every %gs and sending "
                        "what was missed once it answers", self._what, self._where, self._describe(exc),
                        self._cooldown_s)
        else:
            log.debug("MLflow %s to %s still failing: %s", self._what, self._where, self._describe(exc))

    def _recovered(self) -> None:
        if self._in_outage:
            self._in_outage = False
            log.warning("MLflow at %s answers again; what was missed has been sent", self._where)
        if self._dropped:
            log.warning("MLflow at %s: %d queued item(s) were dropped while it was away (oldest first)",
                        self._where, self._dropped)
            self._dropped = 0

    @staticmethod
    def _discard_file(item: tuple) -> None:
        cleanup = item[3]
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
