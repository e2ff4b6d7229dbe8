"""Sharing a machine (diffusion.threads): the thread count comes from the CPUs this process may use
(affinity, cgroup quota) or T2I_THREADS, and every t2i command exports OMP_WAIT_POLICY=PASSIVE to
its children unless the user chose a policy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion import threads

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "T2I_THREADS", *threads.CHOSEN)}
    e.update(env, DO_NOT_TRACK="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.parametrize("text, cpus", [("max 100000", None), ("150000 100000", 1), ("250000 100000", 2),
                                        ("400000 100000", 4), ("20000 100000", 1), ("200000 50000", 4)])
def test_cgroup_v2_quota_rounds_down_and_is_at_least_one(tmp_path, text, cpus):
    (tmp_path / "cpu.max").write_text(text + "\n")
    assert threads.cgroup_cpus(tmp_path) == cpus


@pytest.mark.parametrize("folder", ["cpu", "cpu,cpuacct"])
@pytest.mark.parametrize("quota, cpus", [("-1", None), ("300000", 3), ("50000", 1)])
def test_cgroup_v1_quota(tmp_path, folder, quota, cpus):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "cpu.cfs_quota_us").write_text(quota + "\n")
    (tmp_path / folder / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpus(tmp_path) == cpus


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert threads.cgroup_cpus(tmp_path) is None
    assert threads.cpu_count(tmp_path) == len(os.sched_getaffinity(0))


def test_the_quota_caps_the_affinity(tmp_path):
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert threads.cpu_count(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{100000 * (os.cpu_count() + 8)} 100000\n")
    assert threads.cpu_count(tmp_path) == len(os.sched_getaffinity(0))


def test_t2i_threads_overrides(tmp_path):
    assert threads.thread_count({"T2I_THREADS": "3"}, tmp_path) == 3
    assert threads.thread_count({"T2I_THREADS": "0"}, tmp_path) == 0  # torch's own default
    assert threads.thread_count({}, tmp_path) == threads.cpu_count(tmp_path)
    with pytest.raises(ValueError, match="T2I_THREADS must be a whole number"):
        threads.thread_count({"T2I_THREADS": "many"}, tmp_path)


def test_one_cpu_of_affinity_gives_one_torch_thread():
    cpu = min(os.sched_getaffinity(0))
    r = python(f"import os; os.sched_setaffinity(0, {{{cpu}}})\n"
               "from diffusion import threads; n = threads.apply()\n"
               "import torch; print(threads.cpu_count(), n, torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])")
    assert r.stdout.split() == ["1", "1", "1", "PASSIVE"]


def test_apply_keeps_torchs_default_on_an_unrestricted_machine():
    """The default pipeline's numbers stay byte for byte: torch's own count is the usable CPUs."""
    r = python("import torch; d = torch.get_num_threads()\n"
               "from diffusion import threads; print(d, threads.apply())")
    default, applied = r.stdout.split()
    assert applied == default == str(threads.cpu_count())


@pytest.mark.parametrize("name", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_a_count_set_before_us_wins(name):
    """torchrun sets OMP_NUM_THREADS=1 per rank; a Dask nanny exports 1 into its parent: apply()
    keeps it, as torch's own default does, instead of one thread per CPU in every rank."""
    r = python("import torch; d = torch.get_num_threads()\n"
               "from diffusion import threads; print(d, threads.apply())", **{name: "1"})
    assert r.stdout.split() == ["1", "1"]


def test_t2i_threads_env_sets_torch_threads():
    r = python("from diffusion import threads; print(threads.apply())", T2I_THREADS="1")
    assert r.stdout.split() == ["1"]


CHILD_POLICY = """
import subprocess, sys
from flows.cli import main
main(["ingest", "--out", "x", "-s", "train.lr=fast"])  # a user error: after the thread policy, before any work
print("torch imported after the policy:", "torch" in sys.modules)
subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('OMP_WAIT_POLICY'))"])
"""


@pytest.mark.parametrize("user, seen", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_t2i_exports_passive_waits_to_its_children_unless_the_user_chose(user, seen):
    r = python(CHILD_POLICY, **({"OMP_WAIT_POLICY": user} if user else {}))
    assert r.stdout.split("\n")[-2] == seen, r.stdout
    assert "torch imported after the policy: True" in r.stdout


def test_a_bad_t2i_threads_is_one_line(tmp_path):
    e = dict(os.environ, DO_NOT_TRACK="1", T2I_THREADS="lots")
    r = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", "--out", "x"], cwd=tmp_path, env=e,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == ("t2i: error: T2I_THREADS must be a whole number of threads "
                                                      "(0: torch's default), not 'lots'"), r.stderr
