"""Feedback: the node measures its drafts against the radiologist's signed reports.

Signed reports are built the way the systems that send them build them: final SRs with highdicom
(VERIFIED, COMPLETE, TID 2000 headings), ORU^R01 messages with hl7apy, sent over real sockets
(dcmtk's storescu to a real node, MLLP to the real listener). Drafts are real draft SRs of the
repository's chest radiographs, filed as the Reporter files them, or drafted by a real node with
the demo model.
"""

from __future__ import annotations

import csv
import json
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
import structlog
from hl7apy.core import Message
from nodeproc import DEMO_MODEL, NodeProcess, free_port, storescu, wait_for, write_config
from prometheus_client import REGISTRY
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from test_dispatch import Clock, Draft, file_report, make_sr
from test_hl7 import PATIENT, image  # noqa: F401 (image: a fixture, the chest with an order)
from test_phi import cli, http

from cxr_node import audit
from cxr_node.audit import read_trail
from cxr_node.config import Config, ConfigError, load_config
from cxr_node.destinations.hl7 import END, START, escape
from cxr_node.feedback import Feedback, Ignored, Pair, SignedReport, sr_text, store_signed
from cxr_node.feedback_hl7 import Hl7Listener, unescape
from cxr_node.logs import study_key
from cxr_node.retention import DAY, Retention
from cxr_node.store import Store

SIGNED_FINDINGS = ("The heart is enlarged. There is a small left pleural effusion. "
                   "Canarytext signed by the radiologist.")
SIGNED_IMPRESSION = "Cardiomegaly with a small left pleural effusion."
DRAFT_FINDINGS = "The heart size is normal. The lungs are clear. No pleural effusion."
DRAFT_IMPRESSION = "No acute cardiopulmonary abnormality."


# --- building the signed reports ---------------------------------------------------------------


def signed_sr(image: Path | Dataset, findings: str = SIGNED_FINDINGS,
              impression: str = SIGNED_IMPRESSION, verified: bool = True,
              manufacturer: str = "Reporting System", headings: bool = True) -> Dataset:
    """A radiologist's report of ``image``'s study as a reporting system files it: a
    Comprehensive SR, TID 2000, VERIFIED and COMPLETE (or not)."""
    source = image if isinstance(image, Dataset) else pydicom.dcmread(
        image, stop_before_pixels=True, force=True)
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport, template_id="2000")
    if headings:
        items = [_section(codes.LN.Findings, codes.DCM.Finding, findings),
                 _section(codes.LN.Impressions, codes.DCM.Impression, impression)]
    else:
        items = [hd.sr.TextContentItem(name=codes.DCM.Finding, value=text,
                                       relationship_type="CONTAINS")
                 for text in (findings, impression)]
    root.ContentSequence = hd.sr.ContentSequence(items)
    signer = {"verifying_observer_name": "Radiologist^Signing",
              "verifying_organization": "Radiology"} if verified else {}
    return hd.sr.ComprehensiveSR(
        evidence=[source], content=root, series_instance_uid=generate_uid(), series_number=77,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=manufacturer,
        is_complete=verified, is_final=verified, is_verified=verified, **signer)


def _section(heading: Any, name: Any, text: str) -> hd.sr.ContainerContentItem:
    section = hd.sr.ContainerContentItem(name=heading, relationship_type="CONTAINS")
    section.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.TextContentItem(name=name, value=text, relationship_type="CONTAINS")])
    return section


def oru(accession: str, patient_id: str, findings: str = SIGNED_FINDINGS,
        impression: str = SIGNED_IMPRESSION, status: str = "F", control: str = "RIS0001") -> bytes:
    """A RIS's final result as one MLLP block, built with hl7apy."""
    message = Message("ORU_R01", version="2.5.1")
    message.msh.msh_3 = "RIS"
    message.msh.msh_4 = "HOSPITAL"
    message.msh.msh_5 = "CXR_NODE"
    message.msh.msh_6 = "HOSPITAL"
    message.msh.msh_7 = "20260101120000"
    message.msh.msh_9 = "ORU^R01^ORU_R01"
    message.msh.msh_10 = control
    message.msh.msh_11 = "P"
    message.msh.msh_18 = "UNICODE UTF-8"
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    patient = result.add_group("ORU_R01_PATIENT")
    patient.pid.pid_3 = f"{patient_id}^^^HOSP-A"
    patient.pid.pid_5 = "Doe^Jane"
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    order.orc.orc_1 = "RE"
    order.orc.orc_2 = accession
    order.orc.orc_3 = accession
    order.obr.obr_1 = "1"
    order.obr.obr_2 = accession
    order.obr.obr_3 = accession
    order.obr.obr_4 = "18748-4^Diagnostic Imaging Report^LN"
    order.obr.obr_25 = status
    for number, (code, meaning, text) in enumerate(
            (("59776-5", "Findings", findings), ("19005-8", "Impressions", impression)), 1):
        observation = order.add_group("ORU_R01_OBSERVATION")
        observation.obx.obx_1 = str(number)
        observation.obx.obx_2 = "TX"
        observation.obx.obx_3 = f"{code}^{meaning}^LN"
        observation.obx.obx_5 = text
        observation.obx.obx_11 = status
    return START + message.to_er7().encode() + END


def exchange(port: int, data: bytes, source: str = "127.0.0.1",
             timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new connection and return all that comes back until it closes or
    an MLLP block has arrived."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(source, 0)) as sock:
        try:
            sock.sendall(data)
        except OSError:
            return b""
        received = b""
        try:
            while END not in received and (chunk := sock.recv(65536)):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return received


def msa(ack: bytes) -> list[str]:
    """The ACK's MSA fields (MSA-1, MSA-2, MSA-3), unescaped."""
    segment = next(s for s in ack.strip(START + END).decode().split("\r") if s.startswith("MSA"))
    return [unescape(f) for f in segment.split("|")[1:4]]


def refused(cause: str) -> float:
    return REGISTRY.get_sample_value("cxr_node_feedback_refused_total", {"cause": cause}) or 0.0


# --- a node's state with a real draft ------------------------------------------------------------


def state(tmp_path: Path, hl7: dict[str, Any] | None = None, **feedback: Any) -> Config:
    """A node's configuration and state folder, with the MLLP listener on a free port."""
    config = Config.model_validate({
        "node": {"state_dir": str(tmp_path / "state")},
        "feedback": {"hl7": {"port": free_port(), "accept": ["127.0.0.1/32"],
                             "timeout_seconds": 2, **(hl7 or {})}, **feedback},
        "retention": {"images_days": 30, "studies_days": 90}})
    audit.open_trail(config.audit_path)
    return config


def drafted(config: Config, store: Store, image: Path, now: float | None = None) -> Draft:
    """A real draft SR of ``image`` filed in the node's state, as the Reporter files it."""
    draft = make_sr(config.reports_dir / "study", image, f"draft-{time.monotonic_ns()}",
                    findings=DRAFT_FINDINGS, impression=DRAFT_IMPRESSION)
    file_report(store, config, draft, time.time() if now is None else now)
    return draft


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[Callable[..., Hl7Listener]]:
    started: list[Hl7Listener] = []

    def start(config: Config) -> Hl7Listener:
        started.append(Hl7Listener(config))
        started[-1].start()
        return started[-1]

    yield start
    for listener in started:
        listener.stop()


def rows(store: Store) -> list[sqlite3.Row]:
    return store.db.execute("SELECT * FROM feedback ORDER BY id").fetchall()


# --- reading and scoring ---------------------------------------------------------------------------


def test_sr_text_takes_the_tid_2000_headings_else_every_text_item(image: Path):
    assert sr_text(signed_sr(image)) == (SIGNED_FINDINGS, SIGNED_IMPRESSION)
    # the older DCM headings (CID 7001 before LOINC) read the same
    older = signed_sr(image)
    for item, code in zip(older.ContentSequence, ("121070", "121072"), strict=True):
        item.ConceptNameCodeSequence[0].CodeValue = code
        item.ConceptNameCodeSequence[0].CodingSchemeDesignator = "DCM"
    assert sr_text(older) == (SIGNED_FINDINGS, SIGNED_IMPRESSION)
    # no headings: all the text, as findings
    assert sr_text(signed_sr(image, headings=False)) == (
        f"{SIGNED_FINDINGS}\n{SIGNED_IMPRESSION}", "")


def test_a_deeply_nested_sr_is_no_report(image: Path):
    ds = signed_sr(image)
    item = ds.ContentSequence[0]
    for _ in range(40):
        inner = Dataset()
        inner.RelationshipType, inner.ValueType = "CONTAINS", "CONTAINER"
        inner.ContentSequence = [item]
        item = inner
    ds.ContentSequence = [item]
    with pytest.raises(Ignored, match="nested deeper than 32 levels"):
        sr_text(ds)


def test_a_pair_is_scored_with_the_evaluation_scorer_and_labeler():
    pair = Pair.scored(f"{SIGNED_FINDINGS}\n{SIGNED_IMPRESSION}",
                       f"{DRAFT_FINDINGS}\n{DRAFT_IMPRESSION}")
    assert pair.labels["signed"]["Pleural Effusion"] == 1
    assert pair.labels["draft"]["Pleural Effusion"] == 0
    assert pair.misses == ["Pleural Effusion", "Cardiomegaly"]
    assert 0 < pair.scores["ROUGE-L"] < 1 and 0 < pair.scores["BLEU-2"] < 1
    assert pair.scores["label F1"] == 0.0
    same = Pair.scored(SIGNED_FINDINGS, SIGNED_FINDINGS)
    assert same.scores["ROUGE-L"] == pytest.approx(1.0) and same.misses == []


def test_hl7_unescape_reverses_the_escaping_of_every_value():
    for value in ("a|b^c&d~e\\f", 'x\r\ny\x0b\x1c', '""', "Müller 肺野 \\X41\\", "\\H\\ \\N\\"):
        assert unescape(escape(value)) == value
    assert unescape("line one\\.br\\line two") == "line one\nline two"
    assert unescape("\\H\\bold\\N\\ and \\Zlocal\\") == "bold and "
    assert unescape("caf\\XC3A9\\") == "café"
    assert unescape("not \\an\\ escape") == "not \\an\\ escape"


# --- pairing -------------------------------------------------------------------------------------


def test_signed_report_before_its_draft_waits_and_is_paired_when_the_draft_comes(
        tmp_path: Path, image: Path, listening: Callable[..., Hl7Listener]):
    config = state(tmp_path)
    store = Store(config.database_path)
    stage = Feedback(config, store)
    listener = listening(config)
    ack = exchange(listener.port, oru(PATIENT["AccessionNumber"], PATIENT["PatientID"]))
    assert msa(ack)[:2] == ["AA", "RIS0001"]
    stage.step()
    assert [r["state"] for r in rows(store)] == ["waiting"]

    draft = drafted(config, store, image)
    stage.step()
    [row] = rows(store)
    assert (row["state"], row["sr_uid"], row["study_uid"]) == (
        "paired", draft.sr_uid, draft.study_uid)
    assert json.loads(row["misses"]) == ["Pleural Effusion", "Cardiomegaly"]
    assert row["findings"] == SIGNED_FINDINGS and row["impression"] == SIGNED_IMPRESSION

    # the same message again is acknowledged and not kept twice
    assert msa(exchange(listener.port, oru(PATIENT["AccessionNumber"],
                                           PATIENT["PatientID"])))[0] == "AA"
    # a correction (status C) supersedes the pair
    exchange(listener.port, oru(PATIENT["AccessionNumber"], PATIENT["PatientID"], status="C",
                                control="RIS0002", impression="Cardiomegaly."))
    stage.step()
    assert [r["state"] for r in rows(store)] == ["superseded", "paired"]


def test_a_preliminary_result_is_acknowledged_and_not_kept(
        tmp_path: Path, listening: Callable[..., Hl7Listener]):
    config = state(tmp_path)
    listener = listening(config)
    answer = msa(exchange(listener.port, oru("ACC-1", "PAT-1", status="P")))
    assert answer[0] == "AA" and "not final" in answer[2]
    assert not rows(Store(config.database_path))


def test_an_order_of_another_patient_is_refused(
        tmp_path: Path, image: Path, listening: Callable[..., Hl7Listener]):
    config = state(tmp_path)
    store = Store(config.database_path)
    drafted(config, store, image)
    Feedback(config, store).step()  # the draft is indexed by its accession number
    listener = listening(config)
    before = refused("mismatch")
    answer = msa(exchange(listener.port, oru(PATIENT["AccessionNumber"], "SOMEONE-ELSE")))
    assert answer[0] == "AR" and "another patient" in answer[2]
    assert PATIENT["AccessionNumber"] not in answer[2]
    assert not rows(store)
    assert refused("mismatch") == before + 1


def test_feedback_import_pairs_by_study_key_uid_or_accession(tmp_path: Path, image: Path,
                                                            cxr_dir: Path):
    config = state(tmp_path)
    store = Store(config.database_path)
    draft = drafted(config, store, image)
    key = study_key(draft.study_uid)
    jsonl = tmp_path / "signed.jsonl"
    jsonl.write_text("\n".join([
        json.dumps({"study": key, "text": f"FINDINGS: {SIGNED_FINDINGS} IMPRESSION: "
                                          f"{SIGNED_IMPRESSION}"}),
        json.dumps({"study": draft.study_uid, "text": "Normal chest."}),
        "not json",
        json.dumps({"study": "x" * 65, "text": "too long an identifier"}),
    ]) + "\n")
    sheet = tmp_path / "signed.csv"
    with sheet.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study", "text"])
        writer.writerow([PATIENT["AccessionNumber"], "Heart size normal, lungs clear."])
    config_file = tmp_path / "cxr-node.yaml"
    config_file.write_text(json.dumps({"node": {"state_dir": str(config.state_dir)}}))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cxr_node", "feedback", *args,
                               "--config", str(config_file)], capture_output=True, text=True,
                              timeout=60)

    done = run("import", str(jsonl))
    assert done.returncode == 1, done.stderr
    assert "2 signed report(s) stored" in done.stdout
    assert ":3: not one JSON object" in done.stderr and ":4: \"study\" must be" in done.stderr
    assert run("import", str(sheet)).returncode == 0
    assert "0 signed report(s) stored, 2 imported before" in run("import", str(jsonl)).stdout

    Feedback(config, store).step()
    paired = rows(store)
    assert [r["state"] for r in paired] == ["superseded", "superseded", "paired"]
    assert {r["sr_uid"] for r in paired} == {draft.sr_uid}
    first = paired[0]
    assert (first["findings"], first["impression"]) == (SIGNED_FINDINGS, SIGNED_IMPRESSION)
    shown = run("status")
    assert shown.returncode == 0 and key in shown.stdout and "paired" in shown.stdout
    assert SIGNED_FINDINGS[:20] not in shown.stdout and draft.study_uid not in shown.stdout
    status = json.loads(run("status", "--json").stdout)
    assert status["rolling"]["pairs"] == 1 and status["recent"][0]["study"] == key


def test_a_report_no_draft_comes_for_is_unpaired_after_wait_days_and_its_text_dropped(
        tmp_path: Path):
    config = state(tmp_path, wait_days=2)
    store = Store(config.database_path)
    clock = Clock()
    stage = Feedback(config, store, clock)
    store_signed(store, SignedReport("import", "alone", SIGNED_FINDINGS, SIGNED_IMPRESSION,
                                     accession="NOWHERE"))
    stage.step()
    assert [r["state"] for r in rows(store)] == ["waiting"]
    clock.advance(2 * DAY + 61)
    stage.step()
    [row] = rows(store)
    assert (row["state"], row["findings"], row["impression"]) == ("unpaired", None, None)
    assert "feedback.wait_days" in row["reason"]
    assert [r for r in read_trail(config.audit_path).records
            if r["event"] == "feedback.unpaired"]


def test_retention_purges_the_pairs_with_their_study_and_orphans_after_studies_days(
        tmp_path: Path, image: Path):
    config = state(tmp_path)
    store = Store(config.database_path)
    now = time.time()
    draft = drafted(config, store, image, now=now - 60 * DAY)  # finished 60 days ago
    with store.transaction() as db:
        db.execute("UPDATE outbox SET state = 'delivered'")
    store_signed(store, SignedReport("import", "one", SIGNED_FINDINGS, "",
                                     study_uid=draft.study_uid))
    store_signed(store, SignedReport("import", "orphan", SIGNED_FINDINGS, "",
                                     accession="NOWHERE"))
    Feedback(config, store).step()
    assert [r["state"] for r in rows(store)] == ["paired", "waiting"]
    retention = Retention(config, store)
    retention.apply(retention.plan(now))  # the study's images go, not its rows
    assert len(rows(store)) == 2
    retention.apply(retention.plan(now + 31 * DAY))  # the study goes, with its pair
    assert [r["state"] for r in rows(store)] == ["waiting"]
    assert not store.db.execute("SELECT * FROM draft_orders").fetchall()
    retention.apply(retention.plan(now + 91 * DAY))  # a report without a study, in its time
    assert not rows(store)
    events = [r["event"] for r in read_trail(config.audit_path).records]
    assert "retention.feedback_purged" in events and "retention.study_purged" in events


def test_feedback_settings_problems_are_named(tmp_path: Path):
    path = tmp_path / "cxr-node.yaml"
    path.write_text("feedback:\n  hl7:\n    port: 2575\n    application: 'A|B'\n"
                    "  wait_days: 0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = "\n".join(caught.value.problems)
    assert f"{path}:2: 'feedback.hl7.accept' is required" in problems
    assert "'feedback.hl7.application' = 'A|B': expected an HL7 namespace ID" in problems
    assert "'feedback.wait_days' = 0" in problems
    path.write_text("feedback:\n  hl7:\n    accept: [everyone]\n")
    with pytest.raises(ConfigError, match="'feedback.hl7.accept' = list: expected networks "
                                          "such as 10.20.0.0/24"):
        load_config(path)
    path.write_text("node: {}\n")
    assert load_config(path).feedback.hl7 is None  # off unless configured


# --- the MLLP listener's defences ------------------------------------------------------------


def test_a_connection_from_an_unknown_network_is_closed_unread(
        tmp_path: Path, listening: Callable[..., Hl7Listener]):
    config = state(tmp_path)
    listener = listening(config)
    before = refused("unknown_network")
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):  # a flood: each counted, one line (and audit record) per 10 s
            assert exchange(listener.port, oru("ACC-1", "PAT-1"), source="127.0.0.2") == b""
    assert refused("unknown_network") == before + 5
    assert [e["cause"] for e in logs if e["event"] == "feedback.refused"] == ["unknown_network"]
    assert not rows(Store(config.database_path))
    assert msa(exchange(listener.port, oru("ACC-1", "PAT-1")))[0] == "AA"  # still serving
    trail = [r for r in read_trail(config.audit_path).records if r["event"] == "feedback.refused"]
    assert [(r["peer"], r["count"]) for r in trail] == [("127.0.0.2", 1)]


def test_a_block_over_the_bound_closes_the_connection_and_the_listener_keeps_serving(
        tmp_path: Path, listening: Callable[..., Hl7Listener]):
    config = state(tmp_path, max_text_characters=200_000)
    listener = listening(config)
    limit = config.feedback.hl7.max_message_kb << 10
    before = refused("frame_too_large")
    huge = oru("ACC-1", "PAT-1", findings="word " * (limit // 4))
    assert exchange(listener.port, huge) == b""
    assert refused("frame_too_large") == before + 1
    # a sender that never ends its block is cut off at the bound, not held in memory
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
        sock.sendall(START)
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(2 * limit // 65536 + 8):
                sock.sendall(b"x" * 65536)
                time.sleep(0.001)
    assert refused("frame_too_large") == before + 2
    assert msa(exchange(listener.port, oru("ACC-1", "PAT-1")))[0] == "AA"


def test_garbage_and_malformed_messages_are_refused_logged_and_counted(
        tmp_path: Path, listening: Callable[..., Hl7Listener]):
    config = state(tmp_path)
    listener = listening(config)
    causes = ("not_mllp", "malformed", "not_a_result", "missing")
    before = {cause: refused(cause) for cause in causes}
    with structlog.testing.capture_logs() as logs:
        assert exchange(listener.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""
        assert msa(exchange(listener.port, START + b"hello" + END))[0] == "AR"
        not_oru = oru("ACC-1", "PAT-1").replace(b"ORU^R01^ORU_R01", b"ADT^A01^ADT_A01")
        assert msa(exchange(listener.port, not_oru))[0] == "AR"
        no_order = oru("", "PAT-1")
        answer = msa(exchange(listener.port, no_order))
        assert answer[0] == "AR" and "order number" in answer[2]
        separators = oru("ACC-1", "PAT-1", findings="HERE").replace(b"HERE", b"a~" * 3000)
        assert msa(exchange(listener.port, separators))[0] == "AR"
        charset = oru("ACC-1", "PAT-1").replace(b"UNICODE UTF-8", b"ISO IR87")
        answer = msa(exchange(listener.port, charset))
        assert answer[0] == "AR" and "character set" in answer[2]
    assert {cause: refused(cause) - before[cause] for cause in causes} == {
        "not_mllp": 1, "malformed": 3, "not_a_result": 1, "missing": 1}
    assert {e["cause"] for e in logs if e["event"] == "feedback.refused"} >= set(causes)
    assert msa(exchange(listener.port, oru("ACC-1", "PAT-1")))[0] == "AA"
    assert len(rows(Store(config.database_path))) == 1


def test_connections_are_limited_and_a_slow_sender_is_cut_off(
        tmp_path: Path, listening: Callable[..., Hl7Listener]):
    config = state(tmp_path, hl7={"max_connections": 2})
    listener = listening(config)
    before = refused("connection_limit"), refused("timeout")
    idle = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(2)]
    try:
        time.sleep(0.3)
        assert exchange(listener.port, oru("ACC-1", "PAT-1")) == b""  # over the limit
        assert refused("connection_limit") == before[0] + 1
        # a block begun and trickled a byte at a time is cut off within the timeout (2 s)
        started = time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for byte in (START + b"MSH|^~\\&|" + b"x" * 40):
                idle[0].sendall(bytes([byte]))
                time.sleep(0.25)
        assert refused("timeout") == before[1] + 1
        assert time.monotonic() - started < 5
    finally:
        for sock in idle:
            sock.close()
    assert wait_for(lambda: msa(exchange(listener.port, oru("ACC-1", "PAT-1")))[0] == "AA", 5)


def test_over_tls_only_a_sender_with_a_certificate_of_the_ca_is_heard(
        tmp_path: Path, listening: Callable[..., Hl7Listener]):
    from test_tls import make_identity

    ca = make_identity(tmp_path, "hospital-ca")
    node, ris = make_identity(tmp_path, "cxr-node", ca), make_identity(tmp_path, "ris", ca)
    stranger = make_identity(tmp_path, "stranger")
    config = state(tmp_path, hl7={"tls": {
        "certificate": node.cert, "private_key": node.key, "ca_certificates": ca.cert,
        "require_client_certificate": True}})
    listener = listening(config)

    def over_tls(identity: Any) -> bytes:
        context = ssl.create_default_context(cafile=ca.cert)
        context.load_cert_chain(identity.cert, identity.key)
        with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(oru("ACC-1", "PAT-1"))
            return sock.recv(65536)

    before = refused("tls_handshake")
    assert msa(over_tls(ris))[0] == "AA"
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        over_tls(stranger)
    assert exchange(listener.port, oru("ACC-1", "PAT-1")) == b""  # plain MLLP on a TLS port
    assert wait_for(lambda: refused("tls_handshake") == before + 2, 5)


# --- end to end: a real node drafts, the PACS and the RIS send the signed report ---------------


def canary_chest(cxr_dir: Path, directory: Path) -> Path:
    """The repository's real chest CR (JPEG 2000, as sent), with identifiers that cannot be
    mistaken for anything else."""
    ds = pydicom.dcmread(cxr_dir / "RG1_J2KI.dcm")
    ds.PatientName, ds.PatientID = "Canaryname^Phiola", "PID-CANARY-7731"
    ds.AccessionNumber, ds.StudyInstanceUID = "ACC7731CANARY", generate_uid()
    path = directory / "chest.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.slow
def test_the_node_pairs_its_draft_with_the_signed_report_and_shows_the_agreement(
        tmp_path: Path, cxr_dir: Path, demo_model: Path):
    from test_status_page import Tables, chromium

    chest = canary_chest(cxr_dir, tmp_path)
    image = pydicom.dcmread(chest, stop_before_pixels=True)
    web, hl7_port = free_port(), free_port()
    config = write_config(
        tmp_path, queue={"local_worker": True}, model={**DEMO_MODEL, "path": str(demo_model)},
        destinations=[{"name": "folder", "folder": str(tmp_path / "out")}],
        http={"enabled": True, "port": web}, logging={"level": "DEBUG", "phi": False},
        feedback={"hl7": {"port": hl7_port, "accept": ["127.0.0.1/32"]}, "max_sr_kb": 16})
    key = study_key(image.StudyInstanceUID)
    with NodeProcess(config) as node:
        assert storescu(node.port, [chest]) == {str(chest): "Success"}
        assert wait_for(lambda: node.states() == ["sent"], 120), node.log()[-3000:]
        [draft] = node.db("SELECT sr_uid, path FROM reports")

        def feedback() -> list[sqlite3.Row]:
            return node.db("SELECT * FROM feedback ORDER BY id")

        # the radiologist's signed SR, sent by the PACS
        signed = signed_sr(image)
        signed.save_as(tmp_path / "signed.dcm", enforce_file_format=True)
        assert set(storescu(node.port, [tmp_path / "signed.dcm"]).values()) == {"Success"}
        assert wait_for(lambda: [r["state"] for r in feedback()] == ["paired"], 30), (
            feedback(), node.log()[-3000:])
        [pair] = feedback()
        assert (pair["source"], pair["sr_uid"]) == ("dicom", draft["sr_uid"])
        assert pair["findings"] == SIGNED_FINDINGS and pair["demo"] == 1

        # our own draft, sent back by the PACS, and an unsigned SR: no revision, no pair
        unsigned = signed_sr(image, verified=False)
        unsigned.save_as(tmp_path / "unsigned.dcm", enforce_file_format=True)
        sent = [Path(draft["path"]), tmp_path / "unsigned.dcm", tmp_path / "signed.dcm"]
        assert set(storescu(node.port, sent).values()) == {"Success"}  # the last: a re-send
        assert wait_for(lambda: len(feedback()) == 3 and feedback()[-1]["state"] != "received"
                        and feedback()[-2]["state"] != "received", 30), feedback()
        echoed, unverified = feedback()[1:]
        assert echoed["state"] == "ignored" and "own draft" in echoed["reason"]
        assert unverified["state"] == "ignored" and "VerificationFlag UNVERIFIED" in unverified["reason"]
        [study] = node.db("SELECT state, revision FROM studies")
        assert (study["state"], study["revision"]) == ("sent", 1)
        assert len(node.db("SELECT * FROM instances")) == 1
        assert not list((node.state_dir / "feedback").rglob("*.dcm"))  # read, then removed
        # an SR over feedback.max_sr_kb is refused before it is read
        huge = signed_sr(image, findings="Normal. " * 3000)
        huge.save_as(tmp_path / "huge.dcm", enforce_file_format=True)
        assert set(storescu(node.port, [tmp_path / "huge.dcm"]).values()) == {
            "Error: CannotUnderstand"}
        assert len(feedback()) == 3

        # the RIS sends the same report as an ORU: it is paired by accession and replaces the pair
        answer = msa(exchange(hl7_port, oru(image.AccessionNumber, image.PatientID)))
        assert answer[:2] == ["AA", "RIS0001"]
        assert wait_for(lambda: [r["state"] for r in feedback()][-1] == "paired", 30)
        assert [r["state"] for r in feedback()] == ["superseded", "ignored", "ignored", "paired"]

        status = json.loads(http(web, "/api/status"))["feedback"]
        assert status["rolling"]["pairs"] == 1
        assert status["rolling"]["ROUGE-L"] == json.loads(feedback()[-1]["scores"])["ROUGE-L"]
        shown = status["recent"][0]
        assert (shown["study"], shown["source"], shown["state"]) == (key, "hl7", "paired")
        assert shown["ROUGE-L"] is not None and shown["demo"] is True
        misses = json.loads(feedback()[-1]["misses"])
        assert shown["significant misses"] == misses and "Pleural Effusion" in misses
        metrics = http(web, "/metrics")
        for line in ('cxr_node_feedback_pairs_total{source="dicom"} 1.0',
                     'cxr_node_feedback_pairs_total{source="hl7"} 1.0',
                     'cxr_node_significant_misses_total{observation="Pleural Effusion"} 2.0',
                     "cxr_node_feedback_window_pairs 1.0",
                     'cxr_node_feedback_signed_reports{state="ignored"} 2.0',
                     'cxr_node_feedback_reports_total{outcome="ignored",source="dicom"} 2.0',
                     'cxr_node_feedback_reports_total{outcome="duplicate",source="dicom"} 1.0'):
            assert line in metrics, line
        assert "cxr_node_feedback_rouge_l " in metrics and "cxr_node_feedback_bleu_2 " in metrics

        page = Tables()
        page.feed(chromium(tmp_path, f"http://127.0.0.1:{web}/", "--dump-dom"))
        table = page.tables["feedback"][1:]
        assert [row[:3] for row in table] == [[key, "hl7", "paired"], [key, "dicom", "ignored"],
                                              [key, "dicom", "ignored"], [key, "dicom", "superseded"]]
        assert table[0][5] != "–" and table[0][8] == ", ".join(misses)

        shown_text = {"log": node.log(), "/api/status": http(web, "/api/status"),
                      "/metrics": metrics, "status": cli(config, "status"),
                      "feedback status": cli(config, "feedback", "status"),
                      "page": chromium(tmp_path, f"http://127.0.0.1:{web}/", "--dump-dom")}
        trail = (node.state_dir / "audit.jsonl").read_text()
    identifiers = {"Canaryname", "PID-CANARY-7731", "ACC7731CANARY", image.StudyInstanceUID,
                   image.SOPInstanceUID, signed.SOPInstanceUID, draft["sr_uid"]}
    text = {"Canarytext", SIGNED_IMPRESSION}
    for where, shown_here in shown_text.items():
        leaked = sorted(v for v in identifiers | text if v in shown_here)
        assert not leaked, f"{where} shows {leaked}"
    assert not [v for v in text | {"Canaryname", "PID-CANARY-7731", "ACC7731CANARY"}
                if v in trail], "the audit trail holds the signed text or patient attributes"
    events = [json.loads(line)["event"] for line in trail.splitlines()]
    assert events.count("feedback.paired") == 2 and events.count("feedback.ignored") == 2
