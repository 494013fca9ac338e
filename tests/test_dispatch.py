"""The return path: draft SRs leave through the outbox to real peers, as the PACS needs them.

Peers are real: Orthanc (a PACS, in a private network namespace, tests/pacs.py), small pynetdicom
SCPs on 127.0.0.1 that answer what a test scripts (out of resources, warnings, failures, aborts),
raw sockets for what no library does on purpose (a rejection, a peer that never answers), a
folder, and the real node killed between the PACS's answer and its own bookkeeping.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import ssl
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
from nodeproc import NodeProcess, wait_for, write_config
from pacs import NetworkNamespace, Orthanc, running_orthanc
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, CTImageStorage
from sr_validation import assert_valid_sr
from test_report import MULTILINGUAL, worker_result

from cxr_node import destinations
from cxr_node.config import Config, ReportConfig, load_config
from cxr_node.destinations import Delivery
from cxr_node.destinations.dicom import store_status_delivery
from cxr_node.dispatch import Outbox, OutboxRow, backoff_seconds, outbox_rows, requeue
from cxr_node.report import DraftReport, build_draft_sr, write_sr
from cxr_node.store import InstanceRecord, Store, StudyState

SETTINGS = ReportConfig(institution_name="Example Hospital")
LONG_REPORT = " ".join(
    f"{i}. Heart size normal. 心臓の大きさは正常。 Η καρδιά είναι φυσιολογική. حجم القلب طبيعي. 🫁"
    for i in range(120)
)
BACKOFF = 10.0


# --- building blocks ---------------------------------------------------------------------------


class Clock:
    """A clock the test moves on, so backoff is checked without sleeping through it."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Draft:
    """A real draft SR of a real chest X-ray, filed in a node's state as the Reporter files it."""

    path: Path
    image: Path
    sr_uid: str
    study_uid: str
    findings: str
    impression: str


def as_draft(draft: Draft) -> destinations.Draft:
    """The draft as the outbox hands it to a destination: its SR only."""
    return destinations.Draft(draft.sr_uid, "study", {"sr": draft.path})


def make_sr(directory: Path, image: Path, tag: str, findings: str | None = None,
            impression: str = "No acute cardiopulmonary abnormality.") -> Draft:
    """Build, write and validate an SR; ``tag`` gives it a SOP Instance UID of its own."""
    result = worker_result(
        model={"fingerprint": hashlib.sha256(tag.encode()).hexdigest()}, impression=impression,
        **({"findings": findings} if findings is not None else {}),
    )
    report = DraftReport.from_result(result, max_characters=100_000)  # the longest allowed
    ds = build_draft_sr([image], report, SETTINGS)
    path = directory / f"{tag}.dcm"
    write_sr(ds, path)
    assert_valid_sr(path, image)
    return Draft(path, image, ds.SOPInstanceUID, ds.StudyInstanceUID, report.findings,
                 report.impression)


def file_report(store: Store, config: Config, draft: Draft, now: float) -> None:
    """What the Reporter leaves behind: the study 'reported', a reports row, the outbox rows."""
    header = pydicom.dcmread(draft.image, stop_before_pixels=True, force=True)
    store.record_instance(InstanceRecord(
        sop_instance_uid=header.SOPInstanceUID,
        study_uid=header.StudyInstanceUID, series_uid=header.SeriesInstanceUID,
        sop_class_uid=header.SOPClassUID, transfer_syntax=ImplicitVRLittleEndian,
        modality=header.Modality, body_part="CHEST", view_position="PA", view="PA",
        instance_number=None, path=str(draft.image), size=draft.image.stat().st_size,
        calling_ae="MODALITY1", peer="127.0.0.1",
    ), same_content=lambda _: False, now=now)
    with store.transaction() as db:
        for state in (StudyState.STABLE, StudyState.QUEUED, StudyState.DRAFTED,
                      StudyState.REPORTED):  # the path the pipeline takes (store.EDGES)
            assert store.transition(db, store.study(draft.study_uid), state, now=now)
        db.execute(
            """INSERT INTO reports (sr_uid, study_uid, revision, job_id, path, supersedes, demo,
               created_at) VALUES (?, ?, 1, 1, ?, NULL, 0, ?)""",
            (draft.sr_uid, draft.study_uid, str(draft.path), now),
        )
        Outbox.enqueue(db, sr_uid=draft.sr_uid, study_uid=draft.study_uid,
                       destinations=[d.name for d in config.destinations], now=now)


def node_config(tmp_path: Path, *destinations: dict[str, Any], **dispatch: Any) -> Config:
    return Config.model_validate({
        "node": {"state_dir": str(tmp_path / "state"), "ae_title": "CXR_NODE"},
        "destinations": list(destinations),
        "dispatch": {"backoff_initial_seconds": BACKOFF, "backoff_max_seconds": 300, **dispatch},
    })


def dicom(name: str, port: int, ae_title: str = "PACS", host: str = "127.0.0.1",
          timeout: float = 5) -> dict[str, Any]:
    return {"name": name, "ae_title": ae_title, "host": host, "port": port,
            "timeout_seconds": timeout}


def rows(store: Store) -> dict[str, Any]:
    """The outbox rows by destination name."""
    return {r["destination"]: r for r in store.db.execute("SELECT * FROM outbox")}


def run(outbox: Outbox, ns: NetworkNamespace | None = None) -> None:
    """One step of the stage, until every lane it started has finished (inside ``ns``)."""

    def step_and_wait() -> None:
        outbox.step()
        assert outbox.wait(timeout=120), "a dispatch lane did not finish"

    if ns is None:
        step_and_wait()
    else:
        ns.call(step_and_wait)


@pytest.fixture
def chest(cxr_dir: Path) -> Path:
    return cxr_dir / "CR-MONO1-10-chest.dcm"


@pytest.fixture
def rg1(cxr_dir: Path) -> Path:
    return cxr_dir / "RG1_J2KI.dcm"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


# --- peers in the test process -----------------------------------------------------------------


class ScriptedSCP:
    """A Storage SCP on 127.0.0.1 that answers each C-STORE with the next scripted status.

    "abort" aborts the association instead of answering; once the script is used up every store
    succeeds. What arrived is kept, as the raw dataset bytes and the SOP Instance UID.
    """

    def __init__(self, *script: int | str, ae_title: str = "PACS",
                 sop_class: str = ComprehensiveSRStorage, tls: ssl.SSLContext | None = None,
                 syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)):
        self.script = list(script)
        self.received: list[str] = []
        self.datasets: list[pydicom.Dataset] = []
        self.on_store: Callable[[], None] | None = None  # runs before each answer
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = True
        self.ae.add_supported_context(sop_class, list(syntaxes))
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, ssl_context=tls,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.server_address[1]

    def _on_store(self, event: evt.Event) -> int:
        self.received.append(event.request.AffectedSOPInstanceUID)
        self.datasets.append(event.dataset)
        if self.on_store:
            self.on_store()
        answer = self.script.pop(0) if self.script else 0x0000
        if answer == "abort":
            event.assoc.abort()
        return 0x0000 if answer == "abort" else int(answer)

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp() -> Iterator[Callable[..., ScriptedSCP]]:
    started: list[ScriptedSCP] = []

    def start(*script: int | str, **kwargs: Any) -> ScriptedSCP:
        started.append(ScriptedSCP(*script, **kwargs))
        return started[-1]

    yield start
    for s in started:
        s.close()


class RawPeer:
    """A TCP peer on 127.0.0.1 that does what no DICOM library does on purpose.

    With ``reject`` (result, source, reason) it answers every association request with that
    A-ASSOCIATE-RJ PDU; without, it takes the connection and never says a word.
    """

    def __init__(self, reject: tuple[int, int, int] | None = None):
        self.reject = reject
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._open: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self._open.append(conn)
            if self.reject:
                conn.recv(65536)
                conn.sendall(struct.pack(">BBIBBBB", 0x03, 0, 4, 0, *self.reject))

    def close(self) -> None:
        self.listener.close()
        for conn in self._open:
            conn.close()


@pytest.fixture
def raw_peer() -> Iterator[Callable[..., RawPeer]]:
    started: list[RawPeer] = []

    def start(reject: tuple[int, int, int] | None = None) -> RawPeer:
        started.append(RawPeer(reject))
        return started[-1]

    yield start
    for p in started:
        p.close()


# --- what a response means ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0000, "delivered"),
        (0xB000, "delivered"),
        (0xB006, "delivered"),
        (0xB007, "delivered"),
        (0xA700, "retry"),
        (0xA7FF, "retry"),
        (0x0213, "retry"),
        (0xA900, "dead"),
        (0xA9FF, "dead"),
        (0xC000, "dead"),
        (0xCFFF, "dead"),
        (0x0122, "dead"),
        (0x0124, "dead"),
        (0x0117, "dead"),
        (0xFF00, "dead"),  # "pending" is no answer to a C-STORE: nobody knows what it stored
    ],
)
def test_every_store_status_has_one_meaning(status: int, outcome: str) -> None:
    delivery = store_status_delivery(status)
    assert (delivery.outcome, delivery.status) == (outcome, status)
    if status:
        assert f"0x{status:04X}" in delivery.reason


def test_delivery_says_why_it_did_not_deliver() -> None:
    with pytest.raises(ValueError, match="must say why"):
        Delivery.retry("")
    with pytest.raises(ValueError, match="16-bit"):
        Delivery.dead("no", status=0x10000)
    with pytest.raises(ValueError, match="outcome"):
        Delivery("lost", "why")  # type: ignore[arg-type]


def test_backoff_doubles_from_the_initial_wait_up_to_the_cap(tmp_path: Path) -> None:
    settings = node_config(tmp_path, backoff_initial_seconds=5, backoff_max_seconds=60).dispatch
    assert [backoff_seconds(n, settings) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
    assert backoff_seconds(2, settings, jitter=0.1) == pytest.approx(11)
    assert backoff_seconds(10_000, settings, jitter=0.1) == 60
    with pytest.raises(ValueError, match="attempts"):
        backoff_seconds(0, settings)


# --- retries, warnings, dead letters (pynetdicom SCP on 127.0.0.1) -----------------------------


def test_out_of_resources_is_retried_with_backoff_then_delivered(
    tmp_path: Path, chest: Path, scp: Callable[..., ScriptedSCP], clock: Clock,
    logs: list[dict[str, Any]],
) -> None:
    peer = scp(0xA700, 0xA700)
    config = node_config(tmp_path, dicom("pacs", peer.port))
    store = Store(config.database_path)
    draft = make_sr(tmp_path, chest, "a700")
    file_report(store, config, draft, clock())
    outbox = Outbox(config, store, clock)

    for attempt, wait in ((1, BACKOFF), (2, 2 * BACKOFF)):
        run(outbox)
        row = rows(store)["pacs"]
        assert (row["state"], row["attempts"], row["last_status"]) == ("pending", attempt, "0xA700")
        assert "Out of Resources" in row["reason"]
        assert wait <= row["next_attempt_at"] - clock() <= wait * 1.1
        run(outbox)  # not due yet: nothing is sent
        assert len(peer.received) == attempt
        clock.advance(wait * 1.1)
    run(outbox)

    row = rows(store)["pacs"]
    assert (row["state"], row["attempts"], row["last_status"]) == ("delivered", 3, "0x0000")
    assert peer.received == [draft.sr_uid] * 3
    assert store.study(draft.study_uid).state == StudyState.SENT
    retries = [e for e in logs if e["event"] == "outbox.retry"]
    assert [e["status"] for e in retries] == ["0xA700", "0xA700"]
    assert [e["event"] for e in logs if e["event"].startswith("outbox.")][-1] == "outbox.delivered"


def test_warning_status_counts_as_delivered_and_is_logged(
    tmp_path: Path, chest: Path, scp: Callable[..., ScriptedSCP], clock: Clock,
    logs: list[dict[str, Any]],
) -> None:
    peer = scp(0xB000)
    config = node_config(tmp_path, dicom("pacs", peer.port))
    store = Store(config.database_path)
    draft = make_sr(tmp_path, chest, "b000")
    file_report(store, config, draft, clock())
    run(Outbox(config, store, clock))

    row = rows(store)["pacs"]
    assert (row["state"], row["attempts"], row["last_status"]) == ("delivered", 1, "0xB000")
    assert "Coercion" in row["reason"]
    delivered = [e for e in logs if e["event"] == "outbox.delivered"]
    assert delivered[0]["status"] == "0xB000" and delivered[0]["log_level"] == "warning"
    assert store.study(draft.study_uid).state == StudyState.SENT


@pytest.mark.parametrize("status", [0xC000, 0xA900, 0x0122])
def test_failure_status_is_a_dead_letter_at_once_and_requeue_delivers(
    tmp_path: Path, chest: Path, scp: Callable[..., ScriptedSCP], clock: Clock, status: int,
    logs: list[dict[str, Any]],
) -> None:
    peer = scp(status)
    config = node_config(tmp_path, dicom("pacs", peer.port))
    store = Store(config.database_path)
    draft = make_sr(tmp_path, chest, f"fail-{status}")
    file_report(store, config, draft, clock())
    outbox = Outbox(config, store, clock)
    run(outbox)
    clock.advance(3600)
    run(outbox)  # a dead letter is not retried, however long one waits

    row = rows(store)["pacs"]
    assert (row["state"], row["attempts"], row["last_status"]) == ("dead", 1, f"0x{status:04X}")
    assert len(peer.received) == 1
    study = store.study(draft.study_uid)
    assert study.state == StudyState.FAILED
    assert study.reason.startswith("dispatch to pacs failed: C-STORE status 0x")
    assert [e["status"] for e in logs if e["event"] == "outbox.dead"] == [f"0x{status:04X}"]

    # the PACS is fixed (its script is used up: it stores), then an admin re-queues the row
    listed = outbox_rows(store)
    assert [(r.id, r.state, r.destination) for r in listed] == [(row["id"], "dead", "pacs")]
    assert requeue(store, row_id=row["id"], now=clock()) == 1
    assert store.study(draft.study_uid).state == StudyState.REPORTED
    run(outbox)
    row = rows(store)["pacs"]
    assert (row["state"], row["attempts"]) == ("delivered", 1)
    assert peer.received == [draft.sr_uid] * 2
    assert store.study(draft.study_uid).state == StudyState.SENT
    assert outbox_rows(store) == []
    assert any(e["event"] == "outbox.requeued" for e in logs)


def test_permanent_rejection_is_a_dead_letter_until_requeued(
    tmp_path: Path, chest: Path, scp: Callable[..., ScriptedSCP], clock: Clock
) -> None:
    peer = scp(ae_title="OTHER_AE")  # checks the called AE title: ours is wrong
    config = node_config(tmp_path, dicom("pacs", peer.port))
    store = Store(config.database_path)
    draft = make_sr(tmp_path, chest, "rejected")
    file_report(store, config, draft, clock())
    outbox = Outbox(config, store, clock)
    run(outbox)
    clock.advance(3600)
    run(outbox)

    row = rows(store)["pacs"]
    assert (row["state"], row["attempts"], row["last_status"]) == ("dead", 1, None)
    assert "rejected" in row["reason"] and "permanently" in row["reason"]
    assert "Called AE title not recognised" in row["reason"]
    assert peer.received == []
    assert store.study(draft.study_uid).reason.startswith("dispatch to pacs failed")

    peer.ae.require_called_aet = False  # the PACS admin adds our called AE title
    assert requeue(store, all_failed=True, now=clock()) == 1
    run(outbox)
    assert rows(store)["pacs"]["state"] == "delivered"
    assert peer.received == [draft.sr_uid]
    assert store.study(draft.study_uid).state == StudyState.SENT


def test_transient_rejection_is_retried_until_max_attempts(
    tmp_path: Path, chest: Path, raw_peer: Callable[..., RawPeer], clock: Clock
) -> None:
    peer = raw_peer(reject=(0x02, 0x03, 0x02))  # transient, presentation layer, local limit
    config = node_config(tmp_path, dicom("pacs", peer.port), max_attempts=3)
    store = Store(config.database_path)
    draft = make_sr(tmp_path, chest, "busy")
    file_report(store, config, draft, clock())
    outbox = Outbox(config, store, clock)
    for attempt in (1, 2):
        run(outbox)
        row = rows(store)["pacs"]
        assert (row["state"], row["attempts"]) == ("pending", attempt)
        assert "for now" in row["reason"]
        clock.advance(1000)
    run(outbox)

    row = rows(store)["pacs"]
    assert (row["state"], row["attempts"]) == ("dead", 3)
    assert row["reason"].startswith("gave up after 3 attempts; last: association rejected")
    assert peer.connections == 3
    assert store.study(draft.study_uid).state == StudyState.FAILED


def test_an_abort_instead_of_a_response_is_retried(
    tmp_path: Path, chest: Path, scp: Callable[..., ScriptedSCP], clock: Clock
) -> None:
    peer = scp("abort")
    config = node_config(tmp_path, dicom("pacs", peer.port))
    store = Store(config.database_path)
    draft = make_sr(tmp_path, chest, "abort")
    file_report(store, config, draft, clock())
    outbox = Outbox(config, store, clock)
    run(outbox)
    row = rows(store)["pacs"]
    assert (row["state"], row["attempts"], row["last_status"]) == ("pending", 1, None)
    assert "no C-STORE response" in row["reason"]
    clock.advance(BACKOFF * 1.1)
    run(outbox)
    assert rows(store)["pacs"]["state"] == "delivered"
    assert peer.received == [draft.sr_uid] * 2


def test_a_pacs_that_takes_only_implicit_vr_gets_the_same_sr_re_encoded(
    tmp_path: Path, chest: Path, scp: Callable[..., ScriptedSCP], clock: Clock
) -> None:
    peer = scp(syntaxes=(ImplicitVRLittleEndian,))
    config = node_config(tmp_path, dicom("pacs", peer.port))
    store = Store(config.database_path)
    draft = make_sr(tmp_path, chest, "implicit", findings=MULTILINGUAL)
    file_report(store, config, draft, clock())
    run(Outbox(config, store, clock))
    assert rows(store)["pacs"]["state"] == "delivered"
    [received] = peer.datasets
    assert received.SOPInstanceUID == draft.sr_uid
    assert received == pydicom.dcmread(draft.path)  # every element, text included, is the same


def test_no_accepted_presentation_context_is_a_dead_letter(
    tmp_path: Path, chest: Path, scp: Callable[..., ScriptedSCP], clock: Clock
) -> None:
    peer = scp(sop_class=CTImageStorage)  # a PACS that takes no SR
    config = node_config(tmp_path, dicom("pacs", peer.port))
    store = Store(config.database_path)
    draft = make_sr(tmp_path, chest, "no-sr")
    file_report(store, config, draft, clock())
    run(Outbox(config, store, clock))
    row = rows(store)["pacs"]
    assert (row["state"], row["attempts"]) == ("dead", 1)
    assert "accepted no presentation context" in row["reason"]


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A throw-away certificate and key (its own CA) for a peer on 127.0.0.1, made with the
    openssl command."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    done = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", key, "-out", cert],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, f"openssl could not make a test certificate:\n{done.stderr}"
    return cert, key


def test_tls_sends_only_to_a_pacs_whose_certificate_chains_to_our_cas(
    tmp_path: Path, chest: Path, scp: Callable[..., ScriptedSCP], clock: Clock
) -> None:
    pacs_cert, pacs_key = self_signed(tmp_path, "pacs")
    node_cert, node_key = self_signed(tmp_path, "node")
    stranger_cert, _ = self_signed(tmp_path, "stranger")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pacs_cert, pacs_key)
    server.load_verify_locations(node_cert)
    server.verify_mode = ssl.CERT_REQUIRED  # the PACS wants our certificate too
    peer = scp(tls=server)

    def tls_to(ca: Path) -> dict[str, Any]:
        return {**dicom("pacs", peer.port), "tls": {"certificate": str(node_cert),
                                                    "private_key": str(node_key),
                                                    "ca_certificates": str(ca)}}

    for trusted, state in ((stranger_cert, "pending"), (pacs_cert, "delivered")):
        config = node_config(tmp_path / state, tls_to(trusted))
        store = Store(config.database_path)
        draft = make_sr(tmp_path, chest, f"tls-{state}")
        file_report(store, config, draft, clock())
        run(Outbox(config, store, clock))
        assert rows(store)["pacs"]["state"] == state
    assert peer.received == [draft.sr_uid]  # nothing went to the PACS we could not verify


# --- folder, independence, bookkeeping ---------------------------------------------------------


def test_folder_copy_is_private_and_a_resend_changes_nothing(
    tmp_path: Path, chest: Path, clock: Clock
) -> None:
    out = tmp_path / "share" / "sr"
    config = node_config(tmp_path, {"name": "share", "folder": str(out)})
    store = Store(config.database_path)
    draft = make_sr(tmp_path, chest, "folder")
    file_report(store, config, draft, clock())
    outbox = Outbox(config, store, clock)
    run(outbox)

    copy = out / f"{draft.sr_uid}.dcm"
    assert copy.read_bytes() == draft.path.read_bytes()
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert [p.name for p in out.iterdir()] == [copy.name]  # no temp file left behind
    assert rows(store)["share"]["state"] == "delivered"
    assert store.study(draft.study_uid).state == StudyState.SENT

    # the same SR again (a re-send after a crash): delivered, the copy untouched
    before = copy.stat()
    assert outbox.destinations["share"].send(as_draft(draft)).outcome == "delivered"
    assert copy.stat().st_mtime_ns == before.st_mtime_ns and copy.stat().st_ino == before.st_ino

    # a different file under that name is never overwritten: dead letter, file left as it was
    copy.write_bytes(b"someone else's file")
    delivery = outbox.destinations["share"].send(as_draft(draft))
    assert delivery.outcome == "dead" and "left as it is" in delivery.reason
    assert copy.read_bytes() == b"someone else's file"


def test_a_dead_or_hanging_pacs_does_not_hold_up_another_destination(
    tmp_path: Path, rg1: Path, raw_peer: Callable[..., RawPeer], clock: Clock
) -> None:
    silent = raw_peer()  # takes the connection, never answers: only the timeout ends it
    rejecting = raw_peer(reject=(0x01, 0x01, 0x07))
    out = tmp_path / "share"
    # the hanging peer's timeout is well above what the others need even on a loaded machine
    config = node_config(tmp_path, dicom("hanging", silent.port, timeout=12),
                         dicom("rejecting", rejecting.port), {"name": "share", "folder": str(out)})
    store = Store(config.database_path)
    draft = make_sr(tmp_path, rg1, "independent")
    file_report(store, config, draft, clock())
    outbox = Outbox(config, store, clock)

    started = time.monotonic()
    outbox.step()
    assert wait_for(lambda: rows(store)["share"]["state"] == "delivered", 10)
    assert wait_for(lambda: rows(store)["rejecting"]["state"] == "dead", 10)
    assert rows(store)["hanging"]["state"] == "sending"  # still waiting for its peer
    assert time.monotonic() - started < 10
    assert outbox.wait(timeout=30)
    assert rows(store)["hanging"]["state"] == "pending"
    assert (out / f"{draft.sr_uid}.dcm").is_file()
    study = store.study(draft.study_uid)
    assert study.state == StudyState.FAILED and study.reason.startswith("dispatch to rejecting")


def test_rows_left_sending_by_a_crash_are_sent_again_on_start(
    tmp_path: Path, chest: Path, scp: Callable[..., ScriptedSCP], clock: Clock,
    logs: list[dict[str, Any]],
) -> None:
    peer = scp()
    config = node_config(tmp_path, dicom("pacs", peer.port))
    store = Store(config.database_path)
    draft = make_sr(tmp_path, chest, "crash")
    file_report(store, config, draft, clock())
    # a node died after marking the row 'sending', far in the future of its own backoff
    store.db.execute("UPDATE outbox SET state = 'sending', attempts = 1, next_attempt_at = ?",
                     (clock() + 3600,))
    run(Outbox(config, store, clock))
    row = rows(store)["pacs"]
    assert (row["state"], row["attempts"]) == ("delivered", 2)
    assert peer.received == [draft.sr_uid]
    assert [e["rows"] for e in logs if e["event"] == "outbox.resumed"] == [1]


def test_a_row_whose_bookkeeping_failed_is_sent_again_by_the_running_node(
    tmp_path: Path, chest: Path, scp: Callable[..., ScriptedSCP], clock: Clock,
    logs: list[dict[str, Any]],
) -> None:
    peer = scp()
    config = node_config(tmp_path, dicom("pacs", peer.port))
    store = Store(config.database_path, timeout=0.3)
    other_writer = sqlite3.connect(config.database_path, timeout=5, isolation_level=None,
                                   check_same_thread=False)

    def hold_write_lock() -> None:  # the database stays busy past the outbox's timeout
        other_writer.execute("BEGIN IMMEDIATE")
        threading.Timer(1.0, lambda: other_writer.execute("COMMIT")).start()

    peer.on_store = hold_write_lock
    draft = make_sr(tmp_path, chest, "bookkeeping")
    file_report(store, config, draft, clock())
    outbox = Outbox(config, store, clock)
    run(outbox)
    assert rows(store)["pacs"]["state"] == "sending"
    assert [e["event"] for e in logs if e["event"] == "outbox.lane_error"]
    peer.on_store = None
    assert wait_for(lambda: not other_writer.in_transaction, 5)
    run(outbox)
    row = rows(store)["pacs"]
    assert (row["state"], row["attempts"]) == ("delivered", 2)
    assert peer.received == [draft.sr_uid] * 2
    assert [e["rows"] for e in logs if e["event"] == "outbox.resumed"] == [1]
    other_writer.close()


def test_a_study_that_moved_on_to_a_new_revision_is_left_alone(
    tmp_path: Path, chest: Path, rg1: Path, scp: Callable[..., ScriptedSCP], clock: Clock
) -> None:
    peer = scp()
    config = node_config(tmp_path, dicom("pacs", peer.port))
    store = Store(config.database_path)
    draft = make_sr(tmp_path, chest, "revision")
    file_report(store, config, draft, clock())
    header = pydicom.dcmread(chest, stop_before_pixels=True, force=True)
    late = InstanceRecord(  # a late image of the same study: revision 2, receiving again
        sop_instance_uid=header.SOPInstanceUID + ".2",
        study_uid=draft.study_uid, series_uid=header.SeriesInstanceUID,
        sop_class_uid=header.SOPClassUID, transfer_syntax=ImplicitVRLittleEndian, modality="CR",
        body_part="CHEST", view_position="LL", view="LATERAL", instance_number=2,
        path=str(rg1), size=1, calling_ae="MODALITY1", peer="127.0.0.1",
    )
    store.record_instance(late, same_content=lambda _: False, now=clock())
    run(Outbox(config, store, clock))
    assert rows(store)["pacs"]["state"] == "delivered"
    study = store.study(draft.study_uid)
    assert (study.state, study.revision) == (StudyState.RECEIVING, 2)


def test_outbox_listing_and_logs_carry_no_patient_or_study_identifiers(
    tmp_path: Path, chest: Path, raw_peer: Callable[..., RawPeer], clock: Clock,
    logs: list[dict[str, Any]],
) -> None:
    peer = raw_peer(reject=(0x01, 0x01, 0x07))
    config = node_config(tmp_path, dicom("pacs", peer.port), {"name": "share",
                                                               "folder": str(tmp_path / "out")})
    store = Store(config.database_path)
    draft = make_sr(tmp_path, chest, "privacy")
    file_report(store, config, draft, clock())
    outbox = Outbox(config, store, clock)
    run(outbox)
    requeue(store, all_failed=True, now=clock())
    run(outbox)

    listed = outbox_rows(store, states=["pending", "sending", "delivered", "dead"])
    assert {r.destination: r.state for r in listed} == {"pacs": "dead", "share": "delivered"}
    assert all(isinstance(r, OutboxRow) and len(r.cells(clock())) == len(OutboxRow.COLUMNS)
               for r in listed)
    header = pydicom.dcmread(chest, stop_before_pixels=True, force=True)
    secrets = [draft.sr_uid, draft.study_uid, str(header.PatientName),
               str(header.get("PatientID", "")), str(header.SOPInstanceUID)]
    shown = json.dumps([r.cells(clock()) for r in listed]) + json.dumps(logs, default=str)
    assert {e["event"] for e in logs} >= {"outbox.delivered", "outbox.dead", "outbox.requeued"}
    for secret in filter(None, secrets):
        assert secret not in shown
    assert all(e.get("study") == store.study(draft.study_uid).study_key
               for e in logs if e["event"].startswith("outbox."))
    with pytest.raises(ValueError, match="unknown"):
        outbox_rows(store, states=["lost"])
    with pytest.raises(ValueError, match="either"):
        requeue(store)


# --- Orthanc, a real PACS ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as pacs:
        yield pacs


def to_orthanc(name: str = "pacs", ae_title: str = Orthanc.AE_TITLE) -> dict[str, Any]:
    return dicom(name, Orthanc.DICOM_PORT, ae_title=ae_title)


def content_texts(item: dict[str, Any], code: str) -> list[str]:
    """TextValues of content items named ``code``, from Orthanc's simplified JSON of an SR."""
    found = []
    for child in item.get("ContentSequence", []):
        if child.get("ConceptNameCodeSequence", [{}])[0].get("CodeValue") == code:
            found.append(child.get("TextValue"))
        found += content_texts(child, code)
    return found


def dataset_bytes(data: bytes) -> bytes:
    """A Part-10 file's data set, after its File Meta group (each writer fills that its own way)."""
    meta_length = struct.unpack_from("<I", data, 128 + 4 + 8)[0]  # (0002,0000) UL value
    return data[128 + 4 + 12 + meta_length:]


@pytest.mark.parametrize(
    ("findings", "impression"),
    [
        (None, "No acute cardiopulmonary abnormality."),
        (MULTILINGUAL, "正常 — Φυσιολογικό — طبيعي 👍"),
        (LONG_REPORT, LONG_REPORT[::-1]),
    ],
    ids=["english", "any-script", "long"],
)
def test_sr_is_filed_in_the_image_study_with_flags_and_text_intact(
    tmp_path: Path, rg1: Path, orthanc: Orthanc, clock: Clock, findings: str | None,
    impression: str,
) -> None:
    assert orthanc.store([rg1]) == {str(rg1): "Success"}
    config = node_config(tmp_path, to_orthanc())
    store = Store(config.database_path)
    draft = make_sr(tmp_path, rg1, f"orthanc-{hashlib.sha256(impression.encode()).hexdigest()}",
                    findings=findings, impression=impression)
    if findings == LONG_REPORT:
        assert len(draft.path.read_bytes()) > 20_000
    file_report(store, config, draft, clock())
    run(Outbox(config, store, clock), orthanc.ns)

    assert rows(store)["pacs"]["state"] == "delivered"
    assert store.study(draft.study_uid).state == StudyState.SENT
    [sr_id] = orthanc.find(draft.sr_uid)
    [image_id] = orthanc.find(pydicom.dcmread(rg1, stop_before_pixels=True).SOPInstanceUID)
    assert orthanc.study_uid_of(sr_id) == orthanc.study_uid_of(image_id) == draft.study_uid
    tags = orthanc.tags(sr_id)
    assert (tags["CompletionFlag"], tags["VerificationFlag"], tags["PreliminaryFlag"]) == (
        "PARTIAL", "UNVERIFIED", "PRELIMINARY")
    assert tags["SpecificCharacterSet"] == "ISO_IR 192"
    assert content_texts(tags, "121071") == [draft.findings]
    assert content_texts(tags, "121073") == [draft.impression]
    # the PACS holds the data set exactly as the node wrote it
    stored = orthanc.file(sr_id)
    assert dataset_bytes(stored) == dataset_bytes(draft.path.read_bytes())


@pytest.mark.slow
def test_pacs_down_for_a_while_then_delivered_exactly_once(
    tmp_path: Path, chest: Path, orthanc: Orthanc, clock: Clock
) -> None:
    config = node_config(tmp_path, to_orthanc())
    store = Store(config.database_path)
    draft = make_sr(tmp_path, chest, "pacs-down")
    file_report(store, config, draft, clock())
    outbox = Outbox(config, store, clock)
    before = len(orthanc.instances())
    with orthanc.down():
        for attempt in (1, 2):
            run(outbox, orthanc.ns)
            row = rows(store)["pacs"]
            assert (row["state"], row["attempts"]) == ("pending", attempt)
            assert "no association" in row["reason"]
            clock.advance(BACKOFF * 2 ** attempt)
    run(outbox, orthanc.ns)
    assert rows(store)["pacs"]["state"] == "delivered"
    assert len(orthanc.find(draft.sr_uid)) == 1
    assert len(orthanc.instances()) == before + 1


def test_orthanc_rejecting_our_called_ae_is_dead_until_fixed_and_requeued(
    tmp_path: Path, chest: Path, orthanc: Orthanc, clock: Clock
) -> None:
    wrong = node_config(tmp_path, to_orthanc(ae_title="NOT_ORTHANC"))
    store = Store(wrong.database_path)
    draft = make_sr(tmp_path, chest, "orthanc-wrong-ae")
    file_report(store, wrong, draft, clock())
    outbox = Outbox(wrong, store, clock)
    run(outbox, orthanc.ns)
    clock.advance(3600)
    run(outbox, orthanc.ns)
    row = rows(store)["pacs"]
    assert (row["state"], row["attempts"]) == ("dead", 1)
    assert "permanently" in row["reason"]
    assert orthanc.find(draft.sr_uid) == []
    assert store.study(draft.study_uid).state == StudyState.FAILED

    fixed = node_config(tmp_path, to_orthanc())  # the admin corrects the configuration...
    assert requeue(store, row_id=row["id"], now=clock()) == 1  # ...and re-queues the row
    run(Outbox(fixed, store, clock), orthanc.ns)
    assert rows(store)["pacs"]["state"] == "delivered"
    assert len(orthanc.find(draft.sr_uid)) == 1
    assert store.study(draft.study_uid).state == StudyState.SENT


# --- the real node, killed between the PACS's answer and its own bookkeeping ------------------


class StoreResponseTrap:
    """A TCP proxy to the PACS that, the first time a C-STORE response comes back, calls
    ``on_response`` and drops the response: the PACS has the SR, the sender never hears so.

    The response is the first P-DATA-TF PDU (type 0x04) from the PACS after its A-ASSOCIATE-AC
    (0x02). Later connections pass through untouched. Start it inside the PACS's namespace.
    """

    def __init__(self, upstream_port: int, on_response: Callable[[], None]):
        self.upstream_port = upstream_port
        self.on_response = on_response
        self.sprung = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._watch, args=(server, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _hang_up(source, sink)

    def _watch(self, pacs: socket.socket, node: socket.socket) -> None:
        """Forward the PACS's PDUs one by one, until the first store response."""
        associated = False
        try:
            while header := _recv_exactly(pacs, 6):
                pdu_type, _, length = struct.unpack(">BBI", header)
                body = _recv_exactly(pacs, length)
                if pdu_type == 0x04 and associated and not self.sprung.is_set():
                    self.sprung.set()
                    self.on_response()
                    return
                associated = associated or pdu_type == 0x02
                node.sendall(header + body)
        except OSError:
            pass
        finally:
            _hang_up(node, pacs)

    def close(self) -> None:
        self.listener.close()


def _hang_up(*sockets: socket.socket) -> None:
    """End the connections now: a plain close leaves them open while another thread reads."""
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            if data:
                raise OSError("connection closed inside a PDU")
            return b""
        data += chunk
    return data


@pytest.mark.slow
def test_node_killed_before_its_bookkeeping_leaves_exactly_one_copy_in_the_pacs(
    tmp_path: Path, rg1: Path, orthanc: Orthanc
) -> None:
    node: NodeProcess | None = None

    def kill_node() -> None:
        assert node is not None and node.proc is not None
        os.killpg(node.proc.pid, signal.SIGKILL)

    trap = orthanc.ns.call(StoreResponseTrap, Orthanc.DICOM_PORT, kill_node)
    try:
        config_path = write_config(
            tmp_path, node={"receivers": 1},
            destinations=[dicom("pacs", trap.port, ae_title=Orthanc.AE_TITLE, timeout=10)],
            dispatch={"backoff_initial_seconds": 1},
        )
        config = load_config(config_path)
        store = Store(config.database_path)
        draft = make_sr(tmp_path, rg1, "killed-node")
        file_report(store, config, draft, time.time())
        store.close()

        node = NodeProcess(config_path, netns=orthanc.ns.name).start()
        assert trap.sprung.wait(30), f"no C-STORE reached the PACS:\n{node.log()}"
        node.proc.wait(30)
        assert node.proc.returncode == -signal.SIGKILL
        store = Store(config.database_path)
        assert rows(store)["pacs"]["state"] == "sending"  # the bookkeeping never happened
        assert len(orthanc.find(draft.sr_uid)) == 1  # but the PACS has it

        with NodeProcess(config_path, netns=orthanc.ns.name) as again:
            assert wait_for(lambda: rows(store)["pacs"]["state"] == "delivered", 30), again.log()
            assert again.events("outbox.resumed")
        row = rows(store)["pacs"]
        assert row["attempts"] == 2
        assert len(orthanc.find(draft.sr_uid)) == 1
        assert store.study(draft.study_uid).state == StudyState.SENT
    finally:
        if node is not None:
            node.kill()
        trap.close()


def test_a_pacs_gets_several_srs_at_once_each_exactly_once(
    tmp_path: Path, chest: Path, scp: Callable[..., ScriptedSCP], clock: Clock,
) -> None:
    peer = scp()
    at_once, busiest = [0], [0]
    lock = threading.Lock()

    def slow_store() -> None:  # a PACS that takes its time with each object
        with lock:
            at_once[0] += 1
            busiest[0] = max(busiest[0], at_once[0])
        time.sleep(0.3)
        with lock:
            at_once[0] -= 1

    peer.on_store = slow_store
    config = node_config(tmp_path, {**dicom("pacs", peer.port), "associations": 3})
    store = Store(config.database_path)
    drafts = []
    for i in range(6):
        image = tmp_path / f"image{i}.dcm"
        ds = pydicom.dcmread(chest, force=True)
        ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
        ds.save_as(image)
        drafts.append(make_sr(tmp_path, image, f"parallel-{i}"))
        file_report(store, config, drafts[-1], clock())
    started = time.monotonic()
    run(Outbox(config, store, clock))
    assert busiest[0] == 3
    assert time.monotonic() - started < 6 * 0.3  # not one after the other
    assert sorted(peer.received) == sorted(d.sr_uid for d in drafts)
    assert {r["state"] for r in store.db.execute("SELECT state FROM outbox")} == {"delivered"}
