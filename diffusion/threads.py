"""How many CPU threads this process uses, and how they wait: so that two jobs on one machine
(a training run, a scheduled batch, a served model) share it instead of collapsing.

Two things go wrong when two torch processes share CPUs. Each starts one OpenMP thread per core
it sees, whether or not a container quota or a CPU affinity lets it use them; and OpenMP threads
that finish early spin-wait for the others, burning the cores the other process needs. On a
2-core machine two ``t2i generate`` at once ran at 0.74 img/s each against 34 alone
(docs/results.md#two-jobs-on-one-machine).

- ``cpu_count()``: the CPUs this process may use: its affinity mask, capped by the cgroup CPU quota
  (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``), rounded down, at least 1.
- ``thread_count()``: that, or ``T2I_THREADS`` when set (0: leave torch's own default), or a count
  already set in ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` (torchrun's ranks, a user's choice).
- ``set_wait_policy()``: ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose one. It acts only if
  it runs before torch loads its OpenMP runtime (before ``import torch``), and it is exported, so
  children (torchrun ranks, dvc stage commands, DataLoader and serving workers) inherit it.
- ``apply()``: both, then torch's intra-op threads to ``thread_count()`` and a few inter-op threads.

Every ``t2i`` command calls ``set_wait_policy()`` before anything imports torch, then ``apply()``.
In a notebook, set ``OMP_WAIT_POLICY=PASSIVE`` yourself, or call ``diffusion.threads.apply()``
before ``import torch``. Standard library only; torch is imported inside ``apply``.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import MutableMapping

CGROUP_ROOT = Path("/sys/fs/cgroup")
ENV = "T2I_THREADS"
CHOSEN = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # a thread count set before us wins over cpu_count()
WAIT_POLICY = "PASSIVE"  # torch's wheels use GNU OpenMP (libgomp); KMP_BLOCKTIME is Intel's and unused


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpus(root: Path | str = CGROUP_ROOT) -> int | None:
    """The CPU quota of the cgroup at ``root`` in whole CPUs (rounded down, at least 1), or None
    when there is none. v2: ``cpu.max`` ("max 100000" or "150000 100000"); v1: ``cpu.cfs_quota_us``
    (-1: none) over ``cpu.cfs_period_us`` under ``cpu/`` or ``cpu,cpuacct/``."""
    root = Path(root)
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        return None if quota == "max" else _whole(quota, period or "100000")
    for d in (root / "cpu", root / "cpu,cpuacct", root):
        quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return None if int(quota) < 0 else _whole(quota, period)
    return None


def _whole(quota: str, period: str) -> int:
    return max(1, math.floor(int(quota) / int(period)))


def cpu_count(cgroup_root: Path | str = CGROUP_ROOT) -> int:
    """The CPUs this process may use: affinity, capped by the cgroup quota; at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpus(cgroup_root)
    return max(1, min(n, quota) if quota else n)


def thread_count(env: MutableMapping[str, str] = os.environ, cgroup_root: Path | str = CGROUP_ROOT) -> int:
    """``T2I_THREADS`` when set (0: leave torch's default, returned as 0); else a count already
    chosen for this process (``OMP_NUM_THREADS``, then ``MKL_NUM_THREADS``, as torch reads them:
    torchrun sets 1 per rank, and a Dask nanny exports 1 into the process that starts it); else
    ``cpu_count()``."""
    raw = env.get(ENV, "").strip()
    if not raw:
        for name in CHOSEN:
            chosen = env.get(name, "").strip()
            if chosen.isdigit() and int(chosen) > 0:
                return int(chosen)
        return cpu_count(cgroup_root)
    if not raw.isdigit():
        raise ValueError(f"{ENV} must be a whole number of threads (0: torch's default), not {raw!r}")
    return int(raw)


def set_wait_policy(env: MutableMapping[str, str] = os.environ) -> bool:
    """Export OMP_WAIT_POLICY=PASSIVE unless it is set already (the user's choice wins). Returns
    False when torch was imported before: its OpenMP runtime has read the environment already, so
    this process keeps the old policy (its children still inherit the new one)."""
    env.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    return "torch" not in sys.modules


def apply(cgroup_root: Path | str = CGROUP_ROOT) -> int:
    """The policy for this process: passive waits, torch intra-op threads = ``thread_count()``,
    inter-op threads at most 2. Returns the intra-op thread count torch now uses."""
    set_wait_policy()
    n = thread_count(cgroup_root=cgroup_root)
    import torch

    if n:
        torch.set_num_threads(n)
        try:  # allowed once, before any inter-op work; a second apply() keeps the first
            torch.set_num_interop_threads(min(n, 2))
        except RuntimeError:
            pass
    return torch.get_num_threads()
