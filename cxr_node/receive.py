"""Receive: the DICOM Storage SCP (C-STORE, C-ECHO) that modalities and the PACS send to.

Nothing acknowledged is ever lost: an instance is written to its own file as it arrives, fsynced,
renamed into the spool, its directory fsynced and its row committed before the node answers
0x0000. Every C-STORE gets an answer, never an abort the node could have avoided: an unusable
dataset its failure status and reason (and the quarantine), a full disk 0xA700 so the modality
retries later, a dataset over ``limits`` a refusal before anything is kept or decoded.

Access: a connection must come from a network an accept rule names, and its association must
match one rule's calling AE title, network and, if the rule says so, TLS certificate subject
(pynetdicom checks only titles). The other jobs of the receive path have their own modules:
``part10`` (the checks of a received file), ``spool`` (where files live), ``admission`` (limits on
connections and associations) and ``transport`` (everything that reaches into pynetdicom).

Deflated Explicit VR Little Endian is not negotiated. Chest X-ray modalities do not send it, and it
hides the element layout: the only way to check a deflated dataset is to inflate it, in the
receiver, and 1 MB inflated to 1 GiB (3.2 GB peak). A sender that proposes it also proposes an
uncompressed syntax and uses that.

Several receiver processes share the port (SO_REUSEPORT): one pynetdicom process is bound by the
GIL, and modalities send concurrently.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
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
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)

from cxr_node import audit
from cxr_node.admission import Admission, ConnectionGate
from cxr_node.audit import RejectCause
from cxr_node.config import Config
from cxr_node.feedback import SIGNED_REPORT_CLASSES, SignedReportInbox
from cxr_node.logs import study_key
from cxr_node.part10 import (
    OUT_OF_RESOURCES,
    SUCCESS,
    Header,
    Limits,
    Rejected,
    same_dataset,
    shown_uid,
)
from cxr_node.spool import Spool, instance_record
from cxr_node.store import Store
from cxr_node.throttle import Throttle
from cxr_node.transport import (
    end_unnegotiated,
    incoming_file,
    peer_certificate_subject,
    pending_of,
    reject,
    serve,
    set_up_receiver_process,
)

log = structlog.get_logger("cxr_node.receive")

STORAGE_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
TRANSFER_SYNTAXES = [  # no Deflated Explicit VR Little Endian: see the module's docstring
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
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
# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECTIONS: dict[RejectCause, tuple[int, int, int]] = {
    "wrong_called_ae_title": (0x01, 0x01, 0x07),  # permanent, service user, called AE title
    "unknown_calling_ae_or_address": (0x01, 0x01, 0x03),  # permanent, calling AE title
    "certificate_subject": (0x01, 0x01, 0x03),
    "node_busy": (0x02, 0x03, 0x02),  # transient, presentation provider, local limit exceeded
}


class StorageSCP:
    """The C-STORE/C-ECHO service: small event handlers that each do one thing."""

    def __init__(self, config: Config, store: Store, admission: Admission,
                 on_stored: Callable[[], None] = lambda: None):
        self.config = config
        self.store = store
        self.admission = admission
        self.on_stored = on_stored  # tells the assemble stage, in the node process, to look
        self.limits = Limits.of(config.limits)
        self.spool = Spool(config.spool_dir, config.quarantine_dir, fsync=config.node.fsync,
                           limits=self.limits, min_free_mb=config.node.min_free_disk_mb)
        self._reports = Throttle()  # log lines of refusals that repeat (a full disk, a flood)
        self.signed_reports = SignedReportInbox(config, store, fsync=config.node.fsync)

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
        """Reject (PS3.8 A-ASSOCIATE-RJ) what ``_rejection`` finds; the association is no longer
        pending either way."""
        assoc = event.assoc
        pending = pending_of(assoc)
        if pending:
            pending.release()
        rq = assoc.requestor
        calling, called = _title(rq.primitive.calling_ae_title), _title(rq.primitive.called_ae_title)
        rejection = self._rejection(assoc, calling, called, rq.address)
        if rejection is None:
            return
        cause, reason = rejection
        result, source, diagnostic = REJECTIONS[cause]
        repeated = self._reports.due((rq.address, reason))
        if repeated:
            log.warning("association.rejected", calling_ae=calling, peer=rq.address,
                        reason=reason, count=repeated)
        audit.association_rejected(calling, rq.address, reason, cause, diagnostic,
                                   record_now=repeated)
        reject(assoc, result, source, diagnostic)

    def _rejection(self, assoc: Any, calling: str, called: str,
                   address: str) -> tuple[RejectCause, str] | None:
        """Why an association may not go on: a called AE title that is not ours; a calling AE
        title, address and certificate no accept rule allows; for a while, the node's limit
        (transient: "local limit exceeded"). None: it is admitted."""
        if called != self.config.node.ae_title:
            return "wrong_called_ae_title", (
                f"called AE title {called!r} is not {self.config.node.ae_title!r}")
        rules = [rule for rule in self.config.accept if rule.allows(calling, address)]
        if not rules:
            return "unknown_calling_ae_or_address", (
                f"no accept rule allows AE {calling!r} from {address}")
        if not any(rule.allows_certificate(peer_certificate_subject(assoc)) for rule in rules):
            return "certificate_subject", (
                f"the TLS client certificate of {address} matches no certificate_subject "
                f"allowed for AE {calling!r}")
        if not self.admission.enter(assoc):
            return "node_busy", (f"node busy: {self.admission.limit} associations open "
                                 "(node.max_associations)")
        return None

    def on_conn_close(self, event: evt.Event) -> None:
        end_unnegotiated(event.assoc)

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
        """Check, store durably, index, and only then say success."""
        rq = event.assoc.requestor
        context = {"calling_ae": rq.ae_title, "peer": rq.address}
        request = event.request
        incoming = incoming_file(request)
        received = Path(incoming.name)  # pynetdicom removes it after we answer, unless moved
        try:
            if incoming.refusal:
                raise incoming.refusal
            header = Header.parse(received, self.limits, (str(request.AffectedSOPClassUID),
                                                          str(request.AffectedSOPInstanceUID)))
            return self._keep(header, received, context)
        except Rejected as exc:
            refusal = exc
        except (OSError, sqlite3.Error) as exc:
            why = exc.strerror if isinstance(exc, OSError) else type(exc).__name__
            refusal = Rejected(OUT_OF_RESOURCES, f"cannot store now: {why}", keep=False)
        return self._refuse(refusal, request, received, context)

    def _keep(self, header: Header, received: Path, context: dict[str, str]) -> int:
        """Index the instance unless an identical copy is already kept.

        Content is compared only with the stored copies of the same SOP Instance UID (a re-send),
        never hashed: on the common path the received file is renamed into place untouched.
        """
        if header.sop_class_uid in SIGNED_REPORT_CLASSES:  # a report, never an image to draft
            return self.signed_reports.keep(header, received, context)
        key = study_key(header.study_uid)
        copies = self.store.copies_of(header.sop_instance_uid)
        if any(same_dataset(received, path) for path in copies.values()):
            return self._duplicate(header, key, context)
        path = self.spool.path_for(header)
        self.spool.keep(received, path)
        try:
            recorded = self.store.record_instance(
                instance_record(header, path, **context),
                same_content=lambda other: same_dataset(path, other), compared=copies.keys(),
            )
        except BaseException:
            path.unlink(missing_ok=True)  # not indexed, not acknowledged: the modality re-sends
            raise
        if recorded.outcome == "duplicate":  # another association stored the same copy meanwhile
            path.unlink()
            return self._duplicate(header, key, context)
        self.on_stored()
        level = log.warning if recorded.outcome == "conflict" else log.info
        level(f"instance.{recorded.outcome}", study=key, modality=header.modality,
              view=header.view, bytes=header.size, **context)
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

    def _refuse(self, refusal: Rejected, request: Any, received: Path,
                context: dict[str, str]) -> Dataset:
        """Answer a failure status; keep the bytes in the quarantine when they are worth it."""
        where = None
        if refusal.keep:
            try:
                where = self.spool.quarantine(received, refusal.reason, context).name
            except OSError as exc:
                log.error("quarantine.failed", reason=exc.strerror)
        received.unlink(missing_ok=True)
        outcome = ("quarantined" if where else
                   "refused" if refusal.status == OUT_OF_RESOURCES else "discarded")
        repeated = self._reports.due((outcome, refusal.reason))
        if repeated:
            log.warning(f"instance.{outcome}", reason=refusal.reason, file=where,
                        status=f"0x{refusal.status:04X}", count=repeated, **context)
        audit.instance_refused(outcome, refusal.status, shown_uid(request.AffectedSOPClassUID),
                               shown_uid(request.AffectedSOPInstanceUID), refusal.reason,
                               **context)
        return _status(refusal.status, refusal.reason)


def _status(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def _title(value: str | bytes) -> str:
    return (value.decode("ascii", "replace") if isinstance(value, bytes) else value).strip()


def make_ae(config: Config) -> AE:
    """The application entity with our presentation contexts, PDU size and time-outs."""
    ae = AE(ae_title=config.node.ae_title)
    # pynetdicom's own count covers connections that have not negotiated yet, and refuses
    # silently: it is set out of reach, ``Admission`` and ``ConnectionGate`` apply the limits.
    ae.maximum_associations = 4 * (config.node.max_associations
                                   + config.node.max_pending_connections)
    ae.maximum_pdu_size = config.node.max_pdu_bytes
    ae.acse_timeout = config.node.acse_timeout_seconds
    ae.network_timeout = config.node.network_timeout_seconds
    ae.dimse_timeout = config.node.network_timeout_seconds
    for sop_class in STORAGE_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    if config.feedback.dicom:  # signed reports from the PACS (cxr_node/feedback.py)
        for sop_class in SIGNED_REPORT_CLASSES:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_supported_context(Verification)
    return ae


class Receiver:
    """One receiver process: an AE listening on the node's port until told to stop."""

    def __init__(self, config: Config, store: Store, admission: Admission, gate: ConnectionGate,
                 ssl_context: Any = None, on_stored: Callable[[], None] = lambda: None):
        self.config = config
        self.scp = StorageSCP(config, store, admission, on_stored)
        set_up_receiver_process(self.scp.spool.new_incoming)
        # The node checks the values it uses; pydicom's warnings would copy a peer's invalid
        # values into the log.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
        self.ae = make_ae(config)
        self.server = serve(self.ae, (config.node.host, config.node.port), self.scp.handlers(),
                            ssl_context, admission, gate)
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
