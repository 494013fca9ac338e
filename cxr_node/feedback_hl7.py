"""Signed reports as HL7 v2 ORU^R01 over MLLP: the listener a RIS or interface engine sends to.

Off unless ``feedback.hl7`` is configured. Everything a sender can send is bounded before it costs
anything, as on the DICOM port:

- A connection from outside ``feedback.hl7.accept`` is closed before a byte is read; so is one
  over ``max_connections`` (the sender retries). With ``tls``, the handshake must finish within
  ``timeout_seconds`` (and present a certificate of ``ca_certificates`` where required).
- An MLLP block is at most ``max_message_kb``: more, or bytes that are not a block, close the
  connection; a connection silent for ``timeout_seconds`` is closed, and so is one whose block is
  not complete within that time (a sender cannot hold a thread by trickling bytes).
- A message is read only if it has the standard encoding characters, at most MAX_SEGMENTS
  segments and a bounded number of repetitions and components (hl7apy's parser needs seconds for
  a megabyte of separators), a character set this node reads (MSH-18: UTF-8, ASCII, ISO 8859-1),
  and parses with hl7apy as HL7 v2 of its version. Values are taken from the exact text by the
  encoding characters and unescaped here (hl7apy's to_er7 re-escapes \\Xhh\\ and formatting
  sequences, which would change the text): delimiters, \\Xhh\\ in the message's character set,
  \\.br\\ and \\.sp\\ as line breaks; highlighting, formatting and character-set switches carry no
  text and are dropped.

Each message gets one acknowledgment (original mode): AA when the signed report is kept (or was
received before: same sender and MSH-10), or when it is a result that is not final (OBR-25 other
than F or C; kept no further, with the reason in MSA-3); AR with the reason (MSA-3, ERR-8) when it
is malformed, not an ORU^R01, has no text or nothing to pair it by, or names the order of a draft
of another patient; AE when the node cannot store it now (the sender retries). The reason never
quotes the message. Every refusal is logged (once per 10 s per sender and cause, with a count),
audited and counted (``cxr_node_feedback_refused_total{cause}``).

Pairing keys: the order numbers (OBR-3, OBR-2, ORC-3, ORC-2, first found is the accession
number), PID-3's identifiers, and ZDS-1 (IHE's Study Instance UID) when present. Text: each OBX of
type TX, FT or ST, its repetitions as lines; Findings (59776-5 LN, 121070 DCM) and Impressions or
Conclusions (19005-8 LN, 121072 DCM, 55110-1 LN, 121076 DCM) by OBX-3, else the FINDINGS /
IMPRESSION headings of the text.
"""

from __future__ import annotations

import re
import secrets
import socket
import socketserver
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from cxr_node import audit
from cxr_node.config import Config, FeedbackConfig, FeedbackHl7Config
from cxr_node.destinations.hl7 import END, START, escape
from cxr_node.feedback import (
    FINDINGS,
    IMPRESSIONS,
    Ignored,
    Mismatch,
    SignedReport,
    checked_text,
    draft_of,
    sections_of,
    store_signed,
)
from cxr_node.part10 import uid_problem
from cxr_node.show import printable
from cxr_node.store import Store
from cxr_node.throttle import Throttle
from cxr_node.tls import complete_handshake, server_context

log = structlog.get_logger("cxr_node.feedback_hl7")

ENCODING_CHARACTERS = ("^~\\&", "^~\\&#")  # MSH-2: the standard ones (and 2.7's truncation)
MAX_SEGMENTS = 500
MAX_REPETITIONS = 2000  # '~' in a message
MAX_COMPONENTS = 5000  # '^' and '&' in a message
MAX_ID_CHARS = 64  # an order number or a patient ID
MAX_CONTROL_ID_CHARS = 199
FINAL = ("F", "C")  # OBR-25: final, corrected final
TEXT_TYPES = ("TX", "FT", "ST")
LOCAL_IMPRESSION = "&IMP"  # the impression's OBX-3 in many RIS ("&GDT" is the general text)
CHARACTER_SETS = {"": "utf-8", "UNICODE UTF-8": "utf-8", "ASCII": "ascii", "8859/1": "latin-1"}
RECV_BYTES = 64 << 10
ERRORS = {"malformed": "102^Data type error", "missing": "101^Required field missing",
          "not_a_result": "200^Unsupported message type", "mismatch": "204^Unknown key identifier",
          "unavailable": "207^Application internal error"}  # HL7 table 0357
Cause = Literal["unknown_network", "connection_limit", "tls_handshake", "not_mllp",
                "frame_too_large", "timeout", "malformed", "missing", "not_a_result", "mismatch",
                "unavailable"]

_ESCAPE = re.compile(r"\\(F|S|T|R|E|H|N|X(?:[0-9A-Fa-f]{2})+|\.br|\.sp[+-]?\d*|"
                     r"\.(?:in|ti|sk|ce|fi|nf)[+-]?\d*|Z[^\\|^~&]{0,32}|C[0-9A-Fa-f]{4}|"
                     r"M[0-9A-Fa-f]{4}(?:[0-9A-Fa-f]{2})?)\\")
_SIMPLE = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\", ".br": "\n"}
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class Refused(Exception):
    """A message or connection turned away: the cause (a metric label) and the reason (for the
    log, the audit trail and the AR), which never quotes the message."""

    def __init__(self, cause: Cause, reason: str):
        self.cause = cause
        self.reason = reason
        super().__init__(reason)


def unescape(value: str, charset: str = "utf-8") -> str:
    """HL7 v2 text (2.7) as the characters it stands for; a backslash that starts no escape
    sequence stays as it is."""
    def one(match: re.Match[str]) -> str:
        sequence = match.group(1)
        if sequence in _SIMPLE:
            return _SIMPLE[sequence]
        if sequence[0] == "X":
            return bytes.fromhex(sequence[1:]).decode(charset, errors="replace")
        return "\n" if sequence.startswith(".sp") else ""

    return _ESCAPE.sub(one, value)


@dataclass(frozen=True)
class Segment:
    """One segment's fields as sent (still escaped), numbered as HL7 numbers them."""

    name: str
    fields: list[str]

    @classmethod
    def of(cls, text: str) -> Segment:
        fields = text.split("|")
        if fields[0] == "MSH":  # MSH-1 is the field separator itself
            fields.insert(1, "|")
        return cls(fields[0], fields)

    def raw(self, number: int) -> str:
        return self.fields[number] if number < len(self.fields) else ""

    def values(self, number: int, component: int = 1, charset: str = "utf-8") -> list[str]:
        """One component (its first subcomponent) of each repetition of a field, unescaped."""
        found = []
        for repetition in self.raw(number).split("~"):
            parts = repetition.split("^")
            if component <= len(parts):
                value = unescape(parts[component - 1].split("&")[0], charset).strip()
                if value:
                    found.append(value)
        return found

    def value(self, number: int, component: int = 1, charset: str = "utf-8") -> str:
        return next(iter(self.values(number, component, charset)), "")


@dataclass(frozen=True)
class Oru:
    """A result message as this node reads it: its result status, and the signed report when the
    status is final."""

    status: str
    report: SignedReport | None


@dataclass(frozen=True)
class Envelope:
    """What an acknowledgment needs from the message it answers (MSH-3, 4, 10, 11, 12), as sent."""

    application: str = ""
    facility: str = ""
    control_id: str = ""
    processing_id: str = "P"
    version: str = "2.5.1"

    @property
    def document(self) -> str:
        """The message, as a re-send of it is known: sender and control ID."""
        return f"{self.application}|{self.facility}|{self.control_id}"

    @classmethod
    def of(cls, payload: bytes) -> Envelope:
        """From the MSH segment's bytes, whatever the rest of the message is."""
        first = re.split(rb"[\r\n]", payload, maxsplit=1)[0]
        if not first.startswith(b"MSH|"):
            return cls()
        msh = Segment.of(first.decode("ascii", errors="replace"))

        def field(number: int, default: str = "") -> str:
            value = msh.raw(number)
            return value if 0 < len(value) <= 227 and value.isprintable() else default

        return cls(field(3), field(4), field(10)[:MAX_CONTROL_ID_CHARS], field(11, "P")[:3],
                   field(12, "2.5.1")[:8])


def parse_oru(payload: bytes, settings: FeedbackConfig) -> Oru:
    """The signed report an ORU^R01 carries, or Refused with the reason."""
    envelope = Envelope.of(payload)
    if not any(payload.startswith(b"MSH|" + chars.encode() + b"|") for chars in ENCODING_CHARACTERS):
        raise Refused("malformed", "not an HL7 v2 message with the encoding characters ^~\\& "
                                   "(MSH-1, MSH-2)")
    lines = [line for line in re.split(rb"\r\n|\r|\n", payload) if line.strip()]
    if len(lines) > MAX_SEGMENTS:
        raise Refused("malformed", f"more than {MAX_SEGMENTS} segments")
    if payload.count(b"~") > MAX_REPETITIONS or \
            payload.count(b"^") + payload.count(b"&") > MAX_COMPONENTS:
        raise Refused("malformed", f"more than {MAX_REPETITIONS} repetitions or "
                                   f"{MAX_COMPONENTS} components")
    charset_name = Segment.of(lines[0].decode("ascii", errors="replace")).value(18).upper()
    charset = CHARACTER_SETS.get(charset_name)
    if charset is None:
        raise Refused("malformed", f"MSH-18 names a character set this node does not read "
                                   f"({printable(charset_name)[:24]!r}; UNICODE UTF-8, ASCII or "
                                   "8859/1)")
    try:
        text = [line.decode(charset) for line in lines]
    except UnicodeDecodeError:
        raise Refused("malformed", f"not text in its character set ({charset})") from None
    try:
        parse_message("\r".join(text), validation_level=VALIDATION_LEVEL.TOLERANT,
                      find_groups=False)
    except Exception as exc:  # hl7apy raises its own errors, ValueError and more: all say no
        raise Refused("malformed", f"does not parse as HL7 v2 ({type(exc).__name__})") from None
    segments = [Segment.of(line) for line in text]
    msh = segments[0]
    if (msh.value(9, 1), msh.value(9, 2)) != ("ORU", "R01"):
        raise Refused("not_a_result", "not an ORU^R01 result message (MSH-9)")
    if not envelope.control_id:
        raise Refused("missing", "no message control ID (MSH-10)")
    obr = next((s for s in segments if s.name == "OBR"), None)
    if obr is None:
        raise Refused("missing", "no OBR segment")
    observations = [s for s in segments if s.name == "OBX" and s.value(2) in TEXT_TYPES]
    status = (obr.value(25) or next((s.value(11) for s in observations if s.value(11)), ""))
    status = status[:1].upper()
    if status not in FINAL:
        return Oru(status, None)
    return Oru(status, _report(segments, obr, observations, envelope, charset, settings))


def _report(segments: list[Segment], obr: Segment, observations: list[Segment],
            envelope: Envelope, charset: str, settings: FeedbackConfig) -> SignedReport:
    orc = next((s for s in segments if s.name == "ORC"), Segment("ORC", []))
    pid = next((s for s in segments if s.name == "PID"), Segment("PID", []))
    zds = next((s for s in segments if s.name == "ZDS"), Segment("ZDS", []))
    order = next((v for s, n in ((obr, 3), (obr, 2), (orc, 3), (orc, 2))
                  for v in s.values(n, 1, charset)), None)  # the filler's number first
    patient_ids = tuple(pid.values(3, 1, charset))[:10]
    if any(len(v) > MAX_ID_CHARS or not v.isprintable() for v in (order or "", *patient_ids)):
        raise Refused("malformed", f"an order number or patient ID longer than {MAX_ID_CHARS} "
                                   "characters, or with control characters")
    study_uid = zds.value(1, 1, charset)
    study_uid = study_uid if study_uid and uid_problem(study_uid) is None else None
    if not order and not study_uid:
        raise Refused("missing", "no order number (OBR-3, OBR-2, ORC-3, ORC-2) nor Study "
                                 "Instance UID (ZDS-1) to pair it with a draft")
    sections: dict[str, list[str]] = {"findings": [], "impression": [], "other": []}
    for obx in observations:
        code = (obx.value(3, 1, charset), obx.value(3, 3, charset))
        kind = ("findings" if code in FINDINGS else "impression"
                if code in IMPRESSIONS or code[0] == LOCAL_IMPRESSION else "other")
        lines = [unescape(repetition, charset) for repetition in obx.raw(5).split("~")]
        sections[kind].append(_LINE_BREAK.sub("\n", "\n".join(lines)))
    if sections["findings"] or sections["impression"]:
        findings = "\n".join(sections["findings"] + sections["other"])
        impression = "\n".join(sections["impression"])
    else:
        findings, impression = sections_of("\n".join(sections["other"]))
    if not (findings + impression).strip():
        raise Refused("missing", "no report text (an OBX of type TX, FT or ST)")
    try:
        findings, impression = checked_text(findings, impression, settings)
    except Ignored as exc:
        raise Refused("malformed", str(exc)) from None
    return SignedReport("hl7", envelope.document, findings, impression, study_uid=study_uid,
                        accession=order, patient_ids=patient_ids)


def acknowledgment(code: str, envelope: Envelope, settings: FeedbackHl7Config, said: str = "",
                   cause: Cause | None = None) -> bytes:
    """An ACK (MSA-1 ``code``) for the message ``envelope`` came from, as one MLLP block."""
    msh = "|".join(["MSH", "^~\\&", escape(settings.application), escape(settings.facility),
                    envelope.application, envelope.facility, time.strftime("%Y%m%d%H%M%S"), "",
                    "ACK^R01^ACK", secrets.token_hex(10).upper(), envelope.processing_id,
                    envelope.version])
    segments = [msh, f"MSA|{code}|{envelope.control_id}|{escape(said[:80])}"]
    if cause is not None:
        segments.append(f"ERR|||{ERRORS.get(cause, ERRORS['malformed'])}^HL70357|E||||"
                        f"{escape(said[:250])}")
    return START + "\r".join(segments).encode() + b"\r" + END


class _Frames:
    """MLLP blocks from one connection, each bounded in size and in time."""

    def __init__(self, sock: socket.socket, limit: int, timeout: float):
        self.sock = sock
        self.limit = limit
        self.timeout = timeout
        self.buffer = bytearray()

    def next(self) -> bytes | None:
        """The next block's payload; None when the sender closed or stayed silent (not within a
        block). Refused when the bytes are not MLLP, too many, or too slow."""
        started: float | None = None
        while True:
            while self.buffer[:1] in (b"\r", b"\n"):  # some senders end a block with CR LF
                del self.buffer[:1]
            if self.buffer:
                if self.buffer[:1] != START:
                    raise Refused("not_mllp", f"bytes that are no MLLP block (first byte "
                                              f"0x{self.buffer[0]:02X})")
                end = self.buffer.find(END)
                if end >= 0:
                    payload = bytes(self.buffer[1:end])
                    del self.buffer[:end + len(END)]
                    return payload
                if len(self.buffer) > self.limit + 1:
                    raise Refused("frame_too_large", f"an MLLP block over {self.limit >> 10} KiB "
                                                     "(feedback.hl7.max_message_kb)")
                started = started or time.monotonic()
            left = self.timeout - (time.monotonic() - started if started else 0.0)
            try:
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
                chunk = self.sock.recv(RECV_BYTES)
            except TimeoutError:
                if self.buffer:
                    raise Refused("timeout", f"a message not complete within {self.timeout:g} s "
                                             "(feedback.hl7.timeout_seconds)") from None
                return None
            except OSError:
                return None
            if not chunk:
                return None
            self.buffer += chunk


class Hl7Listener(socketserver.ThreadingTCPServer):
    """The MLLP listener: one thread per connection, at most ``max_connections``."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, config: Config):
        settings = config.feedback.hl7
        assert settings is not None
        self.settings = settings
        self.feedback = config.feedback
        self.address_family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        self.tls = server_context(settings.tls)
        self.store = Store(config.database_path)
        self._slots = threading.BoundedSemaphore(settings.max_connections)
        self._reports = Throttle()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        super().__init__((settings.host, settings.port), socketserver.BaseRequestHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        """Serve on a thread of its own until ``stop``."""
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                         name="feedback-hl7", daemon=True).start()
        log.info("feedback.hl7_listening", host=self.settings.host, port=self.port,
                 tls=self.tls is not None)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        with self._lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # admission: in the accepting thread, before a byte is read or a thread started

    def verify_request(self, request: Any, client_address: Any) -> bool:
        peer = client_address[0]
        if not self.settings.admits(peer):
            self.refuse(peer, Refused("unknown_network", f"{peer} is in no network of "
                                                         "feedback.hl7.accept"))
            return False
        if not self._slots.acquire(blocking=False):
            self.refuse(peer, Refused("connection_limit", f"{self.settings.max_connections} "
                                      "connections open (feedback.hl7.max_connections)"))
            return False
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
            self.store.close()  # this connection thread's database connection

    def finish_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._open.add(request)
        try:
            self.serve_connection(request, client_address[0])
        finally:
            with self._lock:
                self._open.discard(request)

    # one connection

    def serve_connection(self, sock: socket.socket, peer: str) -> None:
        timeout = self.settings.timeout_seconds
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            problem = complete_handshake(sock, timeout)  # type: ignore[arg-type]
            if problem:
                self.refuse(peer, Refused("tls_handshake", problem))
                return
        frames = _Frames(sock, self.settings.max_message_kb << 10, timeout)
        while True:
            try:
                payload = frames.next()
            except Refused as exc:
                self.refuse(peer, exc)
                return
            if payload is None:
                return
            try:
                sock.settimeout(timeout)
                sock.sendall(self.answer(payload, peer))
            except OSError:
                return

    def answer(self, payload: bytes, peer: str) -> bytes:
        """The acknowledgment of one message, after keeping what it carries."""
        envelope = Envelope.of(payload)
        try:
            oru = parse_oru(payload, self.feedback)
            report = oru.report
            if report is None:
                return self._not_final(oru.status, envelope, peer)
            # refused now, while the sender can still be told, if its order is another patient's
            draft_of(self.store.db, report.study_uid, report.accession, report.patient_ids)
            outcome, _ = store_signed(self.store, report, peer=peer)
        except Refused as exc:
            self.refuse(peer, exc)
            return acknowledgment("AR", envelope, self.settings, exc.reason, exc.cause)
        except Mismatch as exc:
            self.refuse(peer, Refused("mismatch", str(exc)))
            return acknowledgment("AR", envelope, self.settings, str(exc), "mismatch")
        except sqlite3.Error as exc:
            refusal = Refused("unavailable", f"cannot store it now ({type(exc).__name__}); "
                                             "send it again later")
            self.refuse(peer, refusal)
            return acknowledgment("AE", envelope, self.settings, refusal.reason, "unavailable")
        return acknowledgment("AA", envelope, self.settings,
                              "received before" if outcome == "duplicate" else "")

    def _not_final(self, status: str, envelope: Envelope, peer: str) -> bytes:
        reason = (f"result status {printable(status) or '(none)'!r} is not final (F or C): not a "
                  "signed report")
        log.info("feedback.ignored", source="hl7", peer=peer, reason=reason)
        audit.feedback_received("hl7", "ignored", None, None, document=envelope.document,
                                reason=reason, peer=peer)
        return acknowledgment("AA", envelope, self.settings, f"not kept: {reason}")

    def refuse(self, peer: str, refusal: Refused) -> None:
        """Log (throttled), audit and count a connection or message turned away."""
        repeated = self._reports.due((peer, refusal.cause))
        if repeated:
            log.warning("feedback.refused", source="hl7", peer=peer, cause=refusal.cause,
                        reason=refusal.reason, count=repeated)
        audit.feedback_refused(peer, refusal.cause, refusal.reason, record_now=repeated)
