"""DICOM C-STORE to a PACS (``type: dicom``): one association per draft, each file sent as written.

Every C-STORE response is checked (PS3.4 B.2.3, PS3.7 C): success and warnings are delivered (the
PACS kept the object, perhaps coerced); out of resources and transient rejections are retried;
failure statuses, permanent rejections and a peer that takes none of our presentation contexts
are dead-lettered at once with the reason. The draft's renditions go on one association, each in
its own presentation context; the draft is delivered when every one of them is.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydantic import Field, field_validator
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from cxr_node.config import AETitle, ConfigError, DestinationTLSConfig
from cxr_node.destinations.base import (
    Check,
    Delivery,
    DestinationSettings,
    Draft,
    Rendition,
    SendsDicomObjects,
)
from cxr_node.tls import PeerCheckingContext, client_context


class DicomDestination(DestinationSettings, SendsDicomObjects):
    """A PACS (or any Storage SCP) the drafts are sent to by C-STORE."""

    type: Literal["dicom"] = Field("dicom", description="DICOM C-STORE")
    ae_title: AETitle = Field(description="the PACS's AE title")
    host: str = Field(description="the PACS's address")
    port: int = Field(ge=1, le=65535, description="the PACS's DICOM port")
    calling_ae_title: AETitle | None = Field(None, description="our AE title there; default node.ae_title")
    tls: DestinationTLSConfig | None = Field(None, description="DICOM TLS to this PACS")
    timeout_seconds: float = Field(30.0, gt=0, description="association and response timeout")
    associations: int = Field(2, ge=1, le=16, description="drafts sent to this PACS at once")

    @field_validator("tls")
    @classmethod
    def _pacs_ca(cls, v: DestinationTLSConfig | None) -> DestinationTLSConfig | None:
        if v is not None and v.ca_certificates is None:
            raise ValueError("ca_certificates: the PACS's certificate must chain to a CA bundle "
                             "you name (the system trust store is not used)")
        return v

    @property
    def lanes(self) -> int:
        return self.associations


def expected_name(destination: DicomDestination) -> str:
    """The name (or IP address) the destination's certificate must carry."""
    tls = destination.tls
    return tls.server_name if tls and tls.server_name else destination.host


def status_meaning(status: int) -> str:
    """What a C-STORE status says, e.g. 'Refused: Out of Resources'; its category if unnamed."""
    category = code_to_category(status)
    return STORAGE_SERVICE_CLASS_STATUS.get(status, (category, ""))[1] or category


def store_status_delivery(status: int) -> Delivery:
    """A C-STORE response status as a delivery (PS3.4 B.2.3, PS3.7 C).

    Warnings mean the PACS kept the object (perhaps coerced): delivered, with the status kept.
    Out of resources, resource limitation and cancel pass: retry. Every other failure, and a
    status nobody knows, will not change by sending the same file again: dead.
    """
    category = code_to_category(status)
    text = f"C-STORE status 0x{status:04X} ({status_meaning(status)})"
    if category in ("Success", "Warning"):
        return Delivery.delivered(status, "" if category == "Success" else text)
    if 0xA700 <= status <= 0xA7FF or status in (0x0213, 0xFE00):
        return Delivery.retry(text, status)
    return Delivery.dead(text, status)


class DicomStore:
    """C-STORE SCU to a PACS: one association per draft, each file sent as it was written."""

    def __init__(self, destination: DicomDestination, node_ae_title: str):
        self.name = destination.name
        self.destination = destination
        self.calling_ae = destination.calling_ae_title or node_ae_title
        # pynetdicom sends a file's bytes unchanged only in its chunked mode, a process-wide
        # switch; nothing in the node wants the other path (decode, then encode again).
        _config.STORE_SEND_CHUNKED_DATASET = True

    @property
    def peer(self) -> str:
        d = self.destination
        return f"{d.ae_title}@{d.host}:{d.port}"

    def send(self, draft: Draft) -> Delivery:
        documents = self.destination.documents_of(draft)
        files = [(rendition, path, pydicom.filereader.read_file_meta_info(path))
                 for rendition, path in documents]
        contexts = {(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
                    for _, _, meta in files}
        assoc, tls = self.associate([
            (sop_class, list(dict.fromkeys([syntax, ExplicitVRLittleEndian,
                                            ImplicitVRLittleEndian])))
            for sop_class, syntax in sorted(contexts)])
        if not assoc.is_established:
            return self.not_established(assoc, tls)
        try:
            return _all_delivered([(rendition, self._store(assoc, path, meta))
                                   for rendition, path, meta in files])
        finally:
            if assoc.is_established:
                assoc.release()

    def check(self) -> Iterator[Check]:
        try:
            ok, line = echo(self)
        except ConfigError as exc:  # a TLS file that cannot be read
            ok, line = False, f"TLS files: {exc}"
        yield Check(ok, line)

    def associate(self, contexts: Sequence[tuple[str, Sequence[str]]]
                  ) -> tuple[Association, PeerCheckingContext | None]:
        """An association with this peer, established or not, proposing ``contexts`` (abstract
        syntax, transfer syntaxes); with the TLS context that tells how its handshake went.

        The one way anything of ours connects to a DICOM peer: dispatch, and the command line's
        send, echo and ``config check --connect``, which so prove what the node will meet.
        """
        ae = AE(ae_title=self.calling_ae)
        timeout = self.destination.timeout_seconds
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        for abstract_syntax, transfer_syntaxes in contexts:
            ae.add_requested_context(abstract_syntax, list(transfer_syntaxes))
        tls = client_context(self.destination.tls)  # one per connection: it keeps the outcome
        assoc = ae.associate(
            self.destination.host, self.destination.port, ae_title=self.destination.ae_title,
            tls_args=(tls, expected_name(self.destination)) if tls else None,
        )
        return assoc, tls

    def not_established(self, assoc: Association, tls: PeerCheckingContext | None) -> Delivery:
        """Why ``assoc`` did not come about, as a delivery: dead when trying again cannot help."""
        if tls is not None and tls.failure:
            return Delivery.retry(f"TLS: the certificate of {self.peer} was refused: {tls.failure}")
        answer = _rejection(assoc)
        if answer is not None:
            why = f"association rejected by {self.peer}: {answer.reason_str} ({answer.source_str})"
            if answer.result == 0x01:
                return Delivery.dead(f"{why}, permanently")
            return Delivery.retry(f"{why}, for now")
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            offered = sorted({UID(cx.abstract_syntax).name for cx in assoc.rejected_contexts})
            return Delivery.dead(f"{self.peer} accepted no presentation context for "
                                 f"{', '.join(offered)}")
        hint = "; with TLS, check that its certificate chains to ca_certificates" if tls else ""
        return Delivery.retry(
            f"no association with {self.peer}: refused, unreachable, aborted or no answer within "
            f"{self.destination.timeout_seconds:g} s{hint}"
        )

    def _store(self, assoc: Association, path: Path, meta: Any) -> Delivery:
        sop_class, stored_syntax = meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID
        accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts
                    if cx.abstract_syntax == sop_class]
        if not accepted:
            return Delivery.dead(f"{self.peer} accepted no presentation context for "
                                 f"{UID(sop_class).name}")
        # As stored when the PACS took the file's own syntax; else pynetdicom re-encodes it.
        dataset = path if stored_syntax in accepted else pydicom.dcmread(path)
        try:
            response = assoc.send_c_store(dataset)
        except (RuntimeError, OSError) as exc:  # the association went away under us
            return Delivery.retry(f"connection to {self.peer} lost while sending: {exc}")
        if "Status" not in response:
            return Delivery.retry(
                f"no C-STORE response from {self.peer}: it aborted, closed the connection or "
                f"did not answer within {self.destination.timeout_seconds:g} s"
            )
        return store_status_delivery(int(response.Status))


def _all_delivered(answers: list[tuple[Rendition, Delivery]]) -> Delivery:
    """One delivery for a draft's renditions: dead if one is, else retry if one is, else
    delivered (with any warnings). A retry sends them all again: same UIDs, one copy each."""
    if len(answers) == 1:
        return answers[0][1]
    for outcome in ("dead", "retry"):
        failed = [(r, d) for r, d in answers if d.outcome == outcome]
        if failed:
            rendition, first = failed[0]
            return Delivery(outcome, f"{rendition}: {first.reason}", first.status)
    warnings = "; ".join(f"{r}: {d.reason}" for r, d in answers if d.reason)
    return Delivery.delivered(answers[0][1].status, warnings)


def _rejection(assoc: Association) -> A_ASSOCIATE | None:
    """The peer's A-ASSOCIATE-RJ, if it sent one.

    pynetdicom 3.0 can lose a race against a peer that rejects at once: the connection is closed
    before its ACSE looks, and it reports an abort with the rejection still unread in the DUL's
    queue (about 1 in 25 tries against a local peer). Both places are looked at.
    """
    for answer in (assoc.acceptor.primitive, assoc.dul.peek_next_pdu()):
        if isinstance(answer, A_ASSOCIATE) and answer.result in (0x01, 0x02):
            return answer
    return None


def echo(store: DicomStore) -> tuple[bool, str]:
    """C-ECHO the peer: whether it answered Success, and a line that says how it went."""
    started = time.monotonic()
    assoc, tls = store.associate([(Verification, [ImplicitVRLittleEndian])])
    if not assoc.is_established:
        return False, f"C-ECHO {store.peer}: FAILED: {store.not_established(assoc, tls).reason}"
    try:
        response = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    took = f"{(time.monotonic() - started) * 1000:.0f} ms"
    certificate = f"; {describe_certificate(tls.peer_certificate)}" if tls else ""
    if "Status" not in response:
        return False, f"C-ECHO {store.peer}: FAILED: no response within {took}{certificate}"
    status = int(response.Status)
    line = f"0x{status:04X} {status_meaning(status)} in {took}"
    return status == 0, f"C-ECHO {store.peer}: {line}{certificate}"


def describe_certificate(certificate: dict[str, object] | None, now: float | None = None) -> str:
    """The TLS peer's certificate as IT checks it: subject, issuer, expiry and days left."""
    if not certificate:
        return "TLS peer certificate: none seen"

    def name(field: str) -> str:
        rdns = certificate.get(field) or ()
        return ", ".join(f"{k}={v}" for rdn in rdns for k, v in rdn) or "(empty)"  # type: ignore[union-attr]

    expires = ssl.cert_time_to_seconds(str(certificate["notAfter"]))
    days = (expires - (time.time() if now is None else now)) / 86400
    when = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d %H:%M UTC")
    left = f"EXPIRED {-days:.0f} days ago" if days < 0 else f"{days:.0f} days left"
    return f"TLS peer certificate: subject {name('subject')}; issuer {name('issuer')}; " \
           f"expires {when} ({left})"
