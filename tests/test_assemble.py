"""Study assembly and the state machine, on a real SQLite store with a controlled clock."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cxr_node.assemble import StudyAssembler, route
from cxr_node.config import RoutingRules, StudyConfig
from cxr_node.store import InstanceRecord, Recorded, Store, StudyState


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def record(uid: str, study: str = "1.2.3", view: str = "PA", **kw: object) -> InstanceRecord:
    base = InstanceRecord(
        sop_instance_uid=uid, study_uid=study, series_uid="1.2.3.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax="1.2.840.10008.1.2.1",
        modality="CR", body_part="CHEST", view_position={"LATERAL": "LL"}.get(view, view),
        view=view, instance_number=1, path=f"/spool/{uid}", size=10, calling_ae="MOD", peer="127.0.0.1")
    return replace(base, **kw)


def receive(store: Store, rec: InstanceRecord, now: float | None = None,
            same: bool = False) -> Recorded:
    """Index ``rec`` as the receiver does; ``same``: its content equals any stored copy's."""
    return store.record_instance(rec, same_content=lambda _: same, now=now)


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state.sqlite3")


@pytest.fixture()
def clock() -> Clock:
    return Clock()


def assembler(store: Store, clock: Clock, **kw: object) -> StudyAssembler:
    return StudyAssembler(StudyConfig(settle_seconds=30, max_wait_seconds=300, **kw), store, clock)


def state(store: Store, uid: str = "1.2.3") -> StudyState:
    study = store.study(uid)
    assert study is not None
    return study.state


def test_settles_after_quiet_period(store: Store, clock: Clock):
    stage = assembler(store, clock)
    receive(store, record("1.1"), now=clock.now)
    clock.now += 29
    assert stage.step() == 0 and state(store) == StudyState.RECEIVING
    receive(store, record("1.2", view="AP"), now=clock.now)  # resets the quiet period
    clock.now += 29
    assert stage.step() == 0
    assert stage.seconds_until_due() == 1  # the runner sleeps until then, not a poll longer
    clock.now += 1
    assert stage.step() == 1 and state(store) == StudyState.STABLE
    assert "no new instance for 30 s" in (store.study("1.2.3").reason or "")
    assert stage.seconds_until_due() is None  # nothing left to wait for


def test_frontal_and_lateral_make_it_stable_at_once(store: Store, clock: Clock):
    stage = assembler(store, clock)
    receive(store, record("1.1"), now=clock.now)
    assert stage.step() == 0
    receive(store, record("1.2", view="LATERAL"), now=clock.now)
    assert stage.step() == 1 and store.study("1.2.3").reason == "frontal and lateral views present"


def test_max_wait_caps_a_study_that_keeps_receiving(store: Store, clock: Clock):
    stage = assembler(store, clock)
    for i in range(20):
        receive(store, record(f"1.{i}"), now=clock.now)
        clock.now += 28
        if stage.step():
            break
    assert state(store) == StudyState.STABLE and i == 10  # 11 x 28 s >= 300 s
    assert "max_wait_seconds" in (store.study("1.2.3").reason or "")


def test_routing_skips_with_a_reason_naming_what_did_not_match(store: Store, clock: Clock):
    stage = assembler(store, clock)
    receive(store, record("1.1", modality="MR"), now=clock.now)
    receive(store, record("1.2", body_part="HIP"), now=clock.now)
    receive(store, record("1.3", body_part="HIP"), now=clock.now)
    clock.now += 30
    assert stage.step() == 1 and state(store) == StudyState.SKIPPED
    reason = store.study("1.2.3").reason
    assert "1 instance: modality MR not in [CR, DX]" in reason
    assert "2 instances: body part HIP not in [CHEST, (empty)]" in reason


def test_route_accepts_empty_attributes_when_the_rules_list_them():
    rules = RoutingRules()
    rows = [{"modality": "DX", "body_part": "", "view_position": ""}]
    assert route(rows, rules).eligible == rows
    strict = RoutingRules(body_parts=["CHEST"])
    assert route(rows, strict).skip_reason


def test_identical_resend_changes_nothing_but_new_content_is_kept_and_flagged(store: Store, clock: Clock):
    assert receive(store, record("1.1"), now=clock.now).outcome == "stored"
    assert receive(store, record("1.1"), now=clock.now, same=True).outcome == "duplicate"
    assert receive(store, record("1.1", path="/spool/other"), now=clock.now).outcome == "conflict"
    rows = store.db.execute("SELECT conflict FROM instances ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [0, 1]
    # drafting uses the newest copy of an instance
    assert [r["path"] for r in store.instances("1.2.3")] == ["/spool/other"]


@pytest.mark.parametrize("later", [StudyState.STABLE, StudyState.SKIPPED, StudyState.SENT])
def test_late_instance_starts_a_new_revision(store: Store, clock: Clock, later: StudyState):
    receive(store, record("1.1"), now=clock.now)
    path = {StudyState.STABLE: [StudyState.STABLE], StudyState.SKIPPED: [StudyState.SKIPPED],
            StudyState.SENT: [StudyState.STABLE, StudyState.QUEUED, StudyState.DRAFTED,
                              StudyState.REPORTED, StudyState.SENT]}[later]
    for step in path:
        assert store.move(store.study("1.2.3"), step)
    clock.now += 100
    reopened = receive(store, record("1.2", view="LATERAL"), now=clock.now).reopened
    study = store.study("1.2.3")
    assert reopened == study
    assert (study.state, study.revision) == (StudyState.RECEIVING, 2)
    assert f"new instance arrived while {later.value}" in study.reason
    assert study.revision_started_at == clock.now
    # a stale stage still holding revision 1 cannot move the study
    stale = replace(study, revision=1)
    assert not store.move(stale, StudyState.STABLE)
    history = [(r["revision"], r["state"]) for r in store.history("1.2.3")]
    assert history == [(1, "receiving"), *((1, s.value) for s in path), (2, "receiving")]


def test_timers_survive_a_restart(tmp_path: Path, clock: Clock):
    store = Store(tmp_path / "state.sqlite3")
    receive(store, record("1.1"), now=clock.now)
    store.close()
    reopened = Store(tmp_path / "state.sqlite3")
    clock.now += 30
    assert assembler(reopened, clock).step() == 1
    assert state(reopened) == StudyState.STABLE


def test_database_is_private(tmp_path: Path):
    Store(tmp_path / "state" / "db.sqlite3")
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "state" / "db.sqlite3").stat().st_mode & 0o777 == 0o600


def test_redraft_command_reopens_only_failed_or_skipped_studies(tmp_path: Path):
    import subprocess
    import sys

    state = tmp_path / "state"
    config = tmp_path / "node.yaml"
    config.write_text(f"node: {{state_dir: {state}}}\n")
    store = Store(state / "cxr-node.sqlite3")
    receive(store, record("1.1"))

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cxr_node", "redraft", "--config", str(config),
                               store.study("1.2.3").study_key], capture_output=True, text=True)

    assert run().returncode == 1  # still receiving
    assert store.move(store.study("1.2.3"), StudyState.STABLE, "settled")
    assert store.move(store.study("1.2.3"), StudyState.FAILED, "degenerate output")
    done = run()
    assert done.returncode == 0, done.stderr
    study = store.study("1.2.3")
    assert study.state == StudyState.STABLE and "by an administrator (was failed)" in study.reason


def test_an_idle_stage_runs_again_when_its_own_timer_runs_out():
    """A study's settle time ends between polls: the stage looks then, not at the next poll."""
    import threading
    import time

    from cxr_node.node import StageRunner, Wakeup

    class SettlingStage:
        def __init__(self) -> None:
            self.steps = 0

        def step(self) -> int:
            self.steps += 1
            return 0

        def seconds_until_due(self) -> float | None:
            return 0.05

    stage, stopping = SettlingStage(), threading.Event()
    runner = StageRunner("assemble", stage, interval=60, stopping=stopping, wakeup=Wakeup())
    runner.start()
    time.sleep(0.5)
    stopping.set()
    runner.woken.set()
    runner.join(5)
    assert stage.steps >= 3  # a 60 s poll alone would have run it once
