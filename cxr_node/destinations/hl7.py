"""HL7 v2.5.1 ORU^R01 over MLLP to a RIS or reporting system (``type: hl7``): each draft as a
preliminary result (OBR-25 and OBX-11 ``P``), built from the draft's SR alone.

One message per draft, one connection per message (optionally TLS), one acknowledgment awaited
(original mode: MSH-15/16 empty). What the SR holds goes where a reporting system looks for it:

    MSH   sending/receiving application and facility from the YAML; MSH-7 the SR's content time;
          MSH-10 derived from the SR's SOP Instance UID; MSH-11 processing_id; MSH-12 2.5.1;
          MSH-18 UNICODE UTF-8 (the message is UTF-8, as the SR is)
    PID   PID-3 PatientID ^^^ IssuerOfPatientID; PID-5 PatientName, one repetition per PN group
          (alphabetic, ideographic, phonetic: XPN-8 A/I/P); PID-7 birth date; PID-8 sex
    ORC   ORC-1 RE; ORC-2 placer and ORC-3 filler order number = AccessionNumber
    OBR   OBR-2/3 = AccessionNumber; OBR-4 the SR's document title (18748-4 LN); OBR-7 study date
          and time; OBR-22 the SR's content time; OBR-25 P; no result interpreter: nobody read it
    NTE   the marker: AI PRELIMINARY DRAFT — NOT VERIFIED (DEMO MODEL first where the SR says so)
    OBX   one per SR section, in the SR's order, OBX-2 TX, OBX-3 the section's code, OBX-11 P,
          OBX-14 study time, OBX-18 the model (device observer name and UID), OBX-19 the SR's
          content time: 1 Comment (121106 DCM): the marker, the model, the SR's own notices;
          2 Findings (59776-5 LN); 3 Impressions (19005-8 LN) when the SR has one

Text: each line of a section is one repetition of OBX-5 (in HL7's TX data type the repetition
separator is a hard line break); CR, LF and CR LF all end a line. Every value is escaped (2.7):
``| ^ & ~ \\`` as \\F\\ \\S\\ \\T\\ \\R\\ \\E\\, every other ASCII control character (CR, LF, the
MLLP block bytes 0x0B and 0x1C) as \\Xhh\\, and a value that is exactly ``""`` (HL7's "delete
this value") as \\X2222\\; a value therefore never ends a segment, a field or an MLLP block.
hl7apy serialises text with its own escaping, which knows neither control characters nor \\Xhh\\
(it rewrites \\X0D\\ as \\E\\X0D\\E\\), so the message is written here and hl7apy validates the
exact text sent against the v2.5.1 ORU^R01 structure (groups, required fields, data types,
lengths) before a byte leaves; one that does not validate is dead-lettered with the reason.

A re-send (retry, restart, requeue) is the same message, byte for byte: MSH-10 and MSH-7 come from
the SR, so a receiver that keeps control IDs recognises it. A draft that supersedes an earlier one
(a late image) is a new SR, hence a new ORU with a new MSH-10 and the same placer and filler order
numbers and OBR-4: the receiving system files it as the result of the same order and replaces
the earlier preliminary one (HL7 v2 chapter 7: a result is updated by sending it again for the
same order, OBR-25 saying its status); its Comment OBX says which draft it supersedes.

The acknowledgment, parsed with hl7apy: MSA-1 AA (or CA) delivered; AE (or CE) retried with the
outbox's backoff; AR (or CR) dead-lettered with the reason (MSA-3 and the ERR segments' text,
bounded, printable, the message's own patient and order identifiers blanked out). No ACK within
the timeout, an ACK for another control ID, anything unparseable, a closed connection: retried.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pydicom
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Segment
from hl7apy.parser import parse_message
from pydantic import AfterValidator, Field, model_validator
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from cxr_node.config import ConfigPath, DestinationTLSConfig
from cxr_node.destinations.base import Check, Delivery, DestinationSettings, Draft
from cxr_node.destinations.dicom import describe_certificate
from cxr_node.identity import DEMO_LABEL
from cxr_node.show import DEVICE_OBSERVER_NAME, DEVICE_OBSERVER_UID, printable
from cxr_node.tls import PeerCheckingContext, client_context

VERSION = "2.5.1"
CHARACTER_SET = "UNICODE UTF-8"  # MSH-18, HL7 table 0211
ENCODING = "utf-8"
MARKER = "AI PRELIMINARY DRAFT — NOT VERIFIED"
START, END = b"\x0b", b"\x1c\x0d"  # MLLP: start block; end block and carriage return
MAX_ACK_BYTES = 64 * 1024
MAX_PEER_TEXT = 200  # characters of the receiver's own words kept in a reason
COMMENT = ("121106", "DCM", "Comment")
DEVICE_OBSERVER_SERIAL = ("121016", "DCM")
NAME_REPRESENTATIONS = "AIP"  # PN groups -> XPN-8: alphabetic, ideographic, phonetic
DELIVERED, RETRIED, REFUSED = ("AA", "CA"), ("AE", "CE"), ("AR", "CR")

_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}
_SPECIAL = re.compile(r"[\\|^&~\x00-\x1f\x7f]")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_WORD_EDGE = re.compile(r"[A-Za-z0-9]")
_TIME = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")


def _namespace(value: str) -> str:
    if not re.fullmatch(r"[^|^~\\&\x00-\x1f\x7f]{1,20}", value):
        raise ValueError("an HL7 namespace ID: 1 to 20 characters, none of | ^ ~ \\ & and no "
                         "control character")
    return value


# HD namespace IDs (MSH-3 to MSH-6), as agreed with the receiver's interface team.
Namespace = Annotated[str, AfterValidator(_namespace)]


class Hl7TLSConfig(DestinationTLSConfig):
    """MLLP over TLS: the receiver's certificate must chain to ``ca_certificates`` and carry the
    host's name (or ``server_name``), or match ``pinned_sha256``; a certificate of our own is sent
    only where the receiver asks for one."""

    certificate: ConfigPath | None = Field(  # type: ignore[assignment]
        None, description="this node's certificate chain (PEM), for a receiver that asks for one")
    private_key: ConfigPath | None = Field(  # type: ignore[assignment]
        None, description="its private key (PEM, readable by the node only)")

    @model_validator(mode="after")
    def _receiver_identity(self) -> Hl7TLSConfig:
        if self.ca_certificates is None:
            raise ValueError("ca_certificates: the receiver's certificate must chain to a CA "
                             "bundle you name (the system trust store is not used)")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key: both, or neither")
        return self


class Hl7Destination(DestinationSettings):
    """A RIS or reporting system that takes preliminary results as HL7 v2 ORU^R01 over MLLP."""

    type: Literal["hl7"] = Field("hl7", description="HL7 v2.5.1 ORU^R01 over MLLP")
    host: str = Field(min_length=1, description="the receiver's address (RIS, reporting system "
                                                "or interface engine)")
    port: int = Field(ge=1, le=65535, description="the receiver's MLLP port")
    sending_application: Namespace = Field("CXR_NODE", description="MSH-3, as the receiver "
                                                                    "knows this node")
    sending_facility: Namespace = Field(description="MSH-4, this node's facility")
    receiving_application: Namespace = Field(description="MSH-5, the receiving application")
    receiving_facility: Namespace = Field(description="MSH-6, the receiving facility")
    processing_id: Literal["P", "T", "D"] = Field(
        "P", description="MSH-11: P production, T training (a test system), D debugging")
    timeout_seconds: float = Field(30.0, gt=0, description="for each of: connection, TLS "
                                                           "handshake, sending, the ACK")
    tls: Hl7TLSConfig | None = Field(
        None, description="MLLP over TLS to this receiver: the keys of destinations[].tls, "
                          "ca_certificates required; certificate and private_key only for a "
                          "receiver that asks for a client certificate")
    connections: int = Field(1, ge=1, le=8, description="drafts sent at once, each on its own "
                             "connection (1: one message at a time, as most receivers expect)")

    @property
    def lanes(self) -> int:
        return self.connections

    @property
    def peer(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def server_name(self) -> str:
        """The name (or IP address) the receiver's certificate must carry."""
        return self.tls.server_name if self.tls and self.tls.server_name else self.host


class Hl7Error(ValueError):
    """The SR cannot become a valid ORU; sending it again would not change that."""


# --- the message -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Oru:
    """One ORU^R01 as sent: its text, its control ID (MSA-2 must echo it), and the patient and
    order identifiers it carries, kept out of the reasons a receiver's answer becomes."""

    text: str
    control_id: str
    identifiers: tuple[str, ...]

    @property
    def frame(self) -> bytes:
        return START + self.text.encode(ENCODING) + END


def escape(value: str) -> str:
    """``value`` as HL7 v2 text (2.7): delimiters and every ASCII control character escaped."""
    if value == '""':
        return "\\X2222\\"
    return _SPECIAL.sub(lambda m: _ESCAPES.get(m.group()) or f"\\X{ord(m.group()):02X}\\", value)


def control_id(sr_uid: str) -> str:
    """MSH-10 (ST, at most 20): the same for every send of one SR, different for another SR."""
    return hashlib.sha256(sr_uid.encode()).hexdigest()[:20].upper()


def build_oru(sr: Dataset, destination: Hl7Destination) -> Oru:
    """The draft SR as one validated ORU^R01 v2.5.1; Hl7Error when it cannot be one."""
    patient_id = _text(sr, "PatientID")
    accession = _text(sr, "AccessionNumber")
    name = _joined(sr.get("PatientName"))
    for value, what in ((patient_id, "PatientID (PID-3)"), (name, "PatientName (PID-5)"),
                        (accession, "AccessionNumber (the order number)")):
        if not value:
            raise Hl7Error(f"the draft has no {what}; a RIS cannot file the result without it")
    sections = _sections(sr)
    if not any(code[0] != COMMENT[0] and lines for code, lines in sections):
        raise Hl7Error("the draft SR has no findings text")
    sop_uid = _text(sr, "SOPInstanceUID")
    written = _dtm(_text(sr, "ContentDate"), _text(sr, "ContentTime")) or time.strftime(
        "%Y%m%d%H%M%S")
    observed = _dtm(_text(sr, "StudyDate"), _text(sr, "StudyTime"))
    device = _device_observer(sr)
    equipment = _components(device["name"], "", device["uid"], "ISO" if device["uid"] else "")
    marker = f"{DEMO_LABEL} — {MARKER}" if _says_demo(sr, sections) else MARKER
    model = (f"Model: {device['name'] or 'unnamed'}, version {_first(sr, 'SoftwareVersions')}; "
             f"weights sha256 {device['serial'] or 'unknown'}")
    notices = next((lines for code, lines in sections if code[0] == COMMENT[0]), [])
    observations = [(COMMENT, [marker, model, *notices])]
    observations += [(code, lines) for code, lines in sections if code[0] != COMMENT[0]]
    order = escape(accession)
    ident = control_id(sop_uid)
    segments = [
        _segment("MSH", {2: "^~\\&", 3: escape(destination.sending_application),
                         4: escape(destination.sending_facility),
                         5: escape(destination.receiving_application),
                         6: escape(destination.receiving_facility), 7: written,
                         9: "ORU^R01^ORU_R01", 10: ident, 11: destination.processing_id,
                         12: VERSION, 18: CHARACTER_SET}),
        _segment("PID", {1: "1", 3: _components(patient_id, "", "", _text(sr, "IssuerOfPatientID")),
                         5: _person_name(name), 7: _dtm(_text(sr, "PatientBirthDate")),
                         8: escape(_text(sr, "PatientSex"))}),
        _segment("ORC", {1: "RE", 2: order, 3: order}),
        _segment("OBR", {1: "1", 2: order, 3: order, 4: _coded(_document_title(sr)),
                         7: observed, 22: written, 25: "P"}),
        _segment("NTE", {1: "1", 2: "L", 3: escape(marker)}),
        *(_segment("OBX", {1: str(n), 2: "TX", 3: _coded(code),
                           5: "~".join(escape(line) for line in lines), 11: "P", 14: observed,
                           18: equipment, 19: written})
          for n, (code, lines) in enumerate(observations, 1)),
    ]
    text = "\r".join(segments)
    identifiers = (patient_id, accession, _text(sr, "IssuerOfPatientID"),
                   _text(sr, "PatientBirthDate"), *re.split(r"[\^=\\]", name))
    _validate(text, identifiers)
    return Oru(text, ident, identifiers)


def _validate(text: str, identifiers: Sequence[str]) -> None:
    try:
        parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, force_validation=True)
    except Exception as exc:  # hl7apy raises its own errors, ValueError and more: all say no
        why = redact(f"{type(exc).__name__}: {exc}", identifiers)
        raise Hl7Error(f"the ORU does not validate as HL7 v{VERSION} ORU^R01: {why}") from exc


def _segment(name: str, fields: dict[int, str]) -> str:
    """One segment from its fields by number (MSH-1 is the field separator itself)."""
    numbers = range(2 if name == "MSH" else 1, max(fields) + 1)
    return f"{name}|" + "|".join(fields.get(n, "") for n in numbers)


def _components(*values: str) -> str:
    return "^".join(escape(v) for v in values).rstrip("^")


def _coded(code: tuple[str, str, str]) -> str:
    value, scheme, meaning = code
    return _components(value, meaning, scheme)


def _person_name(name: str) -> str:
    """A DICOM PN as XPN repetitions: family^given^middle^prefix^suffix becomes XPN-1, 2, 3, 5
    and 4, each group its own repetition named by XPN-8. Nothing is changed or dropped."""
    repetitions = []
    for group, representation in zip(name.split("=", 2), NAME_REPRESENTATIONS, strict=False):
        if not group:
            continue
        family, given, middle, prefix, suffix = (group.split("^", 4) + [""] * 4)[:5]
        repetitions.append(_components(family, given, middle, suffix, prefix, "", "",
                                       representation))
    return "~".join(repetitions)


def _dtm(date: str, clock: str = "") -> str:
    """DICOM DA (and TM) as HL7 DTM; empty when the date is not one."""
    if not re.fullmatch(r"\d{8}", date):
        return ""
    found = _TIME.fullmatch(clock.replace(":", ""))
    if not found:
        return date
    hours, minutes, seconds, fraction = found.groups()
    tail = f".{fraction[:4]}" if fraction and seconds else ""
    return date + hours + (minutes or "") + (seconds or "") + tail


# --- what the SR says --------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    return _joined(ds.get(keyword))


def _joined(value: Any) -> str:
    """A value as the text it was: a multi-valued one joined by the backslash it was split at."""
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _first(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if isinstance(value, (MultiValue, list, tuple)):
        return str(value[0]) if value else "unknown"
    return str(value) if value else "unknown"


def _code(item: Dataset) -> tuple[str, str, str]:
    codes = item.get("ConceptNameCodeSequence") or [Dataset()]
    code = codes[0]
    return (str(code.get("CodeValue", "")), str(code.get("CodingSchemeDesignator", "")),
            str(code.get("CodeMeaning", "")))


def _document_title(sr: Dataset) -> tuple[str, str, str]:
    title = _code(sr)
    return title if title[0] else ("18748-4", "LN", "Diagnostic Imaging Report")


def _sections(sr: Dataset) -> list[tuple[tuple[str, str, str], list[str]]]:
    """Each heading of the document (a CONTAINER at the root) with its text, line by line."""
    sections = []
    for item in sr.get("ContentSequence") or []:
        if item.get("ValueType") != "CONTAINER":
            continue
        lines = [line for child in item.get("ContentSequence") or []
                 if child.get("ValueType") == "TEXT"
                 for line in _LINE_BREAK.split(str(child.get("TextValue") or ""))]
        sections.append((_code(item), lines))
    return sections


def _device_observer(sr: Dataset) -> dict[str, str]:
    """The model as the SR names it (TID 1004 at the document's root)."""
    found = {"name": "", "uid": "", "serial": ""}
    keys = {DEVICE_OBSERVER_NAME: "name", DEVICE_OBSERVER_UID: "uid",
            DEVICE_OBSERVER_SERIAL: "serial"}
    for item in sr.get("ContentSequence") or []:
        if item.get("RelationshipType") == "HAS OBS CONTEXT":
            key = keys.get(_code(item)[:2])
            if key:
                found[key] = str(item.get("UID") or item.get("TextValue") or "")
    return found


def _says_demo(sr: Dataset, sections: Iterable[tuple[tuple[str, str, str], list[str]]]) -> bool:
    said = [_text(sr, "CompletionFlagDescription"), _text(sr, "SeriesDescription"),
            *(line for code, lines in sections if code[0] == COMMENT[0] for line in lines)]
    return any(DEMO_LABEL in text for text in said)


# --- the acknowledgment ------------------------------------------------------------------------


def redact(text: str, identifiers: Iterable[str]) -> str:
    """``text`` without the message's own identifiers (a receiver may quote them back); a value
    that begins or ends with a letter or digit is matched as a whole word there."""
    for value in sorted({v for v in identifiers if len(v) >= 2}, key=len, reverse=True):
        for form in {value, escape(value)}:
            pattern = re.escape(form)
            if _WORD_EDGE.match(form[0]):
                pattern = f"(?<![A-Za-z0-9]){pattern}"
            if _WORD_EDGE.match(form[-1]):
                pattern = f"{pattern}(?![A-Za-z0-9])"
            text = re.sub(pattern, "[identifier]", text)
    return text


def acknowledgment(frame: bytes, oru: Oru, peer: str) -> Delivery:
    """What the receiver's answer means for this message (the module docstring's table)."""
    try:
        ack = parse_message(frame.decode(ENCODING), validation_level=VALIDATION_LEVEL.TOLERANT,
                            find_groups=False)
        segments = [s for s in ack.children if isinstance(s, Segment)]
    except Exception as exc:  # anything a parser can raise on hostile bytes: not an ACK
        return Delivery.retry(f"{peer} answered with something that is not an HL7 message "
                              f"({type(exc).__name__})")
    msa = next((s for s in segments if s.name == "MSA"), None)
    if msa is None:
        return Delivery.retry(f"{peer} answered with an HL7 message that is no acknowledgment "
                              "(no MSA segment)")
    code = _field(msa, 1).upper()
    if _field(msa, 2) != oru.control_id:
        return Delivery.retry(f"{peer} acknowledged another message (MSA-2 is not this "
                              "message's control ID)")
    if code in DELIVERED:
        return Delivery.delivered()
    said = redact("; ".join(filter(None, [_field(msa, 3), *_errors(segments)])), oru.identifiers)
    said = printable(said)[:MAX_PEER_TEXT] or "no reason given"
    if code in RETRIED:
        return Delivery.retry(f"{code} (application error) from {peer}: {said}")
    if code in REFUSED:
        return Delivery.dead(f"{code} (application reject) from {peer}: {said}")
    return Delivery.retry(f"{peer} answered MSA-1 {printable(code)[:8]!r}, which is not AA, AE "
                          "or AR")


def _field(segment: Segment, number: int) -> str:
    fields = [c for c in segment.children if c.name == f"{segment.name}_{number}"]
    return fields[0].to_er7() if fields else ""


def _errors(segments: Sequence[Segment]) -> list[str]:
    """The ERR segments' words: HL7 error code and text, diagnostic, user message."""
    return [text for s in segments if s.name == "ERR"
            for text in (_field(s, 3).replace("^", " "), _field(s, 7), _field(s, 8)) if text]


# --- the connection ----------------------------------------------------------------------------


class _NoAnswer(Exception):
    """The connection, the handshake or the exchange failed: worth trying again later."""


class Hl7Sender:
    """ORU^R01 over MLLP: one connection per draft, the message, its acknowledgment."""

    def __init__(self, destination: Hl7Destination, node_ae_title: str = ""):
        self.name = destination.name
        self.destination = destination

    def send(self, draft: Draft) -> Delivery:
        sr = pydicom.dcmread(draft.sr, stop_before_pixels=True)
        try:
            oru = build_oru(sr, self.destination)
        except Hl7Error as exc:
            return Delivery.dead(str(exc))
        try:
            frame = self.exchange(oru.frame)
        except _NoAnswer as exc:
            return Delivery.retry(str(exc))
        return acknowledgment(frame, oru, self.destination.peer)

    def check(self) -> Iterator[Check]:
        started = time.monotonic()
        peer = self.destination.peer
        try:
            sock, tls = self.connect()
        except _NoAnswer as exc:
            yield Check(False, f"MLLP {peer}: FAILED: {exc}")
            return
        sock.close()
        took = f"{(time.monotonic() - started) * 1000:.0f} ms"
        certificate = f"; {describe_certificate(tls.peer_certificate)}" if tls else ""
        yield Check(True, f"MLLP {peer}: connected in {took} (no message sent){certificate}")

    def exchange(self, frame: bytes) -> bytes:
        """Send one MLLP block and return the payload of the block that answers it."""
        timeout = self.destination.timeout_seconds
        peer = self.destination.peer
        sock, _ = self.connect()
        try:
            sock.settimeout(timeout)
            sock.sendall(frame)
            return _read_block(sock, time.monotonic() + timeout, peer)
        except TimeoutError:
            raise _NoAnswer(f"no ACK from {peer} within {timeout:g} s") from None
        except OSError as exc:
            raise _NoAnswer(f"connection to {peer} lost: "
                            f"{exc.strerror or type(exc).__name__}") from None
        finally:
            sock.close()

    def connect(self) -> tuple[socket.socket, PeerCheckingContext | None]:
        """A connection to the receiver (TLS handshake and certificate checks done), with the
        TLS context that tells how the handshake went."""
        d = self.destination
        tls = client_context(d.tls)  # one per connection: it keeps the outcome
        try:
            if tls is None:
                return socket.create_connection((d.host, d.port), timeout=d.timeout_seconds), None
            return self._tls_connection(tls), tls
        except ssl.SSLError as exc:
            why = tls.failure if tls is not None and tls.failure else exc.reason or str(exc)
            raise _NoAnswer(f"TLS: the certificate or handshake of {d.peer} was refused: "
                            f"{why}") from None
        except TimeoutError:
            raise _NoAnswer(f"no connection to {d.peer} within {d.timeout_seconds:g} s") from None
        except OSError as exc:
            raise _NoAnswer(f"no connection to {d.peer}: "
                            f"{exc.strerror or type(exc).__name__}") from None

    def _tls_connection(self, tls: PeerCheckingContext) -> ssl.SSLSocket:
        # Wrapped before it connects: the context's socket class checks a pinned certificate
        # right after the handshake and keeps the reason when the certificate is refused.
        d = self.destination
        last: OSError = OSError(f"{d.host} has no address")
        for family, kind, proto, _, address in socket.getaddrinfo(d.host, d.port,
                                                                  type=socket.SOCK_STREAM):
            sock = tls.wrap_socket(socket.socket(family, kind, proto),
                                   server_hostname=d.server_name)
            sock.settimeout(d.timeout_seconds)
            try:
                sock.connect(address)
                return sock
            except ssl.SSLError:
                sock.close()
                raise
            except OSError as exc:
                sock.close()
                last = exc
        raise last


def _read_block(sock: socket.socket, deadline: float, peer: str) -> bytes:
    """The payload of one MLLP block, read within ``deadline``; at most MAX_ACK_BYTES."""
    received = bytearray()
    while True:
        if received[:1] not in (b"", START):
            raise _NoAnswer(f"{peer} answered with something that is not an MLLP block "
                            f"(first byte 0x{received[0]:02X})")
        end = received.find(END)
        if end >= 0:
            return bytes(received[1:end])
        if len(received) > MAX_ACK_BYTES:
            raise _NoAnswer(f"{peer} answered with more than {MAX_ACK_BYTES} bytes and no end "
                            "of block")
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:  # closed with our message unread: no ACK either
            chunk = b""
        if not chunk:
            raise _NoAnswer(f"{peer} closed the connection without an ACK")
        received += chunk
