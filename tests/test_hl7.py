"""HL7 v2.5.1 ORU^R01 over MLLP: drafts reach a reporting system as preliminary results.

The receiver is an MLLP listener on 127.0.0.1, written here: it parses every message with hl7apy
(strict v2.5.1 validation) and answers what a test scripts (AA, AE, AR, garbage, silence, a
closed connection, an ACK for another message), optionally over TLS. Drafts are real SRs of the
repository's chest radiographs, sent through the real outbox.
"""

from __future__ import annotations

import re
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message
from test_dispatch import BACKOFF, Clock, file_report, make_sr, node_config, rows, run
from test_report import worker_result
from test_tls import Identity, make_identity

from cxr_node.config import ConfigError, load_config
from cxr_node.destinations import Draft
from cxr_node.destinations.hl7 import Hl7Sender, control_id
from cxr_node.dispatch import Outbox, requeue
from cxr_node.report import DraftReport, build_draft_sr, write_sr
from cxr_node.send import check_connections
from cxr_node.store import Store, StudyState

STRICT = VALIDATION_LEVEL.STRICT
PATIENT = {"PatientID": "PAT-0042", "IssuerOfPatientID": "HOSP-A", "AccessionNumber": "ACC-7781",
           "PatientName": "Doe^Jane^Q^Dr^III=山田^花子", "PatientBirthDate": "19700102",
           "PatientSex": "F", "StudyDate": "20240305", "StudyTime": "101112.123456"}
FINDINGS = "Heart size normal.\nLungs are clear. 肺野は清明。"
IMPRESSION = "No acute cardiopulmonary abnormality."


# --- the receiver ------------------------------------------------------------------------------


class MllpListener:
    """An HL7 receiver on 127.0.0.1 that answers each message with the next scripted reply.

    A reply is an MSA-1 code ("AA", "AE", "AR", with ``said`` as MSA-3 and ERR-8), or "garbage"
    (bytes that are no MLLP block), "flood" (a block that never ends), "silence" (no answer),
    "close" (hang up), "other-id" (an AA for another control ID). Once the script is used up
    every message gets AA. What arrived is kept: the text, and the message as hl7apy parsed it
    with strict v2.5.1 validation.
    """

    def __init__(self, *script: str, said: str = "", tls: ssl.SSLContext | None = None):
        self.script = list(script)
        self.said = said
        self.tls = tls
        self.texts: list[str] = []
        self.messages: list[Message] = []
        self.problems: list[str] = []
        self.connections = 0
        listener = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                listener.serve(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, conn: Any) -> None:
        self.connections += 1
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.problems.append(f"TLS handshake: {exc}")
                return
        received = b""
        try:
            while data := conn.recv(65536):
                received += data
                while (end := received.find(b"\x1c\r")) >= 0:
                    block, received = received[:end], received[end + 2:]
                    if not self.answer(conn, block):
                        return
        except OSError:  # the sender hung up first (after a flood, a silence)
            pass

    def answer(self, conn: Any, block: bytes) -> bool:
        """Parse one block and answer it; False when the connection is to end."""
        assert block[:1] == b"\x0b", f"not an MLLP block: {block[:20]!r}"
        text = block[1:].decode("utf-8")
        self.texts.append(text)
        try:
            message = parse_message(text, validation_level=STRICT, force_validation=True)
        except Exception as exc:
            self.problems.append(f"{type(exc).__name__}: {exc}")
            return False
        self.messages.append(message)
        reply = self.script.pop(0) if self.script else "AA"
        if reply == "close":
            return False
        if reply == "garbage":
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        elif reply == "flood":
            conn.sendall(b"\x0b" + b"MSA|AA|" * 20_000)
        elif reply != "silence":
            answered = "ANOTHER-MESSAGE" if reply == "other-id" else raw(message.msh.msh_10)
            conn.sendall(ack(answered, "AA" if reply == "other-id" else reply, self.said))
        return True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def ack(control: str, code: str, said: str) -> bytes:
    """An MLLP-framed ACK built with hl7apy, as a reporting system answers."""
    m = Message("ACK", version="2.5.1", validation_level=STRICT)
    m.msh.msh_3, m.msh.msh_4 = "PSCRIBE", "HOSPITAL"
    m.msh.msh_9, m.msh.msh_10, m.msh.msh_11, m.msh.msh_12 = "ACK^R01^ACK", "A1", "P", "2.5.1"
    m.msa.msa_1, m.msa.msa_2 = code, control
    if said:
        m.msa.msa_3 = said
    if code != "AA":
        err = m.add_segment("ERR")
        err.err_3, err.err_4 = "207^Application internal error^HL70357", "E"
        if said:
            err.err_8 = said
    m.validate()
    return b"\x0b" + m.to_er7().encode() + b"\x1c\r"


def unescape(text: str) -> str:
    """HL7 v2.5.1 2.7 escape sequences read back, as a receiver reads them."""
    plain = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}

    def one(found: re.Match[str]) -> str:
        sequence = found.group(1)
        return bytes.fromhex(sequence[1:]).decode() if sequence[0] == "X" else plain[sequence]

    return re.sub(r"\\(F|S|T|R|E|X(?:[0-9A-F]{2})+)\\", one, text)


def raw(element: Any) -> str:
    """The text of an element's first leaf as hl7apy parsed it (escaped as on the wire)."""
    while getattr(element, "children", None):
        element = element.children[0]
    value = element.value
    return str(getattr(value, "value", value) or "")


def read(element: Any) -> str:
    """An element's first leaf as the receiver reads it: unescaped."""
    return unescape(raw(element))


def observations(message: Message) -> list[Any]:
    order = message.oru_r01_patient_result.oru_r01_order_observation
    return [group.obx for group in order.oru_r01_observation]


def lines(obx: Any) -> list[str]:
    """OBX-5's repetitions, the lines of a TX observation."""
    return [read(repetition) for repetition in obx.obx_5]


@pytest.fixture
def listener() -> Iterator[Callable[..., MllpListener]]:
    started: list[MllpListener] = []

    def start(*script: str, **kwargs: Any) -> MllpListener:
        started.append(MllpListener(*script, **kwargs))
        return started[-1]

    yield start
    for each in started:
        each.close()


# --- drafts ------------------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path, cxr_dir: Path) -> Path:
    """The repository's small chest CR with a patient, an issuer and an order, in UTF-8."""
    ds = pydicom.dcmread(cxr_dir / "CR-MONO1-10-chest.dcm", force=True)
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=False)
    return path


def hl7(name: str, port: int, timeout: float = 5, **more: Any) -> dict[str, Any]:
    return {"type": "hl7", "name": name, "host": "127.0.0.1", "port": port,
            "sending_facility": "RADIOLOGY", "receiving_application": "PSCRIBE",
            "receiving_facility": "HOSPITAL", "timeout_seconds": timeout, **more}


def filed(tmp_path: Path, image: Path, tag: str, *destinations: dict[str, Any],
          clock: Clock, **draft: Any) -> tuple[Store, Outbox, Any]:
    """A draft filed for ``destinations`` as the Reporter files it, and the outbox to send it."""
    config = node_config(tmp_path, *destinations)
    store = Store(config.database_path)
    sr = make_sr(tmp_path, image, tag, **{"findings": FINDINGS, "impression": IMPRESSION, **draft})
    file_report(store, config, sr, clock())
    return store, Outbox(config, store, clock), sr


@pytest.fixture
def clock() -> Clock:
    return Clock()


# --- what the receiver gets --------------------------------------------------------------------


def test_one_preliminary_oru_per_draft_with_the_images_identifiers(
    tmp_path: Path, image: Path, listener: Callable[..., MllpListener], clock: Clock,
) -> None:
    ris = listener()
    store, outbox, draft = filed(tmp_path, image, "oru", hl7("ris", ris.port), clock=clock)
    run(outbox)

    assert rows(store)["ris"]["state"] == "delivered"
    assert store.study(draft.study_uid).state == StudyState.SENT
    assert ris.problems == []
    [message] = ris.messages
    msh = message.msh
    assert [raw(msh.msh_9.msg_1), raw(msh.msh_9.msg_2), raw(msh.msh_9.msg_3)] == [
        "ORU", "R01", "ORU_R01"]
    assert (raw(msh.msh_12), raw(msh.msh_18), raw(msh.msh_11)) == ("2.5.1", "UNICODE UTF-8", "P")
    assert [raw(msh.msh_3), raw(msh.msh_4), raw(msh.msh_5), raw(msh.msh_6)] == [
        "CXR_NODE", "RADIOLOGY", "PSCRIBE", "HOSPITAL"]
    assert raw(msh.msh_10) == control_id(draft.sr_uid)

    pid = message.oru_r01_patient_result.oru_r01_patient.pid
    assert (read(pid.pid_3.cx_1), read(pid.pid_3.cx_4)) == ("PAT-0042", "HOSP-A")
    alphabetic, ideographic = pid.pid_5
    assert [read(alphabetic.xpn_1), read(alphabetic.xpn_2), read(alphabetic.xpn_3),
            read(alphabetic.xpn_4), read(alphabetic.xpn_5), read(alphabetic.xpn_8)] == [
        "Doe", "Jane", "Q", "III", "Dr", "A"]  # XPN: suffix before prefix, as HL7 orders them
    assert [read(ideographic.xpn_1), read(ideographic.xpn_2), read(ideographic.xpn_8)] == [
        "山田", "花子", "I"]
    assert (pid.pid_7.to_er7(), raw(pid.pid_8)) == ("19700102", "F")

    order = message.oru_r01_patient_result.oru_r01_order_observation
    assert [read(order.orc.orc_1), read(order.orc.orc_2), read(order.orc.orc_3)] == [
        "RE", "ACC-7781", "ACC-7781"]
    assert (read(order.obr.obr_2), read(order.obr.obr_3)) == ("ACC-7781", "ACC-7781")
    assert (read(order.obr.obr_4.ce_1), read(order.obr.obr_4.ce_3)) == ("18748-4", "LN")
    assert order.obr.obr_7.to_er7() == "20240305101112.1234"
    assert raw(order.obr.obr_25) == "P"
    assert read(order.nte.nte_3) == "AI PRELIMINARY DRAFT — NOT VERIFIED"

    comment, findings, impression = observations(message)
    assert {raw(obx.obx_2) for obx in (comment, findings, impression)} == {"TX"}
    assert {raw(obx.obx_11) for obx in (comment, findings, impression)} == {"P"}
    assert [read(obx.obx_3.ce_1) for obx in (comment, findings, impression)] == [
        "121106", "59776-5", "19005-8"]
    assert lines(findings) == FINDINGS.split("\n")
    assert lines(impression) == [IMPRESSION]
    said = lines(comment)
    assert said[0] == "AI PRELIMINARY DRAFT — NOT VERIFIED"
    assert said[1].startswith("Model: medgemma-4b-it, version 1.0.1; weights sha256 ")
    assert "AI-generated preliminary draft — not reviewed by a radiologist" in said
    assert read(comment.obx_18.ei_1) == "medgemma-4b-it"
    assert ris.connections == 1


def test_a_demo_draft_is_marked_demo_first(
    tmp_path: Path, image: Path, listener: Callable[..., MllpListener], clock: Clock,
) -> None:
    ris = listener()
    config = node_config(tmp_path, hl7("ris", ris.port))
    result = worker_result(model={"demo": True, "name": "cxr-demo"})
    sr = build_draft_sr([image], DraftReport.from_result(result), config.report)
    path = tmp_path / "demo.dcm"
    write_sr(sr, path)
    assert Hl7Sender(config.destinations[0]).send(Draft(sr.SOPInstanceUID, "study",
                                                        {"sr": path})).outcome == "delivered"
    [message] = ris.messages
    marker = "DEMO MODEL — AI PRELIMINARY DRAFT — NOT VERIFIED"
    order = message.oru_r01_patient_result.oru_r01_order_observation
    assert read(order.nte.nte_3) == marker
    comment = observations(message)[0]
    assert lines(comment)[0] == marker
    assert "DEMO MODEL — not a clinical report" in lines(comment)


def test_a_superseding_draft_is_a_new_oru_for_the_same_order(
    tmp_path: Path, image: Path, listener: Callable[..., MllpListener], clock: Clock,
) -> None:
    ris = listener()
    config = node_config(tmp_path, hl7("ris", ris.port))
    sender = Hl7Sender(config.destinations[0])
    first = make_sr(tmp_path, image, "first")
    late = build_draft_sr([image], DraftReport.from_result(worker_result(
        findings="Heart size normal. Small left effusion on the lateral view.")),
        config.report, supersedes=first.path, revision=2)
    write_sr(late, tmp_path / "late.dcm")
    for uid, path in ((first.sr_uid, first.path), (late.SOPInstanceUID, tmp_path / "late.dcm")):
        assert sender.send(Draft(uid, "study", {"sr": path})).outcome == "delivered"

    earlier, newer = ris.messages
    assert raw(newer.msh.msh_10) == control_id(late.SOPInstanceUID) != raw(earlier.msh.msh_10)
    for message in (earlier, newer):
        order = message.oru_r01_patient_result.oru_r01_order_observation
        assert [read(order.orc.orc_2), read(order.orc.orc_3), read(order.obr.obr_2),
                read(order.obr.obr_3), read(order.obr.obr_4.ce_1)] == [
            "ACC-7781", "ACC-7781", "ACC-7781", "ACC-7781", "18748-4"]
    assert lines(observations(newer)[1]) == [
        "Heart size normal. Small left effusion on the lateral view."]
    assert any(f"supersedes the earlier AI draft (revision 1), SOP Instance UID {first.sr_uid}"
               in line for line in lines(observations(newer)[0]))


def test_hostile_values_round_trip_exactly_and_never_break_the_message(
    tmp_path: Path, image: Path, listener: Callable[..., MllpListener], clock: Clock,
) -> None:
    # Values no SR the node builds today would hold (the report stage refuses them), written
    # into one: an SR is a file, and what reaches the receiver must still be what it says.
    family, given = 'O"Brien |~&\r\n\x1c\x0b end', "Jane\x1c"
    text = 'Heart |^~\\& normal.\r\nLungs clear\nline three\r""\rlast: 日本語 \x1c\x0b\x0c end'
    ris = listener()
    store, outbox, draft = filed(tmp_path, image, "hostile", hl7("ris", ris.port), clock=clock)
    sr = pydicom.dcmread(draft.path)
    sr.PatientName = f"{family}\\x^{given}=山田^花子"  # "\\": DICOM reads two values
    sr.PatientID = "PAT|1^2&3~4"
    sr.IssuerOfPatientID = '""'  # on its own, HL7's "delete this value"
    sr.AccessionNumber = "ACC\r\n|1\\2"
    findings = next(item for item in sr.ContentSequence
                    if item.ConceptNameCodeSequence[0].CodeValue == "59776-5")
    findings.ContentSequence[0].TextValue = text
    sr.save_as(draft.path)
    run(outbox)

    assert rows(store)["ris"]["state"] == "delivered"
    assert ris.problems == []
    [message] = ris.messages
    assert len(ris.texts[0].split("\r")) == 8  # MSH PID ORC OBR NTE and three OBX: no more
    pid = message.oru_r01_patient_result.oru_r01_patient.pid
    assert read(pid.pid_3.cx_1) == "PAT|1^2&3~4"
    assert raw(pid.pid_3.cx_4) != '""' and read(pid.pid_3.cx_4) == '""'
    alphabetic, ideographic = pid.pid_5
    assert read(alphabetic.xpn_1) == f"{family}\\x"
    assert read(alphabetic.xpn_2) == given
    assert (read(ideographic.xpn_1), read(ideographic.xpn_2)) == ("山田", "花子")
    order = message.oru_r01_patient_result.oru_r01_order_observation
    assert read(order.orc.orc_2) == read(order.obr.obr_3) == "ACC\r\n|1\\2"
    assert lines(observations(message)[1]) == re.split(r"\r\n|\r|\n", text)


def test_a_draft_without_patient_id_is_a_dead_letter_naming_what_is_missing(
    tmp_path: Path, cxr_dir: Path, listener: Callable[..., MllpListener], clock: Clock,
) -> None:
    ris = listener()
    store, outbox, _ = filed(tmp_path, cxr_dir / "CR-MONO1-10-chest.dcm", "no-id",
                             hl7("ris", ris.port), clock=clock)  # "Anonymized", no ID
    run(outbox)
    row = rows(store)["ris"]
    assert (row["state"], row["attempts"]) == ("dead", 1)
    assert "no PatientID (PID-3)" in row["reason"]
    assert ris.messages == [] and ris.connections == 0


@pytest.mark.filterwarnings("ignore:The value length")  # pydicom's, on writing the value
def test_a_message_that_does_not_validate_is_never_sent(
    tmp_path: Path, image: Path, listener: Callable[..., MllpListener], clock: Clock,
) -> None:
    ris = listener()
    store, outbox, draft = filed(tmp_path, image, "invalid", hl7("ris", ris.port), clock=clock)
    sr = pydicom.dcmread(draft.path)
    sr.AccessionNumber = "ACC-" + "9" * 250  # an EI's ST holds 199
    sr.save_as(draft.path)
    run(outbox)
    row = rows(store)["ris"]
    assert (row["state"], row["attempts"]) == ("dead", 1)
    assert row["reason"].startswith("the ORU does not validate as HL7 v2.5.1 ORU^R01: "
                                    "MaxLengthReached: The value [identifier] exceed")
    assert ris.connections == 0


# --- acknowledgments ---------------------------------------------------------------------------


def test_application_error_is_retried_with_backoff_and_delivered_once(
    tmp_path: Path, image: Path, listener: Callable[..., MllpListener], clock: Clock,
) -> None:
    ris = listener("AE", said="Database busy")
    store, outbox, draft = filed(tmp_path, image, "ae", hl7("ris", ris.port), clock=clock)
    run(outbox)
    row = rows(store)["ris"]
    assert (row["state"], row["attempts"]) == ("pending", 1)
    assert row["reason"].startswith(f"AE (application error) from 127.0.0.1:{ris.port}: ")
    assert "Database busy" in row["reason"]
    assert BACKOFF <= row["next_attempt_at"] - clock() <= BACKOFF * 1.1
    run(outbox)  # not due yet
    assert len(ris.messages) == 1
    clock.advance(BACKOFF * 1.1)
    run(outbox)

    assert rows(store)["ris"]["state"] == "delivered"
    assert store.study(draft.study_uid).state == StudyState.SENT
    assert len(ris.texts) == 2 and ris.texts[0] == ris.texts[1]  # the same message again
    assert ris.problems == []


def test_application_reject_is_a_dead_letter_with_the_reason_and_requeue_sends_it_again(
    tmp_path: Path, image: Path, listener: Callable[..., MllpListener], clock: Clock,
) -> None:
    ris = listener("AR", said="Unknown order ACC-7781 for patient PAT-0042 (Doe, 山田)\x1b[2J")
    with structlog.testing.capture_logs() as logs:
        store, outbox, draft = filed(tmp_path, image, "ar", hl7("ris", ris.port), clock=clock)
        run(outbox)
        clock.advance(3600)
        run(outbox)  # a dead letter is not retried
        row = rows(store)["ris"]
        assert (row["state"], row["attempts"]) == ("dead", 1)
        assert row["reason"].startswith(f"AR (application reject) from 127.0.0.1:{ris.port}: ")
        assert "Unknown order [identifier] for patient [identifier] ([identifier], " \
               "[identifier])" in row["reason"]
        assert "\x1b" not in row["reason"]
        failed = store.study(draft.study_uid)
        assert failed.state == StudyState.FAILED
        assert len(ris.messages) == 1

        assert requeue(store, row_id=row["id"], now=clock()) == 1
        run(outbox)
    assert rows(store)["ris"]["state"] == "delivered"
    assert store.study(draft.study_uid).state == StudyState.SENT
    assert len(ris.messages) == 2
    shown = repr(logs) + repr(dict(row)) + str(failed.reason)
    for identifier in ("ACC-7781", "PAT-0042", "Doe", "山田", "HOSP-A"):
        assert identifier not in shown


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("silence", "no ACK from 127.0.0.1:{port} within 1 s"),
        ("close", "127.0.0.1:{port} closed the connection without an ACK"),
        ("garbage", "127.0.0.1:{port} answered with something that is not an MLLP block "
                    "(first byte 0x48)"),
        ("flood", "127.0.0.1:{port} answered with more than 65536 bytes and no end of block"),
        ("other-id", "127.0.0.1:{port} acknowledged another message"),
    ],
)
def test_no_acknowledgment_of_this_message_is_retried(
    tmp_path: Path, image: Path, listener: Callable[..., MllpListener], clock: Clock,
    answer: str, reason: str,
) -> None:
    ris = listener(answer)
    store, outbox, draft = filed(tmp_path, image, answer, hl7("ris", ris.port, timeout=1),
                                 clock=clock)
    run(outbox)
    row = rows(store)["ris"]
    assert (row["state"], row["attempts"]) == ("pending", 1)
    assert row["reason"].startswith(reason.format(port=ris.port))
    clock.advance(BACKOFF * 1.1)
    run(outbox)
    assert rows(store)["ris"]["state"] == "delivered"
    assert len(ris.messages) == 2


def test_a_receiver_that_is_down_is_retried(
    tmp_path: Path, image: Path, listener: Callable[..., MllpListener], clock: Clock,
) -> None:
    ris = listener()
    port = ris.port
    ris.close()
    store, outbox, _ = filed(tmp_path, image, "down", hl7("ris", port), clock=clock)
    run(outbox)
    row = rows(store)["ris"]
    assert row["state"] == "pending"
    assert row["reason"] == f"no connection to 127.0.0.1:{port}: Connection refused"


# --- TLS and the connection check --------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    d = tmp_path_factory.mktemp("hl7-pki")
    ca = make_identity(d, "hospital-ca")
    return {"ca": ca, "ris": make_identity(d, "ris", ca),
            "elsewhere": make_identity(d, "ris-elsewhere", ca, san="DNS:ris.example.org")}


def receiver_context(identity: Identity) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(identity.cert, identity.key)
    return context


def test_tls_sends_only_to_the_receiver_its_certificate_names(
    tmp_path: Path, image: Path, listener: Callable[..., MllpListener], clock: Clock,
    pki: dict[str, Identity],
) -> None:
    elsewhere = listener(tls=receiver_context(pki["elsewhere"]))  # a CA's certificate, not its
    tls = {"ca_certificates": str(pki["ca"].cert)}
    store, outbox, _ = filed(tmp_path / "wrong", image, "tls-wrong",
                             hl7("ris", elsewhere.port, tls=tls), clock=clock)
    run(outbox)
    row = rows(store)["ris"]
    assert row["state"] == "pending"
    assert "TLS: the certificate or handshake of" in row["reason"]
    assert "mismatch, certificate is not valid for '127.0.0.1'" in row["reason"]
    assert elsewhere.messages == []

    # the same receiver, named as its certificate names it; then one whose certificate names
    # this address: both delivered, without a certificate of ours (none was asked for)
    named = {**tls, "server_name": "ris.example.org"}
    right = listener(tls=receiver_context(pki["ris"]))
    for where, port, settings in (("named", elsewhere.port, named), ("right", right.port, tls)):
        store, outbox, _ = filed(tmp_path / where, image, f"tls-{where}",
                                 hl7("ris", port, tls=settings), clock=clock)
        run(outbox)
        assert rows(store)["ris"]["state"] == "delivered"
    assert len(elsewhere.messages) == len(right.messages) == 1


def test_config_check_connect_proves_the_connection_without_sending(
    tmp_path: Path, listener: Callable[..., MllpListener], pki: dict[str, Identity],
) -> None:
    ris = listener(tls=receiver_context(pki["ris"]))
    down = listener()
    down.close()
    tls = {"ca_certificates": str(pki["ca"].cert)}
    config = node_config(tmp_path, hl7("ris", ris.port, tls=tls), hl7("down", down.port))
    checks = {line.split(":")[0]: (ok, line) for ok, line in check_connections(config)}
    ok, line = checks["destination ris"]
    assert ok, line
    assert f"MLLP 127.0.0.1:{ris.port}: connected in " in line and "(no message sent)" in line
    assert "TLS peer certificate: subject commonName=ris; issuer commonName=hospital-ca" in line
    ok, line = checks["destination down"]
    assert not ok
    assert line.endswith(f"MLLP 127.0.0.1:{down.port}: FAILED: no connection to "
                         f"127.0.0.1:{down.port}: Connection refused")
    assert ris.connections == 1 and ris.texts == [] and ris.problems == []


# --- settings ----------------------------------------------------------------------------------


def test_settings_problems_are_named(tmp_path: Path, pki: dict[str, Identity]) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(
        "destinations:\n"
        "  - {type: hl7, name: a, host: ris, port: 2575, sending_facility: 'X|Y',\n"
        "     receiving_application: PSCRIBE, receiving_facility: H}\n"
        "  - {type: hl7, name: b, host: ris, port: 2575, sending_facility: X,\n"
        "     receiving_application: PSCRIBE, receiving_facility: H,\n"
        "     tls: {minimum_version: TLSv1.3}}\n"
        "  - {type: hl7, name: c, host: ris, port: 2575, sending_facility: X,\n"
        "     receiving_application: PSCRIBE, receiving_facility: H,\n"
        f"     tls: {{ca_certificates: {pki['ca'].cert}, certificate: {pki['ris'].cert}}}}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    problems = "\n".join(err.value.problems)
    assert f"{path}:2: 'destinations[0].sending_facility' = 'X|Y': expected an HL7 namespace " \
           "ID: 1 to 20 characters, none of | ^ ~ \\ & and no control character" in problems
    assert f"{path}:6: 'destinations[1].tls' = dict: expected ca_certificates: the receiver's " \
           "certificate must chain to a CA bundle you name" in problems
    assert f"{path}:9: 'destinations[2].tls' = dict: expected certificate and private_key: " \
           "both, or neither" in problems

