"""Assemble: decide when a study has arrived and whether it should be drafted at all.

A study is *stable* after ``settle_seconds`` without a new instance, at once when a frontal and a
lateral view that the routing rules accept are both present, or at ``max_wait_seconds`` after its
first instance however busy it still is. Routing rules then decide: draft, or skip with a reason
that names what did not match.

Late instances: an instance that arrives after the study left ``receiving`` is stored and starts a
new revision of the study (store.py). The study is assembled again with all its images; work still
in flight for the old revision is discarded when it returns, and the new draft supersedes the
earlier one in the PACS (its SR references the earlier draft). Nothing that arrives is ignored.

All timing state is in the database (first, revision start and last instance times), so a restart
rebuilds every pending timer simply by looking again.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from cxr_node import audit
from cxr_node.config import RoutingRules, StudyConfig
from cxr_node.store import Store, Study, StudyState

log = structlog.get_logger("cxr_node.assemble")

FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_VIEWS = frozenset({"LATERAL"})


@dataclass(frozen=True)
class Routing:
    """The instances a draft may use, or why there are none."""

    eligible: list[sqlite3.Row]
    skip_reason: str | None


def route(instances: Sequence[sqlite3.Row], rules: RoutingRules) -> Routing:
    """Apply the routing rules to each instance; explain a skip in terms an admin can check."""
    eligible, misses = [], {}
    for inst in instances:
        for attribute, value, allowed in (
            ("modality", inst["modality"], rules.modalities),
            ("body part", inst["body_part"], rules.body_parts),
            ("view position", inst["view_position"], rules.view_positions),
        ):
            if value not in allowed:
                key = f"{attribute} {value or '(empty)'} not in [{', '.join(a or '(empty)' for a in allowed)}]"
                misses[key] = misses.get(key, 0) + 1
                break
        else:
            eligible.append(inst)
    if eligible:
        return Routing(eligible, None)
    detail = "; ".join(f"{n} instance{'s' * (n > 1)}: {k}" for k, n in sorted(misses.items()))
    return Routing([], f"no instance matches the routing rules ({detail})")


class StudyAssembler:
    """The assemble stage: receiving -> stable (to draft) or skipped (with the reason)."""

    def __init__(self, config: StudyConfig, store: Store, clock: Callable[[], float] = time.time):
        self.config = config
        self.store = store
        self.clock = clock
        self._due_at: float | None = None

    def step(self) -> int:
        now = self.clock()
        moved = 0
        due: list[float] = []
        for study in self.store.studies([StudyState.RECEIVING]):
            instances = self.store.instances(study.study_uid)
            routing = route(instances, self.config.rules)
            why = self.stable_because(study, routing.eligible, now)
            if why is None:
                due.append(min(study.last_received_at + self.config.settle_seconds,
                               study.revision_started_at + self.config.max_wait_seconds))
                continue
            if routing.skip_reason:
                moved += self._move(study, StudyState.SKIPPED, routing.skip_reason)
            else:
                moved += self._move(study, StudyState.STABLE, why)
        self._due_at = min(due, default=None)
        return moved

    def seconds_until_due(self) -> float | None:
        """When the next study's settle or max-wait timer runs out, if no instance comes first."""
        return None if self._due_at is None else self._due_at - self.clock()

    def stable_because(self, study: Study, eligible: Sequence[sqlite3.Row], now: float) -> str | None:
        quiet = now - study.last_received_at
        if quiet >= self.config.settle_seconds:
            return f"no new instance for {quiet:.0f} s"
        views = {inst["view"] for inst in eligible}
        if views & FRONTAL_VIEWS and views & LATERAL_VIEWS:
            return "frontal and lateral views present"
        if now - study.revision_started_at >= self.config.max_wait_seconds:
            return f"still receiving after {self.config.max_wait_seconds:.0f} s (max_wait_seconds)"
        return None

    def _move(self, study: Study, to: StudyState, reason: str) -> int:
        if not self.store.move(study, to, reason):
            return 0  # a new instance arrived meanwhile: the next step looks again
        log.info("study.state", study=study.study_key, revision=study.revision, state=to,
                 reason=reason)
        audit.study_state(study, to, reason)
        return 1
