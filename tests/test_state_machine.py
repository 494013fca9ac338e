"""The study state machine: every edge the pipeline may take, and every other one refused."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest

from cxr_node.store import InstanceRecord, StateError, Store, Study, StudyState

S = StudyState
# The specification, written out here on purpose rather than imported from the code.
ALLOWED = {
    (S.RECEIVING, S.STABLE), (S.RECEIVING, S.SKIPPED),  # assemble
    (S.STABLE, S.QUEUED), (S.STABLE, S.FAILED),  # queue: claimed, or no usable image
    (S.STABLE, S.REPORTED), (S.STABLE, S.SENT),  # queue: the earlier draft stands
    (S.QUEUED, S.DRAFTING), (S.QUEUED, S.DRAFTED), (S.QUEUED, S.FAILED),  # results
    (S.DRAFTING, S.DRAFTED), (S.DRAFTING, S.FAILED), (S.DRAFTING, S.QUEUED),  # retry
    (S.DRAFTED, S.REPORTED), (S.DRAFTED, S.FAILED),  # report
    (S.REPORTED, S.SENT), (S.REPORTED, S.FAILED),  # dispatch
    (S.FAILED, S.STABLE), (S.SKIPPED, S.STABLE),  # `cxr-node redraft`
    (S.FAILED, S.REPORTED),  # `cxr-node requeue` of a study failed by dispatch
}
EDGES = list(itertools.product(StudyState, StudyState))


def record(uid: str) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=uid, study_uid="1.2.3", series_uid="1.2.3.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax="1.2.840.10008.1.2.1",
        modality="CR", body_part="CHEST", view_position="PA", view="PA", instance_number=1,
        path=f"/spool/{uid}", size=10, calling_ae="MOD", peer="127.0.0.1")


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "state.sqlite3")
    store.record_instance(record("1.1"), same_content=lambda _: False)
    return store


def put(store: Store, state: StudyState) -> Study:
    """The study as if the pipeline had brought it to ``state`` (set directly, for the test)."""
    store.db.execute("UPDATE studies SET state = ? WHERE study_uid = '1.2.3'", (state,))
    study = store.study("1.2.3")
    assert study is not None and study.state == state
    return study


@pytest.mark.parametrize(("frm", "to"), sorted(ALLOWED))
def test_allowed_edges_move_the_study_and_are_recorded(store: Store, frm: S, to: S) -> None:
    study = put(store, frm)
    assert store.move(study, to, reason="because")
    after = store.study("1.2.3")
    assert (after.state, after.reason, after.revision) == (to, "because", 1)
    assert store.history("1.2.3")[-1]["state"] == to


@pytest.mark.parametrize(("frm", "to"), sorted(e for e in EDGES if e not in ALLOWED))
def test_every_other_edge_is_refused_precisely(store: Store, frm: S, to: S) -> None:
    study = put(store, frm)
    before = len(store.history("1.2.3"))
    with pytest.raises(StateError) as refused:
        store.move(study, to, reason="because")
    message = str(refused.value)
    assert f"{frm.value} -> {to.value}" in message and study.study_key in message
    assert "1.2.3" not in message  # the study key, never the Study Instance UID
    assert store.study("1.2.3").state == frm
    assert len(store.history("1.2.3")) == before


@pytest.mark.parametrize("frm", [s for s in StudyState if s != S.RECEIVING])
def test_a_late_instance_reopens_the_study_from_any_state_as_a_new_revision(
    store: Store, frm: S
) -> None:
    put(store, frm)
    reopened = store.record_instance(record(f"1.{len(frm.value)}.9"),
                                     same_content=lambda _: False).reopened
    assert reopened is not None
    assert (reopened.state, reopened.revision) == (S.RECEIVING, 2)
    assert [r["state"] for r in store.history("1.2.3")][-1] == S.RECEIVING


def test_the_compare_and_set_still_refuses_a_stale_view(store: Store) -> None:
    """An allowed edge from a state or revision the study has left is not taken (no error)."""
    study = put(store, S.QUEUED)
    assert store.move(study, S.DRAFTING)
    assert not store.move(study, S.DRAFTED)  # the caller saw 'queued'; it is 'drafting' now
    assert not store.move(replace(store.study("1.2.3"), revision=7), S.DRAFTED)
    assert store.study("1.2.3").state == S.DRAFTING
