"""What every destination kind shares: its settings' base, the draft it is handed, and the answer
it gives.

A destination only talks to its peer. It is handed one draft (the SR and any renditions built for
it), sends what its settings ask for, and answers ``Delivery``: delivered, retry later (with the
reason), or dead (with the reason). The outbox owns everything else: attempts, backoff, dead
letters, lanes, the study's state, the audit trail.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from pydantic import Field, field_validator

from cxr_node.config import _Section

Outcome = Literal["delivered", "retry", "dead"]
Rendition = Literal["sr", "pdf", "page"]
RENDITIONS: tuple[Rendition, ...] = ("sr", "pdf", "page")


@dataclass(frozen=True)
class Delivery:
    """What one attempt at one destination came to; ``status`` is the DICOM status the peer
    gave, if any (a C-STORE response's, or a STOW-RS answer's FailureReason or WarningReason;
    other protocols say theirs in the reason)."""

    outcome: Outcome
    reason: str = ""
    status: int | None = None

    def __post_init__(self) -> None:
        if self.outcome not in ("delivered", "retry", "dead"):
            raise ValueError(f"outcome: expected delivered, retry or dead, got {self.outcome!r}")
        if self.outcome != "delivered" and not self.reason:
            raise ValueError(f"reason: a {self.outcome} delivery must say why")
        if self.status is not None and not 0 <= self.status <= 0xFFFF:
            raise ValueError(f"status: expected a 16-bit status, got {self.status!r}")

    @classmethod
    def delivered(cls, status: int | None = None, reason: str = "") -> Delivery:
        return cls("delivered", reason, status)

    @classmethod
    def retry(cls, reason: str, status: int | None = None) -> Delivery:
        return cls("retry", reason, status)

    @classmethod
    def dead(cls, reason: str, status: int | None = None) -> Delivery:
        return cls("dead", reason, status)

    @property
    def status_hex(self) -> str | None:
        return None if self.status is None else f"0x{self.status:04X}"


@dataclass(frozen=True)
class Draft:
    """One draft as the outbox hands it to a destination: its documents by rendition, each a file
    the node wrote (the SR always; a PDF and a page image when a destination asked for them)."""

    sr_uid: str
    study_key: str
    documents: Mapping[Rendition, Path] = field(default_factory=dict)

    @property
    def sr(self) -> Path:
        return self.documents["sr"]


@dataclass(frozen=True)
class Check:
    """One line of `cxr-node config check --connect`: whether a connection works, and what it
    found (the peer's certificate, its answer) or why not."""

    ok: bool
    line: str


class Destination(Protocol):
    """A peer that takes drafts; it reports, the outbox decides what happens next."""

    name: str

    def send(self, draft: Draft) -> Delivery:
        """Send what this destination takes of ``draft``; never raise for the peer's doing."""
        ...

    def check(self) -> Iterable[Check]:
        """Prove the connection without sending a draft (a C-ECHO, a test write, a probe)."""
        ...


class DestinationSettings(_Section):
    """What every destination's settings have: ``type`` (its kind, the registry's key) and a
    ``name`` (in logs, `cxr-node outbox` and the audit trail)."""

    type: str = Field(description="the kind of destination")
    name: str = Field(min_length=1, max_length=64, description="name in logs and `cxr-node outbox`")

    @property
    def lanes(self) -> int:
        """How many drafts the outbox sends to this peer at once."""
        return 1


class SendsDicomObjects(_Section):
    """For kinds that store DICOM objects: which of a draft's renditions they send."""

    renditions: list[Rendition] = Field(
        ["sr"], min_length=1, description="what of each draft is sent: sr (the Structured "
        "Report), pdf (Encapsulated PDF), page (a Secondary Capture image of the same page)")

    @field_validator("renditions")
    @classmethod
    def _each_once(cls, v: list[Rendition]) -> list[Rendition]:
        if len(set(v)) != len(v):
            raise ValueError("each rendition once: sr, pdf, page")
        return v

    def documents_of(self, draft: Draft) -> list[tuple[Rendition, Path]]:
        """The files of ``draft`` to send, in the order configured (the outbox hands a
        destination only drafts that have them all)."""
        return [(r, draft.documents[r]) for r in self.renditions]
