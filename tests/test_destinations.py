"""Destinations are an open registry: a kind is its own module plus one registry line, chosen by
``type:`` in the YAML; the outbox, `config check --connect` and the configuration reference take
it as they take the built-in kinds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Literal

import pytest
from pydantic import Field
from test_dispatch import Clock, file_report, make_sr, node_config, rows, run

from cxr_node.config import ConfigError, load_config, reference
from cxr_node.destinations import (
    KINDS,
    Check,
    Delivery,
    DestinationSettings,
    Draft,
    Kind,
)
from cxr_node.destinations.base import SendsDicomObjects
from cxr_node.dispatch import Outbox
from cxr_node.send import check_connections
from cxr_node.store import Store, StudyState

# --- a kind of destination of the test's own: settings, a sender, and its registry line ----------


class RecorderSettings(DestinationSettings, SendsDicomObjects):
    type: Literal["recorder"] = "recorder"
    label: str = Field(description="what the recorder calls itself")


class Recorder:
    """Keeps what it is handed, answers as told."""

    received: ClassVar[list[tuple[str, dict[str, bytes]]]] = []
    answer: ClassVar[Delivery] = Delivery.delivered()

    def __init__(self, settings: RecorderSettings, node_ae_title: str):
        self.name = settings.name
        self.settings = settings

    def send(self, draft: Draft) -> Delivery:
        documents = self.settings.documents_of(draft)
        Recorder.received.append((self.name, {r: p.read_bytes() for r, p in documents}))
        return Recorder.answer

    def check(self) -> Iterator[Check]:
        yield Check(True, f"recorder {self.settings.label} is listening")


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(KINDS, "recorder", Kind(RecorderSettings, Recorder))  # the registry line
    monkeypatch.setattr(Recorder, "received", [])


def test_a_kind_registered_once_is_configured_sent_to_and_checked(
    tmp_path: Path, recorder: None, cxr_dir: Path,
):
    path = tmp_path / "node.yaml"
    path.write_text(f"node: {{state_dir: {tmp_path / 'state'}}}\n"
                    "destinations:\n"
                    "  - {type: recorder, name: archive, label: tape}\n"
                    f"  - {{name: share, folder: {tmp_path / 'out'}}}\n")  # no type: a folder
    config = load_config(path)
    assert [d.type for d in config.destinations] == ["recorder", "folder"]

    store = Store(config.database_path)
    clock = Clock()
    draft = make_sr(tmp_path, cxr_dir / "CR-MONO1-10-chest.dcm", "recorded")
    file_report(store, config, draft, clock())
    run(Outbox(config, store, clock))
    assert {name: r["state"] for name, r in rows(store).items()} == {
        "archive": "delivered", "share": "delivered"}
    assert Recorder.received == [("archive", {"sr": draft.path.read_bytes()})]
    assert store.study(draft.study_uid).state == StudyState.SENT

    checks = dict((line.split(":")[0], ok) for ok, line in check_connections(config))
    assert checks["destination archive"] and checks["destination share"]
    assert "| `destinations[].label` | str |" in reference()


def test_a_dead_answer_from_any_kind_is_a_dead_letter(tmp_path: Path, recorder: None,
                                                      cxr_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(Recorder, "answer", Delivery.dead("the tape is full"))
    config = node_config(tmp_path, {"type": "recorder", "name": "archive", "label": "tape"})
    store = Store(config.database_path)
    clock = Clock()
    draft = make_sr(tmp_path, cxr_dir / "CR-MONO1-10-chest.dcm", "refused")
    file_report(store, config, draft, clock())
    run(Outbox(config, store, clock))
    assert rows(store)["archive"]["state"] == "dead"
    study = store.study(draft.study_uid)
    assert study.state == StudyState.FAILED and "the tape is full" in study.reason


def test_a_rendition_no_draft_has_is_a_clear_dead_letter(tmp_path: Path, recorder: None,
                                                         cxr_dir: Path):
    config = node_config(tmp_path, {"type": "recorder", "name": "viewer", "label": "v",
                                    "renditions": ["sr", "pdf"]})
    store = Store(config.database_path)
    clock = Clock()
    draft = make_sr(tmp_path, cxr_dir / "CR-MONO1-10-chest.dcm", "no-pdf")
    file_report(store, config, draft, clock())  # filed before the pdf was asked for
    run(Outbox(config, store, clock))
    row = rows(store)["viewer"]
    assert row["state"] == "dead" and "no pdf rendition" in row["reason"]


def test_unknown_kinds_and_keys_are_named_with_the_kinds_there_are(tmp_path: Path,
                                                                    recorder: None):
    path = tmp_path / "node.yaml"
    path.write_text("destinations:\n"
                    "  - {type: pigeon, name: a}\n"
                    "  - {type: recorder, name: b}\n"
                    "  - {type: recorder, name: c, label: x, renditions: [sr, sr]}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    problems = err.value.problems
    assert f"{path}:2: 'destinations[0]' = dict: expected a destination with type: " \
           f"{' / '.join(KINDS)} (each kind's keys: cxr-node config reference)" in problems
    assert f"{path}:3: 'destinations[1].label' is required" in problems
    assert any(p.startswith(f"{path}:4: 'destinations[2].renditions'") and "each rendition once"
               in p for p in problems), problems


def test_a_draft_replaced_by_a_newer_one_is_never_sent_after_it(tmp_path: Path, recorder: None,
                                                                cxr_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    """Revision 1 waits for a retry when revision 2 is filed: only revision 2 goes out (a RIS
    that keeps an order's last result would otherwise end up with the older draft)."""
    config = node_config(tmp_path, {"type": "recorder", "name": "ris", "label": "r"})
    store = Store(config.database_path)
    clock = Clock()
    first = make_sr(tmp_path, cxr_dir / "CR-MONO1-10-chest.dcm", "first")
    file_report(store, config, first, clock())
    monkeypatch.setattr(Recorder, "answer", Delivery.retry("the RIS is busy"))
    run(Outbox(config, store, clock))
    assert len(Recorder.received) == 1 and rows(store)["ris"]["state"] == "pending"

    second = make_sr(tmp_path, cxr_dir / "CR-MONO1-10-chest.dcm", "second")
    with store.transaction() as db:  # what the Reporter files for the study's next revision
        db.execute("INSERT INTO reports (sr_uid, study_uid, revision, job_id, path, demo, "
                   "created_at) VALUES (?, ?, 2, 2, ?, 0, ?)",
                   (second.sr_uid, first.study_uid, str(second.path), clock()))
        Outbox.enqueue(db, sr_uid=second.sr_uid, study_uid=first.study_uid,
                       destinations=["ris"], now=clock())
    monkeypatch.setattr(Recorder, "answer", Delivery.delivered())
    clock.advance(3600)
    run(Outbox(config, store, clock))
    states = {r["sr_uid"]: (r["state"], r["reason"]) for r in store.db.execute(
        "SELECT sr_uid, state, reason FROM outbox")}
    assert states == {first.sr_uid: ("superseded", "a newer draft of the study replaces it"),
                      second.sr_uid: ("delivered", None)}
    assert [sent["sr"] for _, sent in Recorder.received[1:]] == [second.path.read_bytes()]
