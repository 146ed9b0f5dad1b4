"""Whether the Serve app's replicas can fit the Ray cluster at all. No Ray instance needed.

Serve waits forever for a replica that cannot be placed (Ray logs "taken more than 30s to be
scheduled" every 30 s and /healthz never turns 200), so ``raytimm serve`` checks before deploying:
on a local Ray it started itself (which cannot grow) a shortfall is an error naming the flags; on a
joined cluster an autoscaler may add nodes, so it is a warning.
"""
from typing import Optional

from raytimm.serve.settings import ServeArgs

_EPS = 1e-9


def replica_range(args: ServeArgs) -> tuple[int, int, str]:
    """(model replicas needed to start, most it may scale to, the setting that names the first)."""
    if not args.autoscaling:
        return args.replicas, args.replicas, f"--replicas {args.replicas}"
    from ray.serve.config import AutoscalingConfig  # Serve's own defaults and validation

    cfg = AutoscalingConfig(**args.autoscaling)
    start = max(cfg.min_replicas, cfg.initial_replicas if cfg.initial_replicas is not None else 0)
    key = "initial_replicas" if cfg.initial_replicas is not None and cfg.initial_replicas > cfg.min_replicas \
        else "min_replicas"
    return start, max(start, cfg.max_replicas), f"autoscaling {key}={start}"


def _need(args: ServeArgs, replicas: int, what: str) -> tuple[float, str]:
    """Resources of ``replicas`` model replicas plus the ingress, and how they were counted."""
    if what == "CPU":
        need = replicas * args.num_cpus + args.ingress_replicas * args.ingress_num_cpus
        sum_text = (f"× --num-cpus {args.num_cpus:g} + --ingress-replicas {args.ingress_replicas} × "
                    f"--ingress-num-cpus {args.ingress_num_cpus:g}")
    else:
        need = replicas * args.num_gpus
        sum_text = f"× --num-gpus {args.num_gpus:g}"
    return need, sum_text


def shortfalls(args: ServeArgs, cluster: dict, *, local: bool) -> tuple[list[str], list[str]]:
    """(errors, warnings) for these args on a cluster with ``cluster`` resources (ray.cluster_resources()).

    Errors: replicas needed to start that do not fit a local Ray. Warnings: the same on a joined cluster,
    and autoscaling's max_replicas where it cannot all fit (it then stops lower).
    """
    start, most, named = replica_range(args)
    errors: list[str] = []
    warnings: list[str] = []
    for what, fix in (("CPU", "--replicas or --num-cpus"), ("GPU", "--replicas or --num-gpus (0 runs on CPU)")):
        have = float(cluster.get(what, 0.0))
        need, sum_text = _need(args, start, what)
        if need > have + _EPS:
            where = "this machine's Ray has" if local else "the cluster has"
            msg = (f"{named} {sum_text} needs {need:g} {what}s, but {where} {have:g}: "
                   f"the replicas can never all start; lower {fix}")
            if local:
                errors.append(msg)
            else:
                warnings.append(f"{named} {sum_text} needs {need:g} {what}s and the cluster has {have:g} now: "
                                f"Serve waits until the cluster provides them (an autoscaler may add nodes)")
            continue
        need_most, _ = _need(args, most, what)
        if most > start and need_most > have + _EPS and local:
            per = args.num_cpus if what == "CPU" else args.num_gpus
            fit = int((have - (need - start * per)) // per + _EPS) if per else most
            warnings.append(f"autoscaling max_replicas={most} needs {need_most:g} {what}s, but this machine's Ray "
                            f"has {have:g}: at most {fit} model replicas will run")
    return errors, warnings


def fit_error(args: ServeArgs, cluster: dict) -> Optional[str]:
    """The one-line error for a local Ray, or None when the replicas fit."""
    errors, _ = shortfalls(args, cluster, local=True)
    return "; ".join(errors) or None
