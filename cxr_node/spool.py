"""The spool: where received files live, one folder per study, and the quarantine beside it.

No name here comes from the peer: a study's folder is its study key (a hash), a file's name a
random token, and every path is checked to resolve under its root before anything is written
(``confined``), so neither a crafted UID nor a planted symlink can place a file elsewhere.

A dataset is written, as it arrives, to its own file in ``.incoming`` (``IncomingFile``); a kept
instance is then fsynced and renamed into its study folder, never copied. The node indexes it and
only then answers success, so a crash can leave a file in the spool without its row, never a row
without its file: ``reconcile`` settles those at start, before the port opens.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import secrets
import time
from pathlib import Path
from typing import Any

import structlog

from cxr_node import audit
from cxr_node.durable import confined, free_mb, move_durably, private_dir, private_opener, write_atomic
from cxr_node.logs import study_key
from cxr_node.part10 import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    Header,
    Limits,
    Rejected,
    same_dataset,
)
from cxr_node.store import InstanceRecord, Store

log = structlog.get_logger("cxr_node.spool")

DISK_CHECK_BYTES = 4 << 20
"""Free space is checked each time a dataset in flight has written this much more: a statvfs
every 4 MB costs nothing next to the writes, and bounds how far transfers run past the limit."""
DISK_FULL = "free disk below node.min_free_disk_mb"
TOO_LARGE = "dataset larger than limits.max_dataset_mb"


class IncomingFile:
    """One dataset being received, written to its own file as its fragments arrive.

    It offers what pynetdicom uses of the temporary file it would otherwise create (``name``,
    ``write``, ``file.flush``, ``close``). Writing stops, without failing, once the dataset
    outgrows ``limits.max_dataset_mb`` or free space falls below ``node.min_free_disk_mb``: the
    rest of the dataset is still read off the wire and dropped, the file is emptied, and the
    C-STORE is then answered with ``refusal`` instead of the association being aborted.
    """

    def __init__(self, path: Path, max_bytes: int, min_free_mb: float):
        self.name = str(path)
        self.max_bytes = max_bytes
        self.min_free_mb = min_free_mb
        self.written = 0
        self.refusal: Rejected | None = None
        self._next_check = DISK_CHECK_BYTES
        self._file: io.FileIO | None = None  # closed when dropped, if an abort leaves it
        if free_mb(path.parent) < min_free_mb:
            self.refusal = Rejected(OUT_OF_RESOURCES, DISK_FULL, keep=False)
            return
        try:
            self._file = io.FileIO(path, "xb", opener=private_opener)
        except OSError as exc:
            self.refusal = Rejected(OUT_OF_RESOURCES, f"cannot create a file: {exc.strerror}",
                                    keep=False)

    @property
    def file(self) -> IncomingFile:
        return self  # pynetdicom flushes ``file`` after each fragment; writes are unbuffered

    def flush(self) -> None:
        pass

    def write(self, data: bytes) -> int:
        self.written += len(data)
        if self.refusal is None:
            if self.written > self.max_bytes:
                self._stop(Rejected(CANNOT_UNDERSTAND, TOO_LARGE, keep=False))
            elif self.written >= self._next_check:
                self._next_check = self.written + DISK_CHECK_BYTES
                if free_mb(Path(self.name).parent) < self.min_free_mb:
                    self._stop(Rejected(OUT_OF_RESOURCES, DISK_FULL, keep=False))
        if self.refusal is None and self._file is not None:
            try:
                with memoryview(data) as view:
                    while view:
                        view = view[self._file.write(view) or 0:]
            except OSError as exc:  # answered, not aborted: the modality tries again later
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                self._stop(Rejected(OUT_OF_RESOURCES, DISK_FULL if full else
                                    f"cannot write: {exc.strerror}", keep=False))
        return len(data)

    def _stop(self, refusal: Rejected) -> None:
        """Write no more of this dataset, and give back the space it took."""
        self.refusal = refusal
        try:
            if self._file is not None:
                self._file.truncate(0)
        except OSError:
            pass  # the file goes once the C-STORE is answered anyway

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Spool:
    """The received files: ``<root>/<study key>/<token>.dcm``, ``.incoming`` for transfers in
    flight, and the quarantine for what was refused."""

    def __init__(self, root: Path, quarantine: Path, fsync: bool = True,
                 limits: Limits | None = None, min_free_mb: float = 0):
        self.root = private_dir(root)
        self.incoming = private_dir(root / ".incoming")
        self.quarantine_dir = private_dir(quarantine)
        self.fsync = fsync
        self.limits = limits
        self.min_free_mb = min_free_mb

    def new_incoming(self) -> IncomingFile:
        """A fresh file in ``.incoming`` for the dataset about to arrive."""
        path = confined(self.incoming / f"{secrets.token_hex(12)}.dcm", self.incoming)
        max_bytes = self.limits.max_dataset_bytes if self.limits else 1 << 62
        return IncomingFile(path, max_bytes, self.min_free_mb)

    def path_for(self, header: Header) -> Path:
        """A new name for each copy: two copies with one SOP Instance UID can both be kept."""
        return self.root / study_key(header.study_uid) / f"{secrets.token_hex(12)}.dcm"

    def keep(self, received: Path, path: Path) -> None:
        """Make the received file durable under its spool name."""
        move_durably(received, confined(path, self.root), fsync=self.fsync)

    def quarantine(self, received: Path, reason: str, context: dict[str, Any]) -> Path:
        """Keep refused bytes with the reason, for IT to inspect; never silently dropped."""
        with received.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        path = confined(self.quarantine_dir / f"{time.strftime('%Y%m%d')}-{digest[:16]}.dcm",
                        self.quarantine_dir)
        move_durably(received, path, fsync=self.fsync)
        note = {"reason": reason, "received_at": time.time(), **context}
        write_atomic(path.with_suffix(".json"), json.dumps(note, indent=1).encode(), self.fsync)
        return path

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

    def reconcile(self, store: Store, limits: Limits) -> None:
        """Settle spool files that have no index row, before any association can arrive.

        Such a file was renamed into place and the node died before its row was committed: the
        C-STORE was never answered with success, so the modality sends it again. The file is
        removed when an identical copy is indexed (the re-send came first), else indexed (the
        re-send will then be a duplicate); one that is not a usable dataset is quarantined. Either
        way each instance ends with one row and one file.
        """
        known = {_spool_name(Path(p)) for (p,) in store.db.execute("SELECT path FROM instances")}
        indexed = removed = quarantined = 0
        for path in sorted(self.root.glob("*/*.dcm")):
            if path.parent == self.incoming or _spool_name(path) in known:
                continue
            try:
                header = Header.parse(path, limits)
            except Rejected as exc:
                self.quarantine(path, f"in the spool without an index row: {exc.reason}", {})
                audit.instance_reconciled("quarantined", None, reason=exc.reason)
                quarantined += 1
                continue
            copies = store.copies_of(header.sop_instance_uid)
            if any(same_dataset(path, copy) for copy in copies.values()):
                path.unlink()
                audit.instance_reconciled("removed", header)
                removed += 1
                continue
            store.record_instance(
                instance_record(header, path, calling_ae="", peer=""),
                same_content=lambda other, path=path: same_dataset(path, other),
                compared=copies.keys())
            audit.instance_reconciled("indexed", header)
            indexed += 1
        if indexed or removed or quarantined:
            log.warning("spool.reconciled", indexed=indexed, removed=removed,
                        quarantined=quarantined)


def instance_record(header: Header, path: Path, calling_ae: str, peer: str) -> InstanceRecord:
    """The index row of a kept file."""
    return InstanceRecord(
        sop_instance_uid=header.sop_instance_uid, study_uid=header.study_uid,
        series_uid=header.series_uid, sop_class_uid=header.sop_class_uid,
        transfer_syntax=header.transfer_syntax, modality=header.modality,
        body_part=header.body_part, view_position=header.view_position, view=header.view,
        instance_number=header.instance_number, path=str(path), size=header.size,
        calling_ae=calling_ae, peer=peer,
    )


def _spool_name(path: Path) -> tuple[str, str]:
    """A kept file by its study folder and name (unique: a random token), wherever the state
    directory is mounted."""
    return path.parent.name, path.name
