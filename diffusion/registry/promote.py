"""Promotion: who holds the registry alias (``@champion``), decided by a written policy.

``promote(client, name, cfg, candidate)`` compares a candidate version with the current champion:

1. Both must have been evaluated on the same evaluation fingerprint (prompt set, judge, sampler
   settings: the ``eval.fingerprint`` tag); otherwise the numbers are not comparable and the
   promotion is refused.
2. With no champion yet, the candidate must reach ``cfg.floor``.
3. Otherwise it must beat the champion by ``cfg.min_margin`` in ``cfg.direction``.

Whichever way it goes, the decision and its reason are written as tags on both versions and
appended to their descriptions; the alias moves only on a win. Every alias move is appended to
the registered model's ``champion.history`` tag, which ``rollback`` walks back.

Two promotions at once: every read-decide-move runs under an exclusive lock (a file lock beside a
``sqlite:///`` store, or in ``T2I_LOCK_DIR``), so the alias ends on exactly one version, and the
later promotion compares against whatever the earlier one left. With a remote tracking server,
run promotions from one place (the pipeline, or a Prefect deployment with a concurrency limit of 1)
or point ``T2I_LOCK_DIR`` at a folder every promoter shares.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from diffusion.config import PromoteConfig
from diffusion.errors import T2IError
from diffusion.registry.lineage import EVAL_TAG

HISTORY_TAG = "champion.history"  # on the registered model: versions that held the alias, oldest first


@dataclass(frozen=True)
class Decision:
    outcome: str  # promoted | kept | refused | rolled_back
    reason: str
    model: str
    alias: str
    candidate: int
    champion_before: int | None
    champion_after: int | None
    metric: str
    candidate_value: float | None = None
    champion_value: float | None = None
    time: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        before = f"v{self.champion_before}" if self.champion_before is not None else "none"
        after = f"v{self.champion_after}" if self.champion_after is not None else "none"
        return (f"{self.model}: {self.outcome} v{self.candidate} (@{self.alias}: {before} -> {after}): {self.reason}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def registry_lock(tracking_uri: str, name: str):
    """An exclusive lock per registered model, held across read-decide-move."""
    lock_dir = os.environ.get("T2I_LOCK_DIR")
    if lock_dir is None and tracking_uri.startswith("sqlite:///"):
        lock_dir = str(Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent)
    if lock_dir is None:
        lock_dir = str(Path.home() / ".cache" / "t2i" / "locks")
    Path(lock_dir).mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{tracking_uri}\0{name}".encode()).hexdigest()[:16]
    with open(Path(lock_dir) / f".t2i-registry-{key}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _metric(version, metric: str) -> float | None:
    raw = (version.tags or {}).get(metric)
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def _history(client, name: str) -> list[int]:
    raw = (client.get_registered_model(name).tags or {}).get(HISTORY_TAG, "")
    return [int(v) for v in raw.split(",") if v.strip()]


def _champion(client, name: str, alias: str) -> int | None:
    aliases = client.get_registered_model(name).aliases or {}
    return int(aliases[alias]) if alias in aliases else None


def _record(client, d: Decision) -> None:
    """Tags and a description line on the candidate and on the champion it was compared with."""
    stamp = f"[{d.time}] @{d.alias}: {d.outcome} v{d.candidate}: {d.reason}"
    client.set_model_version_tag(d.model, str(d.candidate), "promotion.decision", d.outcome)
    client.set_model_version_tag(d.model, str(d.candidate), "promotion.reason", d.reason[:5000])
    client.set_model_version_tag(d.model, str(d.candidate), "promotion.time", d.time)
    client.set_model_version_tag(d.model, str(d.candidate), "promotion.compared_with",
                                 "none" if d.champion_before is None else str(d.champion_before))
    versions = {d.candidate} | ({d.champion_before} if d.champion_before is not None else set())
    for v in versions:
        if v != d.candidate:
            client.set_model_version_tag(d.model, str(v), f"promotion.challenged_by.v{d.candidate}",
                                         f"{d.outcome}: {d.reason}"[:5000])
        mv = client.get_model_version(d.model, str(v))
        client.update_model_version(d.model, str(v), description=((mv.description or "") + "\n" + stamp).strip())


def newest_version(client, name: str) -> int:
    from diffusion.registry.versions import registered_model

    registered_model(client, name)  # the one-line "no such model" error
    versions = [int(v.version) for v in client.search_model_versions(f"name='{name}'")]
    if not versions:
        raise T2IError(f"model {name!r} has no versions yet (run the pipeline first)")
    return max(versions)


def with_metric(cfg: PromoteConfig, candidate) -> PromoteConfig:
    """``cfg`` with ``metric: auto`` resolved for a version: the judge's held-out all-correct where
    the version has it (the built-in set), else the retrieval evaluator's R-precision (any data),
    as ``evaluation.evaluate.promotion_metric`` resolves it from the params."""
    if cfg.metric != "auto":
        return cfg
    from dataclasses import replace

    from diffusion.evaluation.evaluate import AUTO_METRIC

    builtin = _metric(candidate, AUTO_METRIC[True]) is not None or _metric(candidate, AUTO_METRIC[False]) is None
    return replace(cfg, metric=AUTO_METRIC[builtin])


def decide(cfg: PromoteConfig, candidate, champion) -> tuple[str, str]:
    """(outcome, reason) of the policy for a candidate ModelVersion against the champion's (or None)."""
    cfg = with_metric(cfg, candidate)
    sign = 1.0 if cfg.direction == "maximize" else -1.0
    cand = _metric(candidate, cfg.metric)
    if cand is None:
        return "refused", f"v{candidate.version} has no {cfg.metric} metric tag"
    if champion is None:
        if sign * (cand - cfg.floor) >= 0:
            return "promoted", f"first {cfg.alias}: {cfg.metric} {cand:.4f} reaches the floor {cfg.floor}"
        return "kept", f"{cfg.metric} {cand:.4f} misses the floor {cfg.floor} for a first {cfg.alias}"
    fp_c, fp_h = (candidate.tags or {}).get(EVAL_TAG), (champion.tags or {}).get(EVAL_TAG)
    if not fp_c or fp_c != fp_h:
        return "refused", (f"evaluation fingerprints differ (v{candidate.version}: {fp_c or 'none'}, "
                           f"v{champion.version}: {fp_h or 'none'}): the numbers are not comparable")
    champ = _metric(champion, cfg.metric)
    if champ is None:
        return "refused", f"champion v{champion.version} has no {cfg.metric} metric tag"
    gain = sign * (cand - champ)
    if gain > 0 and gain >= cfg.min_margin:
        return "promoted", f"{cfg.metric} {cand:.4f} vs {champ:.4f}: wins by {gain:.4f} >= margin {cfg.min_margin}"
    return "kept", f"{cfg.metric} {cand:.4f} vs {champ:.4f}: gain {gain:.4f} below margin {cfg.min_margin}"


def promote(client, tracking_uri: str, name: str, cfg: PromoteConfig, candidate: int | None = None) -> Decision:
    """Apply the policy to ``candidate`` (default: the newest version); move the alias on a win."""
    with registry_lock(tracking_uri, name):
        version = candidate if candidate is not None else newest_version(client, name)
        from diffusion.registry.versions import ModelRef, resolve_version

        cand = resolve_version(ModelRef(name, version=str(version)), client)
        before = _champion(client, name, cfg.alias)
        champ = client.get_model_version(name, str(before)) if before is not None else None
        cfg = with_metric(cfg, cand)
        if before == int(cand.version):
            outcome, reason = "kept", f"v{before} already holds @{cfg.alias}"
        else:
            outcome, reason = decide(cfg, cand, champ)
        after = before
        if outcome == "promoted":
            client.set_registered_model_alias(name, cfg.alias, str(cand.version))
            history = _history(client, name)
            if before is not None and (not history or history[-1] != before):
                history.append(before)  # an alias set by hand before this policy ran
            client.set_registered_model_tag(name, HISTORY_TAG, ",".join(map(str, history + [int(cand.version)])))
            after = _champion(client, name, cfg.alias)
            if after != int(cand.version):
                raise T2IError(f"@{cfg.alias} of {name} moved to v{after} during the promotion of v{cand.version}")
        d = Decision(outcome, reason, name, cfg.alias, int(cand.version), before, after, cfg.metric,
                     _metric(cand, cfg.metric), _metric(champ, cfg.metric) if champ is not None else None, _now())
        if outcome != "kept" or before != int(cand.version):
            _record(client, d)
        return d


def rollback(client, tracking_uri: str, name: str, alias: str = "champion") -> Decision:
    """Move ``alias`` back to the version that held it before the current one."""
    with registry_lock(tracking_uri, name):
        current = _champion(client, name, alias)
        if current is None:
            from diffusion.registry.versions import ModelRef, resolve_version

            resolve_version(ModelRef(name, alias=alias), client)  # raises the "no @alias yet" error
        history = _history(client, name)
        if history and history[-1] == current:
            history = history[:-1]
        if not history:
            raise T2IError(f"{name}@{alias} is v{current} and no earlier version held it: nothing to roll back to")
        previous = history[-1]
        client.set_registered_model_alias(name, alias, str(previous))
        client.set_registered_model_tag(name, HISTORY_TAG, ",".join(map(str, history)))
        d = Decision("rolled_back", f"@{alias} moved back from v{current} to v{previous}", name, alias,
                     int(current), current, previous, "", time=_now())
        client.set_model_version_tag(name, str(current), "promotion.rolled_back", f"{d.time}: replaced by v{previous}")
        client.set_model_version_tag(name, str(previous), "promotion.restored", f"{d.time}: replaced v{current}")
        for v in (current, previous):
            mv = client.get_model_version(name, str(v))
            client.update_model_version(name, str(v), description=(
                (mv.description or "") + f"\n[{d.time}] @{alias}: rolled back from v{current} to v{previous}").strip())
        return d
