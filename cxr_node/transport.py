"""The receiver's changes to pynetdicom's transport, and every use it makes of pynetdicom internals.

pynetdicom is pinned to the 3.0 series (pyproject.toml) because this module relies on these of its
internals, each checked by the ingest and attack tests:

- ``AssociationSocket``: its ``socket``, ``_is_connected``, ``event_queue`` and ``assoc``
  attributes, and that the DUL reads each PDU as ``recv(6)`` (type and length) then
  ``recv(length)``, treating a short read as the transport closing (Evt17)
  (``DULServiceProvider._read_pdu_data``).
- ``RequestHandler._create_association``, the ``Association``'s ``run``, ``dul.socket``,
  ``dul.to_user_queue`` and ``dimse.msg_queue``; that an association's thread is named
  ``AcceptorThread``; ``ThreadedAssociationServer.process_request_thread``; ``AE._servers``.
- ``dimse_messages.NamedTemporaryFile``, which writes an incoming C-STORE data set when
  ``_config.STORE_RECV_CHUNKED_DATASET`` is on, and the request primitive's ``_dataset_file``.
- ``_config.VALIDATORS["UI"]`` (documented) and ``_config.LOG_HANDLER_LEVEL``.
- ``acse.send_reject`` followed by ``Association.kill``, as pynetdicom itself rejects.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any, cast

import structlog
from pynetdicom import AE, _config, dimse_messages
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from cxr_node import audit
from cxr_node.admission import Admission, ConnectionGate, Pending, refuse
from cxr_node.spool import IncomingFile
from cxr_node.tls import complete_handshake

log = structlog.get_logger("cxr_node.transport")

IDLE_WAIT_SECONDS = 0.004
"""How long an association's threads wait for work before they look around again."""
PDU_HEADER_BYTES = 6
P_DATA_TF = 0x04
PDU_TYPES = range(0x01, 0x08)
ASSOCIATE_PDU_MAX_BYTES = 256 << 10
"""Largest A-ASSOCIATE-RQ (and any PDU other than P-DATA) read. dcmtk refuses more than 1 MB
(``dcmAssociatePDUSizeLimit``), noting that valid ones never exceed 64 kB: 128 presentation
contexts (the most PS3.8 allows) of 35 transfer syntaxes each, with 26-character UIDs, come to
~135 kB; a 64 kB user identity token fits beside them. pynetdicom takes up to ~2 s of CPU to
decode 256 kB of crafted tiny items: only peers in an accept rule's network get that far, a few
at a time (``node.max_pending_per_source``)."""
PREALLOCATE_BYTES = 256 << 10
"""A PDU body up to this size is read into one buffer allocated at once (the default 128 KiB
P-DATA fits); a larger one grows as its bytes arrive, so an announced length costs nothing."""
# A-ABORT (PS3.8 9.3.8): source 2 (service provider), reason 6 (invalid PDU parameter value).
ABORT_INVALID_PDU_PARAMETER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])


def set_up_receiver_process(new_incoming: Callable[[], IncomingFile]) -> None:
    """Configure pynetdicom for a receiver process (once, before the server starts).

    - Each C-STORE data set is streamed, as it arrives, into ``new_incoming()`` (no copy in
      memory, and no temporary file of pynetdicom's choosing).
    - UIDs in DIMSE messages are let through unchecked to the Storage SCP, which validates them
      strictly and answers with a status; pynetdicom's own check would abort the association.
    - pynetdicom logs nothing: its messages quote UIDs and titles from the peer verbatim; the
      receiver's own log lines record every outcome.
    """
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL + 1)
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.VALIDATORS["UI"] = lambda value: (True, "")
    dimse_messages.NamedTemporaryFile = lambda *args, **kwargs: new_incoming()  # type: ignore[attr-defined]


def serve(ae: AE, address: tuple[str, int], handlers: list[Any], ssl_context: Any,
          admission: Admission, gate: ConnectionGate) -> SharedPortServer:
    """The receiver's server on ``address``, not started; ``ae`` stops it with its others."""
    server = ae.make_server(address, evt_handlers=handlers, ssl_context=ssl_context,
                            server_class=SharedPortServer, request_handler=AcceptorHandler)
    server.admission = admission
    server.gate = gate
    ae._servers.append(server)
    return cast(SharedPortServer, server)


def incoming_file(request: Any) -> IncomingFile:
    """The file a C-STORE request's data set was written to."""
    return request._dataset_file  # type: ignore[no-any-return]


def peer_certificate_subject(assoc: Any) -> Any:
    """The subject of the peer's verified TLS certificate (``getpeercert`` form), or None."""
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    if not isinstance(sock, ssl.SSLSocket):
        return None
    certificate = sock.getpeercert()
    return certificate.get("subject") if certificate else None


def reject(assoc: Any, result: int, source: int, diagnostic: int) -> None:
    """Send an A-ASSOCIATE-RJ and end the association once it has gone out."""
    assoc.acse.send_reject(result, source, diagnostic)
    assoc.kill()  # waits until the DUL has sent the A-ASSOCIATE-RJ, as pynetdicom does


def end_unnegotiated(assoc: Any) -> None:
    """End the thread of an association whose connection closed before it negotiated.

    Port scanners and health checks open and close the port; pynetdicom would otherwise keep the
    thread waiting until the ACSE timeout.
    """
    if not assoc.is_established and assoc.requestor.primitive is None:
        assoc.dul.to_user_queue.put(None)


def pending_of(assoc: Any) -> Pending | None:
    """The association's place among the connections not past the accept rules."""
    return getattr(assoc, "cxr_pending", None)


class BulkReadSocket(AssociationSocket):
    """A socket that bounds each PDU before reading it, reads it in few calls, and lets its
    reader wait until data comes.

    Bounds: a P-DATA-TF may be as long as the maximum this node announced plus the PDV header
    (``pdata_limit``); any other PDU ``ASSOCIATE_PDU_MAX_BYTES``. A longer one is never read:
    the node sends an A-ABORT, closes the connection, and logs, audits and counts it.

    Speed: pynetdicom reads 4 KiB per call and appends each piece to a growing bytearray (~2,500
    calls and as many copies for one 10 MB image); here a PDU is read into one buffer with
    ``recv_into``. Its reader thread also polls the socket every millisecond while the peer is
    quiet; here it waits on the socket, and wakes as soon as data comes. Our own replies wait for
    it to look round, ``IDLE_WAIT_SECONDS`` at most.
    """

    pdata_limit = 0  # set on each socket by AcceptorHandler
    _body: int | None = None  # length of the PDU body the DUL reads next
    _refused = False

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
        if self._refused:
            return bytearray()  # the DUL sees the transport closed (Evt17)
        if self._body is not None:
            self._body = None
            return self._read(nr_bytes)
        head = self._read(nr_bytes)
        if len(head) == PDU_HEADER_BYTES:
            kind, _, length = struct.unpack(">BBL", head)
            limit = self.pdata_limit if kind == P_DATA_TF else ASSOCIATE_PDU_MAX_BYTES
            if kind in PDU_TYPES:
                self._body = length
                if length > limit:
                    self._refuse(kind, length, limit)
        return head

    def _read(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        buffer = bytearray(min(nr_bytes, PREALLOCATE_BYTES))
        got = 0
        while got < nr_bytes:
            if got == len(buffer):
                buffer.extend(bytes(min(len(buffer), nr_bytes - got)))
            with memoryview(buffer) as view:
                read = self.socket.recv_into(view[got:])
            if not read:  # connection closed: return what came, as pynetdicom does
                break
            got += read
        del buffer[got:]
        return buffer

    def _refuse(self, kind: int, length: int, limit: int) -> None:
        """Abort instead of reading a PDU longer than allowed."""
        self._refused = True
        assoc = self.assoc
        peer = assoc.requestor.address
        reason = f"PDU of type 0x{kind:02X} announces {length} bytes; at most {limit} accepted"
        if assoc.is_established:
            log.warning("association.aborted", calling_ae=assoc.requestor.ae_title, peer=peer,
                        reason=reason)
            audit.association_aborted(assoc.requestor.ae_title, peer, "pdu_too_large", reason)
        else:
            refuse(peer, "pdu_too_large", reason)
        assert self.socket is not None
        try:
            self.socket.sendall(ABORT_INVALID_PDU_PARAMETER)
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer is gone already


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
    """pynetdicom's handler for a new connection, with the bounded socket and the quieter message
    queue; when the association's thread ends, its admission slot and pending place are given
    back, however it ended."""

    server: SharedPortServer

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        sock.__class__ = BulkReadSocket  # same state, only reading differs
        sock.pdata_limit = self.ae.maximum_pdu_size + PDU_HEADER_BYTES
        assoc.dimse.msg_queue = MessageQueue()  # still empty: the association starts later
        assoc.cxr_pending = self.server.take_pending(self.client_address)
        run, admission = assoc.run, self.server.admission

        def run_then_leave() -> None:
            try:
                run()
            finally:
                admission.leave(assoc)
                if assoc.cxr_pending:
                    assoc.cxr_pending.release()

        assoc.run = run_then_leave  # the thread is not started yet
        return assoc


class SharedPortServer(ThreadedAssociationServer):
    """An association server that several receiver processes share a port with, and that turns
    connections away at the door (``ConnectionGate``) before they cost a thread.

    With TLS, pynetdicom's ``get_request`` runs the handshake in the accept loop, with no time
    limit: one peer that connects and says nothing (a port scanner, a half-open link, a modality
    set up without TLS that waits for us to speak) blocks every other connection to this process.
    Here the accept loop only wraps the socket; the handshake runs on the connection's own thread
    (the one ThreadingMixIn starts, before pynetdicom builds an association on it) within the ACSE
    timeout, and a peer that fails it is logged and dropped.
    """

    daemon_threads = True  # a handshake still running never holds up the receiver's stop
    admission: Admission
    gate: ConnectionGate

    def __init__(self, *args: Any, **kwargs: Any):
        self._pending: dict[Any, Pending] = {}  # by client address, until its association takes it
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refused here, a connection is closed before a byte of it is read."""
        pending = self.gate.admit(client_address[0])
        if pending is None:
            return False
        self._pending[client_address] = pending
        return True

    def take_pending(self, client_address: Any) -> Pending | None:
        return self._pending.pop(client_address, None)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            problem = complete_handshake(request, self.ae.acse_timeout)
            if problem:
                log.warning("association.tls_refused", peer=client_address[0], reason=problem)
                audit.tls_refused(client_address[0], problem)
                self.shutdown_request(request)
                self._release(client_address)
                return
        super().process_request_thread(request, client_address)
        self._release(client_address)  # no association took it: the handler failed

    def _release(self, client_address: Any) -> None:
        pending = self.take_pending(client_address)
        if pending:
            pending.release()
