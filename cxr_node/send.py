"""The command line's DICOM client: ``cxr-node send`` (a Storage SCU, as a modality would send),
``cxr-node echo`` and ``cxr-node config check --connect`` (every connection a configuration needs).

It talks through the same association code as the node's own dispatch (``DicomStore``), so what
it proves about a peer holds for the node too. Each file is offered in its own transfer syntax and,
where the peer takes that syntax, sent byte for byte as stored; only a peer that refuses the
syntax gets a decompressed copy (explicit or implicit VR little endian, as it chose). A file
without File Meta (old devices and archives write them: implicit VR little endian, no preamble)
is read as the data set it holds.

Every file gets one line saying whether the peer stored it, with the DIMSE status and its meaning,
or why it was not sent; the caller exits non-zero when any file was not stored.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset

from cxr_node import destinations
from cxr_node.config import Config, ConfigError
from cxr_node.destinations.dicom import DicomStore, status_meaning, store_status_delivery

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128  # presentation contexts in one association (PS3.8 9.3.2.2: odd IDs 1 to 255)
UID_MAX = 64
Print = Callable[[str], None]


class NotSendable(Exception):
    """A file that cannot be offered to a peer; the message says why, in one line."""


@dataclass(frozen=True)
class Outgoing:
    """One file to send: what it is (from its header only) and how it is stored."""

    path: Path
    sop_class: UID
    sop_instance: UID
    transfer_syntax: UID
    has_meta: bool
    odd_length: bool  # a value left unpadded: the stream needs a copy that pads it

    @classmethod
    def read(cls, path: Path) -> Outgoing:
        """The file's header; NotSendable when it is not DICOM or names no valid SOP."""
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception as exc:  # pydicom raises many kinds on bytes that are not DICOM
            raise NotSendable(f"cannot read it: {_one_line(exc)}") from None
        uids = {}
        for keyword in ("SOPClassUID", "SOPInstanceUID"):
            value = ds.get(keyword)
            if value is None:
                raise NotSendable(f"not a DICOM instance: no {keyword}")
            value = UID(str(value))
            if len(value) > UID_MAX or not value.is_valid:
                raise NotSendable(f"{keyword} is not a valid UID")
            uids[keyword] = value
        has_meta = "TransferSyntaxUID" in ds.file_meta
        start = split_dataset(path)[1] if has_meta else 0
        return cls(path, uids["SOPClassUID"], uids["SOPInstanceUID"],
                   UID(ds.file_meta.TransferSyntaxUID) if has_meta else _encoding_of(ds), has_meta,
                   odd_length=(path.stat().st_size - start) % 2 == 1)

    @property
    def offered(self) -> list[tuple[str, list[str]]]:
        """Its presentation contexts, one syntax each, so that the peer answers for each: its own
        syntax, and the uncompressed ones a copy would go in if the peer refuses that."""
        syntaxes = dict.fromkeys([self.transfer_syntax, *UNCOMPRESSED])
        return [(self.sop_class, [syntax]) for syntax in syntaxes]


def _encoding_of(ds: Dataset) -> UID:
    """The transfer syntax of a data set read without File Meta, as pydicom found it."""
    implicit, little = ds.original_encoding
    if little is False:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def files_to_send(paths: Sequence[Path]) -> Iterator[tuple[Path, bool]]:
    """Each file named, and every file under each folder named (sorted, symlinks not followed);
    with True for files named outright (they must be DICOM), False for files found in folders."""
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name, False
        else:
            yield path, True


@dataclass
class Tally:
    """What came of a send, counted as the lines are printed."""

    stored: int = 0
    not_stored: int = 0
    skipped: int = 0

    @property
    def ok(self) -> bool:
        return self.not_stored == 0 and self.stored > 0

    def summary(self) -> str:
        text = f"{self.stored} of {self.stored + self.not_stored} file(s) stored"
        if self.not_stored:
            text += f"; {self.not_stored} NOT stored"
        if self.skipped:
            text += f"; {self.skipped} skipped (not DICOM)"
        return text


def send(store: DicomStore, paths: Sequence[Path], say: Print = print) -> Tally:
    """Send every file under ``paths`` to the peer, one line per file; the tally of what came of it.

    Files share associations (as many as fit in one's presentation contexts); when the peer drops
    one, the files still to go get a new one.
    """
    tally = Tally()
    outgoing: list[Outgoing] = []
    for path, named in files_to_send(paths):
        try:
            outgoing.append(Outgoing.read(path))
        except NotSendable as exc:
            if named:
                say(f"{path}: NOT stored: {exc}")
                tally.not_stored += 1
            else:
                say(f"{path}: skipped: {exc}")
                tally.skipped += 1
    while outgoing:
        batch = _batch(outgoing)
        outgoing = outgoing[len(batch):]
        left = _send_batch(store, batch, say, tally)
        outgoing = left + outgoing
    return tally


def _batch(outgoing: Sequence[Outgoing]) -> list[Outgoing]:
    """The longest run of files from the start whose presentation contexts fit one association."""
    contexts: set[tuple[str, tuple[str, ...]]] = set()
    for count, item in enumerate(outgoing):
        more = contexts | {(cls, tuple(ts)) for cls, ts in item.offered}
        if len(more) > MAX_CONTEXTS and count:
            return list(outgoing[:count])
        contexts = more
    return list(outgoing)


def _send_batch(store: DicomStore, batch: list[Outgoing], say: Print,
                tally: Tally) -> list[Outgoing]:
    """Send ``batch`` on one association; the files left unsent when the peer dropped it."""
    contexts = list(dict.fromkeys((cls, tuple(ts)) for item in batch for cls, ts in item.offered))
    assoc, tls = store.associate([(cls, list(ts)) for cls, ts in contexts])
    if not assoc.is_established:
        why = store.not_established(assoc, tls).reason
        for item in batch:
            say(f"{item.path}: NOT stored: {why}")
            tally.not_stored += 1
        return []
    try:
        for index, item in enumerate(batch):
            stored, line = _send_one(store, assoc, item)
            say(f"{item.path}: {line}")
            if stored:
                tally.stored += 1
            else:
                tally.not_stored += 1
            if not assoc.is_established:  # the peer hung up: the rest get a new association
                return batch[index + 1:]
        return []
    finally:
        if assoc.is_established:
            assoc.release()


def _send_one(store: DicomStore, assoc: Association, item: Outgoing) -> tuple[bool, str]:
    """Whether the peer stored ``item``, and the line that says so."""
    accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts
                if cx.abstract_syntax == item.sop_class]
    syntax = item.transfer_syntax
    if not accepted:
        return False, f"NOT stored: {store.peer} does not accept {item.sop_class.name}"
    own = syntax in accepted
    if not own and not any(ts in UNCOMPRESSED for ts in accepted):
        takes = ", ".join(UID(ts).name for ts in accepted)
        return False, (f"NOT stored: {store.peer} takes {item.sop_class.name} only as {takes}, "
                       f"not as {syntax.name}")
    if own and item.has_meta and not item.odd_length:
        dataset: Path | Dataset = item.path  # the stored bytes, unchanged
        how = f"as stored, {syntax.name}"
    else:
        try:
            dataset = _uncompressed_copy(item.path)
        except NotSendable as exc:
            return False, (f"NOT stored: {store.peer} refused {syntax.name} and the file cannot be "
                           f"decompressed here: {exc}")
        how = (f"as stored without File Meta, {syntax.name}" if own and not item.has_meta
               else f"{syntax.name}, a copy with its odd-length value padded" if own
               else "as an uncompressed copy" if not syntax.is_encapsulated
               else f"as a decompressed copy: {store.peer} refused {syntax.name}")
    try:
        response = assoc.send_c_store(dataset)
    except (ValueError, AttributeError) as exc:  # no usable context, or the copy cannot be encoded
        return False, f"NOT stored: cannot be sent: {_one_line(exc)}"
    except (RuntimeError, OSError) as exc:
        return False, f"NOT stored: connection to {store.peer} lost while sending: {_one_line(exc)}"
    if "Status" not in response:
        timeout = store.destination.timeout_seconds
        return False, (f"NOT stored: no C-STORE response from {store.peer}: it aborted, closed the "
                       f"connection or did not answer within {timeout:g} s")
    return _stored(int(response.Status), how)


def _stored(status: int, how: str) -> tuple[bool, str]:
    delivery = store_status_delivery(status)
    code = f"0x{status:04X} {status_meaning(status)}"
    if delivery.outcome == "delivered":
        return True, f"stored ({code}; {how})"
    later = "; temporary: send it again later" if delivery.outcome == "retry" else ""
    return False, f"NOT stored ({code}{later})"


def _uncompressed_copy(path: Path) -> Dataset:
    """The whole data set, decompressed if need be, ready for pynetdicom to encode."""
    try:
        ds = pydicom.dcmread(path, force=True)
        if "TransferSyntaxUID" not in ds.file_meta:
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = _encoding_of(ds)
        elif ds.file_meta.TransferSyntaxUID.is_encapsulated:
            ds.decompress(generate_instance_uid=False)  # the same instance: same UID
        elif ds.file_meta.TransferSyntaxUID.is_deflated:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # read inflated
        for _ in ds.iterall():  # values read but not decoded are written back as read: unpadded
            pass
    except Exception as exc:  # a decoder may raise anything on a broken codestream
        raise NotSendable(_one_line(exc)) from None
    return ds


def check_connections(config: Config) -> Iterator[tuple[bool, str]]:
    """Prove each connection the node will make, as it will make it: each destination's own
    check (a C-ECHO with its AE titles, timeout and TLS; a test write to a folder; ...), then the
    broker. One (ok, line) each."""
    for settings in config.destinations:
        try:
            checks = list(destinations.make(settings, config.node.ae_title).check())
        except ConfigError as exc:  # a TLS file that cannot be read
            checks = [destinations.Check(False, f"TLS files: {exc}")]
        for check in checks:
            yield check.ok, f"destination {settings.name}: {check.line}"
    yield _broker(config)


def _broker(config: Config) -> tuple[bool, str]:
    from cxr_node.web import HealthChecks, Unhealthy
    from workers.app import make_celery

    try:
        make_celery(config)  # as the node starts: this makes the embedded broker's folders
        # the node's own /healthz check, which needs none of the node's processes
        return True, f"broker: {HealthChecks(config, processes=None).broker()}"  # type: ignore[arg-type]
    except (Unhealthy, ConfigError) as exc:
        return False, f"broker: {exc}"
