"""Processes of a Ray we started ourselves, read from /proc (Linux): its Serve replicas and proxy, their RSS.

Several Ray instances may run on one machine, so a process is found only among the descendants of a
pid we own (our own process when it called ``ray.init()``, or a ``raytimm serve`` we launched): the
local Ray's raylet is that process's child, and every worker is the raylet's child. Ray names its
worker processes after the actor they host (``ray::ServeReplica:raytimm:ModelServer``, ``ray::ProxyActor``).
"""
from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")
MODEL_REPLICA = "ServeReplica:raytimm:ModelServer"
INGRESS_REPLICA = "ServeReplica:raytimm:Ingress"
PROXY = "ProxyActor"


def _ppid(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces or parentheses, so split after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            ppid = _ppid(int(entry.name))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    """The process's command line as one string ('' when it is gone)."""
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def find(root: int, name: str) -> list[int]:
    """Pids below ``root`` whose command line names the Ray actor ``name`` (``ray::<name>``)."""
    return sorted(pid for pid in descendants(root) if cmdline(pid).startswith(f"ray::{name}"))


def rss_bytes(pid: int) -> int | None:
    """Resident memory (VmRSS) of a live process; None when it is gone."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"

