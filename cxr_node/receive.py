"""Receive: the DICOM Storage SCP (C-STORE, C-ECHO) that modalities and the PACS send to.

Nothing acknowledged is ever lost: an instance is written to a temp file, fsynced, renamed into the
spool, its directory fsynced and its row committed before the node answers 0x0000. Access is checked
on the calling AE title *and* the peer's address (pynetdicom checks only titles). Bad input gets a
precise status and never disturbs other associations: garbage is quarantined with its reason, a full
disk answers 0xA700 so the modality retries later.

Several receiver processes can share the port (SO_REUSEPORT): one pynetdicom process is bound by the
GIL, and modalities send concurrently.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import secrets
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from cxr_node import audit
from cxr_node.config import Config
from cxr_node.durable import free_mb, move_durably, private_dir, write_atomic
from cxr_node.imaging import view_of
from cxr_node.logs import study_key
from cxr_node.store import InstanceRecord, Store
from cxr_node.tls import complete_handshake

log = structlog.get_logger("cxr_node.receive")

STORAGE_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
]

# C-STORE statuses (PS3.4 Annex B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
PIXEL_DATA = 0x7FE00010
ITEM, SEQ_DELIMITER = 0xFFFEE000, 0xFFFEE0DD


class Rejected(Exception):
    """A dataset the node will not store; carries the C-STORE failure status to answer."""

    def __init__(self, status: int, reason: str):
        self.status = status
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Header:
    """The few attributes the node needs from an incoming dataset, checked for completeness."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    body_part: str
    view_position: str
    view: str
    instance_number: int | None

    @classmethod
    def parse(cls, path: Path, sop_class: str, sop_instance: str) -> Header:
        """Read the header of a received Part-10 file, and check that its Pixel Data is complete.

        Only the header is read: the Pixel Data is checked from its element header and the
        file's size.
        """
        try:
            with path.open("rb") as fh:
                ds = dcmread(fh, stop_before_pixels=True)
                at, size = fh.tell(), os.fstat(fh.fileno()).st_size
                ts = ds.file_meta.TransferSyntaxUID
                missing = [k for k in REQUIRED_UIDS if not str(ds.get(k, "")).strip()]
                if missing:
                    raise Rejected(CANNOT_UNDERSTAND, f"missing {', '.join(missing)}")
                if ds.SOPInstanceUID != sop_instance or ds.SOPClassUID != sop_class:
                    raise Rejected(
                        DATASET_MISMATCH, "SOP Class/Instance UID differ from the C-STORE request"
                    )
                if ts == DeflatedExplicitVRLittleEndian:
                    problem = _inflated_pixel_data_problem(path)
                else:
                    problem = _pixel_data_problem(fh, at, size, ds, ts)
                if problem:
                    raise Rejected(CANNOT_UNDERSTAND, problem)
            number = ds.get("InstanceNumber")
            return cls(
                study_uid=str(ds.StudyInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                modality=str(ds.get("Modality", "") or "").upper(),
                body_part=str(ds.get("BodyPartExamined", "") or "").strip().upper(),
                view_position=str(ds.get("ViewPosition", "") or "").strip().upper(),
                view=str(view_of(ds).value),
                instance_number=int(number) if number not in (None, "") else None,
            )
        except Rejected:
            raise
        except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, struct.error,
                OSError, AttributeError, NotImplementedError, zlib.error) as exc:
            raise Rejected(CANNOT_UNDERSTAND, f"unreadable dataset: {type(exc).__name__}") from exc


def dataset_span(fh: BinaryIO) -> tuple[int, int]:
    """Where the dataset starts in a Part-10 file (after preamble, "DICM" and the File Meta
    group, whose first element gives its length) and how many bytes it has."""
    fh.seek(0)
    head = fh.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        raise ValueError("not a Part-10 file with a File Meta group length")
    (group_length,) = struct.unpack_from("<I", head, 140)
    offset = 144 + group_length
    return offset, os.fstat(fh.fileno()).st_size - offset


def same_dataset(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    """Whether two Part-10 files hold the same dataset bytes (their File Meta may differ)."""
    try:
        with a.open("rb") as fa, b.open("rb") as fb:
            (start_a, size_a), (start_b, size_b) = dataset_span(fa), dataset_span(fb)
            if size_a != size_b:
                return False
            fa.seek(start_a)
            fb.seek(start_b)
            while block := fa.read(chunk):
                if block != fb.read(chunk):
                    return False
            return True
    except (OSError, ValueError):
        return False  # a copy that cannot be read is not the same


def _inflated_pixel_data_problem(path: Path) -> str | None:
    """The deflated syntax hides the element layout: inflate the whole dataset and compare."""
    ds = dcmread(path)
    if "PixelData" not in ds:
        return "no Pixel Data" if "Rows" in ds else None
    needed = _native_length(ds)
    if needed and len(ds.PixelData) < needed:
        return f"Pixel Data has {len(ds.PixelData)} bytes, the image needs {needed}"
    return None


def _pixel_data_problem(fh: BinaryIO, at: int, size: int, ds: Dataset, ts: UID) -> str | None:
    """Why the Pixel Data is incomplete, or None. pydicom parses a cut file without complaint.

    ``at`` is where pydicom stopped (the first pixel-like tag), ``size`` the file's length.
    """
    if at >= size:
        return "no Pixel Data" if "Rows" in ds else None
    fh.seek(at)
    head = fh.read(12)
    tag_group, tag_elem = struct.unpack_from("<HH", head)
    if (tag_group << 16 | tag_elem) != PIXEL_DATA:
        return None  # stopped at a pixel-like tag other than Pixel Data (float/double data)
    if ts.is_implicit_VR:
        (length,), header = struct.unpack_from("<I", head, 4), 8
    else:
        (length,), header = struct.unpack_from("<I", head, 8), 12
    start = at + header
    if length != 0xFFFFFFFF:
        needed = _native_length(ds)
        if start + length > size:
            return f"Pixel Data truncated: {size - start} of {length} bytes"
        if needed and length < needed:
            return f"Pixel Data has {length} bytes, the image needs {needed}"
        return None
    pos = start
    while pos + 8 <= size:
        fh.seek(pos)
        group, elem, item_len = struct.unpack("<HHI", fh.read(8))
        tag = group << 16 | elem
        if tag == SEQ_DELIMITER:
            return None
        if tag != ITEM:
            return f"encapsulated Pixel Data has an unexpected tag at byte {pos}"
        pos += 8 + item_len
    return "encapsulated Pixel Data truncated (no sequence delimiter)"


def _native_length(ds: Dataset) -> int:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated)
        return ds.Rows * ds.Columns * int(ds.get("SamplesPerPixel", 1)) * frames * bits // 8
    except (AttributeError, TypeError, ValueError):
        return 0


class Spool:
    """Where received files live: one folder per study, plus a quarantine for what was refused.

    pynetdicom streams each incoming dataset, as it arrives, into a Part-10 file in ``incoming``
    (on the spool's file system); a kept instance is then only fsynced and renamed into place,
    never copied.
    """

    def __init__(self, root: Path, quarantine: Path, fsync: bool = True):
        self.root = private_dir(root)
        self.incoming = private_dir(root / ".incoming")
        self.quarantine_dir = private_dir(quarantine)
        self.fsync = fsync

    def remove_partial_files(self) -> int:
        """Transfers cut by a crash; their instances were never acknowledged."""
        partial = [*self.root.rglob(".tmp-*"), *self.incoming.iterdir()]
        for path in partial:
            path.unlink(missing_ok=True)
        return len(partial)

    def remove_abandoned(self, idle_seconds: float) -> int:
        """Incoming files nobody has written to for ``idle_seconds``: transfers that were cut."""
        cutoff = time.time() - idle_seconds
        removed = 0
        for path in self.incoming.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # finished (moved) or removed by another receiver meanwhile
        return removed

    def path_for(self, header: Header) -> Path:
        """A new name for each copy: two copies with one SOP Instance UID can both be kept."""
        name = f"{header.sop_instance_uid}.{secrets.token_hex(6)}.dcm"
        return self.root / study_key(header.study_uid) / name

    def keep(self, received: Path, path: Path) -> None:
        """Make the received file durable under its spool name."""
        move_durably(received, path, fsync=self.fsync)

    def quarantine(self, received: Path, reason: str, context: dict[str, Any]) -> Path:
        """Keep refused bytes with the reason, for IT to inspect; never silently dropped."""
        with received.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        path = self.quarantine_dir / f"{time.strftime('%Y%m%d')}-{digest[:16]}.dcm"
        move_durably(received, path, fsync=self.fsync)
        note = {"reason": reason, "received_at": time.time(), **context}
        write_atomic(path.with_suffix(".json"), json.dumps(note, indent=1).encode(), self.fsync)
        return path


class Admission:
    """The node-wide limit on concurrent associations (``node.max_associations``), shared by the
    receiver processes.

    The kernel hands each connection to one of the processes on the port by a hash, not by load:
    a limit per process would turn a modality away while another process had room.
    """

    def __init__(self, limit: int, counts: Any, index: int):
        """``counts``: a ``multiprocessing.Array`` with one slot per receiver process."""
        self.limit = limit
        self.counts = counts
        self.index = index
        self._mine: set[int] = set()
        with self.counts.get_lock():
            self.counts[index] = 0  # a restarted receiver process holds none

    def enter(self, assoc: Any) -> bool:
        with self.counts.get_lock():
            if sum(self.counts[:]) >= self.limit:
                return False
            self.counts[self.index] += 1
        self._mine.add(id(assoc))
        return True

    def leave(self, assoc: Any) -> None:
        """Called when the association's thread ends, however it ended."""
        if id(assoc) in self._mine:
            self._mine.discard(id(assoc))
            with self.counts.get_lock():
                self.counts[self.index] -= 1


class StorageSCP:
    """The C-STORE/C-ECHO service: small event handlers that each do one thing."""

    def __init__(self, config: Config, store: Store, admission: Admission,
                 on_stored: Callable[[], None] = lambda: None):
        self.config = config
        self.store = store
        self.admission = admission
        self.on_stored = on_stored  # tells the assemble stage, in the node process, to look
        self.spool = Spool(config.spool_dir, config.quarantine_dir, fsync=config.node.fsync)
        self.min_free_mb = config.node.min_free_disk_mb

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
            (evt.EVT_C_STORE, self.on_c_store),
            (evt.EVT_C_ECHO, self.on_c_echo),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_RELEASED, self.on_ended),
            (evt.EVT_ABORTED, self.on_ended),
        ]

    # --- association ---------------------------------------------------------------------------

    def on_requested(self, event: evt.Event) -> None:
        """Reject a calling AE title / address pair no accept rule allows (PS3.8 A-ASSOCIATE-RJ),
        and, for a while, an association over the node's limit (transient: "local limit")."""
        rq = event.assoc.requestor
        calling, called = _title(rq.primitive.calling_ae_title), _title(rq.primitive.called_ae_title)
        address = rq.address
        if called != self.config.node.ae_title:
            reason, rejection = f"called AE title {called!r} is not {self.config.node.ae_title!r}", (
                0x01, 0x01, 0x07)
        elif not any(rule.allows(calling, address) for rule in self.config.accept):
            reason, rejection = f"no accept rule allows AE {calling!r} from {address}", (
                0x01, 0x01, 0x03)
        elif not self.admission.enter(event.assoc):
            reason, rejection = (f"node busy: {self.admission.limit} associations open "
                                 "(node.max_associations)"), (0x02, 0x03, 0x02)
        else:
            return
        log.warning("association.rejected", calling_ae=calling, peer=address, reason=reason)
        audit.association_rejected(calling, address, reason, rejection[2])
        event.assoc.acse.send_reject(*rejection)
        event.assoc.kill()  # waits until the DUL has sent the A-ASSOCIATE-RJ, as pynetdicom does

    def on_conn_close(self, event: evt.Event) -> None:
        """End the acceptor thread of a connection that closed before negotiating.

        Port scanners and health checks open and close the port; pynetdicom would otherwise keep
        their association slot until the ACSE timeout and lock real modalities out.
        """
        assoc = event.assoc
        if not assoc.is_established and assoc.requestor.primitive is None:
            assoc.dul.to_user_queue.put(None)

    def on_established(self, event: evt.Event) -> None:
        rq = event.assoc.requestor
        log.info("association.accepted", calling_ae=rq.ae_title, peer=rq.address)
        audit.association_accepted(rq.ae_title, rq.address)

    def on_ended(self, event: evt.Event) -> None:
        rq = event.assoc.requestor
        log.info("association.ended", calling_ae=rq.ae_title, peer=rq.address,
                 how=event.event.name.removeprefix("EVT_").lower())
        # An aborted transfer leaves its partial file behind; once no association could still be
        # writing it (the network timeout would have ended that one), it goes.
        removed = self.spool.remove_abandoned(self.config.node.network_timeout_seconds + 60)
        if removed:
            log.warning("spool.partial_files_removed", count=removed)

    # --- services ------------------------------------------------------------------------------

    def on_c_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def on_c_store(self, event: evt.Event) -> int | Dataset:
        """Store durably, index, and only then say success."""
        rq = event.assoc.requestor
        context = {"calling_ae": rq.ae_title, "peer": rq.address}
        if free_mb(self.spool.root) < self.min_free_mb:
            log.error("instance.refused", reason="free disk below node.min_free_disk_mb", **context)
            audit.instance_refused("refused", OUT_OF_RESOURCES, event.request,
                                   "free disk below node.min_free_disk_mb", **context)
            return _status(OUT_OF_RESOURCES, "Node disk full; retry later")
        received = event.dataset_path  # pynetdicom removes it after we answer, unless moved
        try:
            header = Header.parse(
                received, event.request.AffectedSOPClassUID, event.request.AffectedSOPInstanceUID,
            )
        except Rejected as exc:
            where = self.spool.quarantine(received, exc.reason, context)
            log.warning("instance.quarantined", reason=exc.reason, file=where.name,
                        status=f"0x{exc.status:04X}", **context)
            audit.instance_refused("quarantined", exc.status, event.request, exc.reason, **context)
            return _status(exc.status, exc.reason)
        try:
            return self._keep(header, received, event.context.transfer_syntax, context)
        except OSError as exc:
            log.error("instance.refused", reason=f"cannot store: {exc.strerror}", **context)
            audit.instance_refused("refused", OUT_OF_RESOURCES, event.request,
                                   f"cannot store: {exc.strerror}", **context)
            return _status(OUT_OF_RESOURCES, "Node cannot store now; retry later")

    def _keep(self, header: Header, received: Path, ts: str, context: dict[str, str]) -> int:
        """Index the instance unless an identical copy is already kept.

        Content is compared only with the stored copies of the same SOP Instance UID (a re-send),
        never hashed: on the common path the received file is renamed into place untouched.
        """
        key = study_key(header.study_uid)
        copies = self.store.copies_of(header.sop_instance_uid)
        if any(same_dataset(received, path) for path in copies.values()):
            return self._duplicate(header, key, context)
        path = self.spool.path_for(header)
        with received.open("rb") as fh:
            _, size = dataset_span(fh)
        self.spool.keep(received, path)
        recorded = self.store.record_instance(
            InstanceRecord(
                sop_instance_uid=header.sop_instance_uid,
                study_uid=header.study_uid, series_uid=header.series_uid,
                sop_class_uid=header.sop_class_uid, transfer_syntax=str(ts),
                modality=header.modality, body_part=header.body_part,
                view_position=header.view_position, view=header.view,
                instance_number=header.instance_number, path=str(path), size=size,
                calling_ae=context["calling_ae"], peer=context["peer"],
            ),
            same_content=lambda other: same_dataset(path, other), compared=copies.keys(),
        )
        if recorded.outcome == "duplicate":  # another association stored the same copy meanwhile
            path.unlink()
            return self._duplicate(header, key, context)
        self.on_stored()
        level = log.warning if recorded.outcome == "conflict" else log.info
        level(f"instance.{recorded.outcome}", study=key, modality=header.modality,
              view=header.view, bytes=size, **context)
        audit.instance_kept(recorded.outcome, header.sop_class_uid, header.sop_instance_uid,
                            header.study_uid, **context)
        if recorded.reopened:
            study = recorded.reopened
            log.info("study.state", study=key, revision=study.revision, state=study.state,
                     reason=study.reason)
            audit.study_state(study, study.state, study.reason)
        return SUCCESS

    def _duplicate(self, header: Header, key: str, context: dict[str, str]) -> int:
        log.info("instance.duplicate", study=key, **context)
        audit.instance_kept("duplicate", header.sop_class_uid, header.sop_instance_uid,
                            header.study_uid, **context)
        return SUCCESS


def _status(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def _title(value: str | bytes) -> str:
    return (value.decode("ascii", "replace") if isinstance(value, bytes) else value).strip()


IDLE_WAIT_SECONDS = 0.004
"""How long an association's threads wait for work before they look around again."""


class BulkReadSocket(AssociationSocket):
    """A socket that reads a PDU in one piece and lets its reader wait until data comes.

    pynetdicom reads 4 KiB per call and appends each piece to a growing bytearray: ~2,500 calls
    and as many copies for one 10 MB image, on a thread that competes with the others for the
    GIL. Its reader thread also polls the socket every millisecond while the peer is quiet (while
    a store is being written, say); here it waits on the socket instead, and wakes as soon as data
    comes. Our own replies wait for it to look round, ``IDLE_WAIT_SECONDS`` at most.
    """

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or not self._is_connected:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            readable, _, _ = select.select([sock], [], [], IDLE_WAIT_SECONDS)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport closed, as pynetdicom signals it
            return False
        return bool(readable)

    def recv(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        buffer = bytearray(nr_bytes)
        got = 0
        with memoryview(buffer) as view:
            while got < nr_bytes:
                read = self.socket.recv_into(view[got:])
                if not read:  # connection closed: return what came, as pynetdicom does
                    break
                got += read
        del buffer[got:]
        return buffer


class MessageQueue(queue.Queue):  # type: ignore[type-arg]
    """The queue of decoded DIMSE messages, whose non-blocking ``get`` waits a moment.

    The association's own thread asks it for a message every millisecond; waiting on the queue
    instead wakes it as soon as a message is decoded and spares a thousand wake-ups a second.
    """

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if not block:
            block, timeout = True, IDLE_WAIT_SECONDS
        return super().get(block, timeout)


class AcceptorHandler(RequestHandler):
    """pynetdicom's handler for a new connection, with the quieter socket and message queue, and
    the association's slot given back when its thread ends."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = BulkReadSocket  # same state, only reading differs
        assoc.dimse.msg_queue = MessageQueue()  # still empty: the association starts later
        run, admission = assoc.run, self.server.admission

        def run_then_leave() -> None:
            try:
                run()
            finally:
                admission.leave(assoc)

        assoc.run = run_then_leave  # the thread is not started yet
        return assoc


class SharedPortServer(ThreadedAssociationServer):
    """An association server that lets several receiver processes listen on one port.

    With TLS, pynetdicom's ``get_request`` runs the handshake in the accept loop, with no time
    limit: one peer that connects and says nothing (a port scanner, a half-open link, a modality
    set up without TLS that waits for us to speak) blocks every other connection to this process.
    Here the accept loop only wraps the socket; the handshake runs on the connection's own thread
    (the one ThreadingMixIn starts, before pynetdicom builds an association on it) within the ACSE
    timeout, and a peer that fails it is logged and dropped before it takes an association slot.
    """

    daemon_threads = True  # a handshake still running never holds up the receiver's stop
    admission: Admission

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            problem = complete_handshake(request, self.ae.acse_timeout)
            if problem:
                log.warning("association.tls_refused", peer=client_address[0], reason=problem)
                audit.tls_refused(client_address[0], problem)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


def make_ae(config: Config) -> AE:
    """The application entity with our presentation contexts and time-outs."""
    ae = AE(ae_title=config.node.ae_title)
    # pynetdicom's own count (per process, and counting connections that have not negotiated
    # yet) is only a backstop; ``Admission`` applies the node-wide limit.
    ae.maximum_associations = config.node.max_associations
    ae.maximum_pdu_size = config.node.max_pdu_bytes
    ae.acse_timeout = config.node.acse_timeout_seconds
    ae.network_timeout = config.node.network_timeout_seconds
    ae.dimse_timeout = config.node.network_timeout_seconds
    for sop_class in STORAGE_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    return ae


class Receiver:
    """One receiver process: an AE listening on the node's port until told to stop."""

    def __init__(self, config: Config, store: Store, admission: Admission,
                 ssl_context: Any = None, on_stored: Callable[[], None] = lambda: None):
        _config.LOG_HANDLER_LEVEL = "none"
        self.config = config
        self.scp = StorageSCP(config, store, admission, on_stored)
        # pynetdicom streams each dataset to a temporary file as it arrives (no copy in memory);
        # it takes the folder from ``tempfile``, which a receiver process uses for nothing else.
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(self.scp.spool.incoming)
        self.ae = make_ae(config)
        self.server = self.ae.make_server(
            (config.node.host, config.node.port),
            evt_handlers=self.scp.handlers(),
            ssl_context=ssl_context,
            server_class=SharedPortServer,
            request_handler=AcceptorHandler,
        )
        self.server.admission = admission
        self.ae._servers.append(self.server)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
            name="receiver", daemon=True,
        )
        self._thread.start()
        log.info("receiver.listening", host=self.config.node.host, port=self.port,
                 ae_title=self.config.node.ae_title)

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Stop accepting, let associations in flight finish (each store is already durable)."""
        self.server.shutdown()
        deadline = time.monotonic() + grace_seconds
        while self.server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.server.active_associations:
            assoc.abort()
        log.info("receiver.stopped", port=self.port)
