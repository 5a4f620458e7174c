"""Health of each target and of the exporter, shared by /health and trt_heartbeat_health_status.

unhealthy: the model is not loaded, no probe passed within max_age, or the last output was wrong.
degraded:  the last probe failed (but a recent one passed), was slower than the latency
           objective, or the first probe has not run yet.
healthy:   the last probe passed within the objective.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Settings
from .errors import Reason
from .state import TargetSnapshot

STATUSES = ("healthy", "degraded", "unhealthy")
# Health reasons beyond the failure Reasons: states, not failures.
OK, STARTING, STALE, SLOW, AWAITING_FIRST_PROBE = (
    "ok", "starting", "stale", "slow", "awaiting_first_probe",
)  # fmt: skip


@dataclass(frozen=True)
class Health:
    status: str
    reason: str

    @property
    def rank(self) -> int:
        return STATUSES.index(self.status)


def heartbeat_age(snap: TargetSnapshot, now: float) -> float:
    """Seconds since the last passing probe, or since probing began while none has passed."""
    return max(0.0, now - (snap.last_success if snap.last_success is not None else snap.started_at))


def target_health(snap: TargetSnapshot, now: float, settings: Settings) -> Health:
    last = snap.last_probe
    if not snap.loaded:
        if snap.load_failure is not None:
            return Health("unhealthy", str(snap.load_failure[0]))
        if last is not None and last.reason is not None:
            return Health("unhealthy", str(last.reason))  # worker lost, being replaced
        return Health("unhealthy", STARTING)
    if last is not None and last.result == "mismatch":
        return Health("unhealthy", str(Reason.MISMATCH))
    if heartbeat_age(snap, now) > settings.max_age:
        reason = str(last.reason) if last is not None and last.reason is not None else STALE
        return Health("unhealthy", reason)
    if last is None:
        return Health("degraded", AWAITING_FIRST_PROBE)
    if last.result != "success":
        return Health("degraded", str(last.reason))
    if last.phases.get("total", 0.0) > settings.latency_objective:
        return Health("degraded", SLOW)
    return Health("healthy", OK)


def overall_health(healths: list[Health]) -> Health:
    """The worst target decides; an exporter with no targets cannot probe anything."""
    if not healths:
        return Health("unhealthy", "no_targets")
    return max(healths, key=lambda h: h.rank)
