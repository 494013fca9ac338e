"""A folder another system picks the drafts up from (``type: folder``): each document copied as
``<SOP Instance UID>.dcm``, written whole or not at all (temporary name, fsync, rename)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pydicom
from pydantic import Field

from cxr_node.config import ConfigPath
from cxr_node.destinations.base import Check, Delivery, DestinationSettings, Draft, SendsDicomObjects
from cxr_node.durable import OutsideRoot, confined, write_atomic

UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


class FolderDestination(DestinationSettings, SendsDicomObjects):
    """A share the drafts are copied into."""

    type: Literal["folder"] = Field("folder", description="a folder")
    folder: ConfigPath = Field(description="directory the draft files are written to")


class Folder:
    """Copy each document of a draft into the folder; a copy already there unchanged is fine."""

    def __init__(self, destination: FolderDestination, node_ae_title: str = ""):
        self.name = destination.name
        self.destination = destination
        self.folder = destination.folder

    def send(self, draft: Draft) -> Delivery:
        documents = self.destination.documents_of(draft)
        for rendition, path in documents:
            delivery = self._copy(path)
            if delivery.outcome != "delivered":
                return Delivery(delivery.outcome, f"{rendition}: {delivery.reason}")
        return Delivery.delivered()

    def check(self) -> Iterator[Check]:
        probe = self.folder / f".cxr-node-write-test-{os.getpid()}"
        existed = self.folder.is_dir()
        try:
            write_atomic(probe, b"")  # as the drafts are written, creating the folder if need be
            probe.unlink()
        except OSError as exc:
            yield Check(False, f"cannot write to {self.folder}: {exc.strerror or exc}")
            return
        made = "" if existed else " (it did not exist: made it 0700, as the node would)"
        yield Check(True, f"{self.folder} is writable{made}")

    def _copy(self, path: Path) -> Delivery:
        uid = str(pydicom.filereader.read_file_meta_info(path).MediaStorageSOPInstanceUID)
        if not UID_RE.fullmatch(uid) or len(uid) > 64:
            return Delivery.dead("the document's SOP Instance UID is not a valid UID")
        try:
            target = confined(self.folder / f"{uid}.dcm", self.folder)
            data = path.read_bytes()
            if target.exists():
                if target.read_bytes() == data:
                    return Delivery.delivered(reason="already in the folder, unchanged")
                return Delivery.dead(f"a different file named {target.name} is already in "
                                     f"{self.name}; left as it is")
            write_atomic(target, data)
        except OutsideRoot:
            return Delivery.dead(f"{uid}.dcm would be written outside {self.folder}")
        except OSError as exc:
            return Delivery.retry(f"cannot write to the folder of {self.name}: {exc.strerror}")
        return Delivery.delivered()
