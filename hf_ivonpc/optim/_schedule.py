"""The schedule of posterior correction: when to refresh the outer statistics, when to correct.

Shared by the flat-state optimizers and VON-PC. The outer statistics are refreshed every
``refresh_every`` optimizer steps from ``start_step`` on; an inner step is corrected (a second pass
at theta_out) once there has been a refresh and ``start_step`` is reached.
"""

from __future__ import annotations


def fresh_counters() -> dict[str, int]:
    """The counters of an optimizer that has taken no step and made no refresh."""
    return {"step": 0, "refreshes": 0, "last_refresh": -1}


def fresh_skip_counters() -> dict[str, int]:
    """``fresh_counters`` and the counts of what was skipped for non-finite gradients (see
    ``_sampling``): steps and refreshes in all, and the skips since the last step taken."""
    return {**fresh_counters(), "skipped_steps": 0, "skipped_refreshes": 0, "consecutive_skips": 0}


class CorrectionSchedule:
    """When to refresh and when to correct, from ``self._pc`` (step, refreshes, last_refresh),
    ``start_step``, ``refresh_every`` and the subclass's ``correction_enabled``."""

    @property
    def global_step(self) -> int:
        """Number of optimizer steps taken."""
        return self._pc["step"]

    @property
    def refreshes(self) -> int:
        """Refreshes of the outer statistics so far."""
        return self._pc["refreshes"]

    @property
    def counters(self) -> dict[str, int]:
        """A copy of the counters saved in ``state_dict``: ``step`` (optimizer steps taken),
        ``refreshes`` and ``last_refresh`` (the step of the last refresh, -1 before the first);
        for the flat-state optimizers also ``skipped_steps``, ``skipped_refreshes`` (skipped for
        non-finite gradients, in all) and ``consecutive_skips`` (since the last step taken)."""
        return dict(self._pc)

    @property
    def needs_refresh(self) -> bool:
        """True when the outer statistics must be refreshed before the next inner step."""
        s = self._pc["step"]
        return (self.correction_enabled and s >= self.start_step
                and (s - self.start_step) % self.refresh_every == 0
                and self._pc["last_refresh"] != s)

    @property
    def correction_active(self) -> bool:
        """True when the next step needs the mini-batch evaluated at theta_out too."""
        return self.correction_enabled and self._pc["refreshes"] > 0 and self._pc["step"] >= self.start_step
