"""A DICOM upper-layer client (PS3.8) that sends exactly the bytes a test gives it.

pynetdicom and pydicom check what they send; an attacker does not. Tests that need a hostile
value to reach the node (a UID with a NUL byte, a 10 kB UID, a PDU length of 4 GiB) build the
PDUs here, byte by byte.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

from pydicom import config
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.9.7433.1.1"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
RELEASE_RQ, RELEASE_RP, ABORT = 0x05, 0x06, 0x07


def pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBL", kind, 0, len(body)) + body


def item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(calling: str = "MODALITY1", called: str = "CXR_NODE",
                 contexts: list[tuple[str, list[str]]] | None = None,
                 max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing ``contexts`` (abstract syntax, transfer syntaxes)."""
    contexts = contexts or [(CR_IMAGE_STORAGE, [ExplicitVRLittleEndian])]
    body = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
    body += b"\x00" * 32 + item(0x10, APPLICATION_CONTEXT)
    for n, (abstract, syntaxes) in enumerate(contexts):
        sub = item(0x30, abstract.encode()) + b"".join(item(0x40, ts.encode()) for ts in syntaxes)
        body += item(0x20, struct.pack(">BBBB", 2 * n + 1, 0, 0, 0) + sub)
    user = item(0x51, struct.pack(">L", max_pdu)) + item(0x52, IMPLEMENTATION_UID)
    return pdu(ASSOCIATE_RQ, body + item(0x50, user))


def element(group: int, elem: int, value: bytes) -> bytes:
    """One implicit VR little endian element, its value padded to even length with NUL."""
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", group, elem, len(value)) + value


def c_store_rq(sop_class: str | bytes, sop_instance: str | bytes, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1) naming the given UIDs, whatever they hold."""
    raw = [v.encode("latin-1") if isinstance(v, str) else v for v in (sop_class, sop_instance)]
    body = (element(0, 0x0002, raw[0]) + element(0, 0x0100, struct.pack("<H", 0x0001))
            + element(0, 0x0110, struct.pack("<H", message_id))
            + element(0, 0x0700, struct.pack("<H", 0)) + element(0, 0x0800, struct.pack("<H", 0))
            + element(0, 0x1000, raw[1]))
    return element(0, 0x0000, struct.pack("<L", len(body))) + body


def dataset_bytes(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """``ds`` encoded as it goes on the wire, without pydicom checking its values."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    with config.disable_value_validation():
        write_dataset(fp, ds)
    return fp.getvalue()


def parse_command(data: bytes) -> dict[int, bytes]:
    """Implicit VR little endian elements of a command set, by tag."""
    out, pos = {}, 0
    while pos + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHL", data, pos)
        out[group << 16 | elem] = data[pos + 8:pos + 8 + length]
        pos += 8 + length
    return out


@dataclass
class Answer:
    """A C-STORE response, or why there was none."""

    status: int | None
    comment: str = ""
    aborted: bool = False


@dataclass
class RawAssociation:
    """One association driven by hand. ``source`` binds the client to a local address
    (anything in 127.0.0.0/8 is this machine)."""

    port: int
    host: str = "127.0.0.1"
    source: str | None = None
    timeout: float = 30.0
    sock: socket.socket = field(init=False)
    peer_max_pdu: int = field(init=False, default=16384)
    accepted: dict[int, str] = field(init=False, default_factory=dict)
    rejection: tuple[int, int, int] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        if self.source:
            self.sock.bind((self.source, 0))
        self.sock.connect((self.host, self.port))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_pdu(self) -> tuple[int, bytes] | None:
        """The next PDU, or None when the node closed the connection."""
        head = self._read(6)
        if head is None:
            return None
        kind, _, length = struct.unpack(">BBL", head)
        body = self._read(length)
        return None if body is None else (kind, body)

    def _read(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except (ConnectionResetError, TimeoutError):
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def associate(self, rq: bytes | None = None) -> bool:
        """Send an A-ASSOCIATE-RQ; True when accepted (``accepted`` holds the contexts)."""
        self.send(rq or associate_rq())
        answer = self.read_pdu()
        if answer is None:
            return False
        kind, body = answer
        if kind == ASSOCIATE_RJ:
            self.rejection = (body[1], body[2], body[3])
            return False
        if kind != ASSOCIATE_AC:
            return False
        pos = 68
        while pos + 4 <= len(body):
            sub_kind, _, length = struct.unpack_from(">BBH", body, pos)
            value = body[pos + 4:pos + 4 + length]
            if sub_kind == 0x21 and value[2] == 0:  # presentation context accepted
                self.accepted[value[0]] = value[8:].rstrip(b"\x00 ").decode()
            elif sub_kind == 0x50:
                user, upos = value, 0
                while upos + 4 <= len(user):
                    ukind, _, ulen = struct.unpack_from(">BBH", user, upos)
                    if ukind == 0x51:
                        self.peer_max_pdu = struct.unpack_from(">L", user, upos + 4)[0] or 1 << 20
                    upos += 4 + ulen
            pos += 4 + length
        return True

    def p_data(self, context_id: int, control: int, data: bytes) -> None:
        """Send ``data`` as PDVs no larger than the node announced (control bit 2 on the last)."""
        step = max(self.peer_max_pdu - 6, 1)
        chunks = [data[i:i + step] for i in range(0, len(data), step)] or [b""]
        for n, chunk in enumerate(chunks):
            last = 0x02 if n == len(chunks) - 1 else 0
            pdv = struct.pack(">LBB", len(chunk) + 2, context_id, control | last) + chunk
            self.send(pdu(P_DATA_TF, pdv))

    def c_store(self, sop_class: str | bytes, sop_instance: str | bytes, dataset: bytes,
                context_id: int = 1) -> Answer:
        """Send a C-STORE-RQ with ``dataset`` as its data set; the node's answer."""
        try:
            self.p_data(context_id, 0x01, c_store_rq(sop_class, sop_instance))
            self.p_data(context_id, 0x00, dataset)
        except OSError:
            return Answer(None, aborted=True)
        command = b""
        while True:
            answer = self.read_pdu()
            if answer is None or answer[0] != P_DATA_TF:
                return Answer(None, aborted=True)
            body, pos = answer[1], 0
            while pos + 6 <= len(body):
                length, _, control = struct.unpack_from(">LBB", body, pos)
                command += body[pos + 6:pos + 4 + length]
                pos += 4 + length
                if control & 0x03 == 0x03:
                    elements = parse_command(command)
                    status = struct.unpack("<H", elements[0x00000900])[0]
                    comment = elements.get(0x00000902, b"").rstrip(b"\x00 ").decode("latin-1")
                    return Answer(status, comment)

    def release(self) -> None:
        try:
            self.send(pdu(RELEASE_RQ, b"\x00" * 4))
            self.read_pdu()
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
