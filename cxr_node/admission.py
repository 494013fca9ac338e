"""Admission: who gets a connection, a thread and an association slot, and who is turned away.

Two budgets, kept apart so that neither can starve the other:

- *Pending* connections, which have not passed the accept rules yet (TCP connected, TLS handshake
  or A-ASSOCIATE-RQ under way): limited per source address (``node.max_pending_per_source``) and
  in total (``node.max_pending_connections``). Such a connection has proved nothing, yet costs a
  thread; a peer that opens hundreds and sends nothing must not lock real modalities out (as
  pynetdicom's own count, which lumps them with accepted associations, let ~60 idle connections
  do). A connection over a limit is closed at once, before a byte is read.
- *Admitted* associations, which passed the accept rules: ``node.max_associations``, node-wide.

Both counts are shared by the receiver processes: the kernel hands each connection to one of them
by a hash, not by load, so limits per process would turn a modality away while another process had
room. Each process counts in its own row of shared memory and zeroes it when it (re)starts, so a
receiver that died leaks nothing.

Every refusal is counted in the metrics, logged and audited; a flood of identical refusals is
written once per interval with its count (``Throttle``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import structlog

from cxr_node import audit
from cxr_node.audit import ConnectionRefusal
from cxr_node.config import AcceptRule
from cxr_node.throttle import Throttle

log = structlog.get_logger("cxr_node.admission")

SOURCE_SLOTS = 1021
"""Per-source counters per receiver process; sources share a slot only by a keyed hash, which an
attacker cannot aim at a modality's slot without the node's key."""
SHARED_INTS_PER_RECEIVER = 1 + SOURCE_SLOTS  # the process's pending total, then its slots

_refusals = Throttle()


def refuse(peer: str, cause: ConnectionRefusal, reason: str) -> None:
    """Log, audit and count a connection turned away before its association was negotiated."""
    repeated = _refusals.due((peer, cause))
    if repeated:
        log.warning("association.refused", peer=peer, cause=cause, reason=reason, count=repeated)
    audit.connection_refused(peer, cause, reason, record_now=repeated)


class Admission:
    """The node-wide limit on concurrent associations (``node.max_associations``)."""

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


class Pending:
    """One connection's place in the pending count, given back once (whichever comes first: the
    accept rules judged it, the connection closed, the TLS handshake failed)."""

    def __init__(self, gate: ConnectionGate, slot: int):
        self._gate = gate
        self._slot = slot
        self._held = True

    def release(self) -> None:
        with self._gate.counts.get_lock():
            if self._held:
                self._held = False
                self._gate.counts[self._gate.row] -= 1
                self._gate.counts[self._gate.row + self._slot] -= 1


class ConnectionGate:
    """What happens to a new TCP connection before a byte of it is read."""

    def __init__(self, rules: list[AcceptRule], total_limit: int, per_source_limit: int,
                 counts: Any, index: int, key: bytes):
        """``counts``: a ``multiprocessing.Array`` of ``SHARED_INTS_PER_RECEIVER`` ints per
        receiver process; ``key``: the node's secret for hashing addresses to slots."""
        self.rules = rules
        self.total_limit = total_limit
        self.per_source_limit = per_source_limit
        self.counts = counts
        self.row = index * SHARED_INTS_PER_RECEIVER
        self.rows = range(0, len(counts), SHARED_INTS_PER_RECEIVER)
        self.key = key
        with counts.get_lock():
            counts[self.row:self.row + SHARED_INTS_PER_RECEIVER] = [0] * SHARED_INTS_PER_RECEIVER

    def admit(self, address: str) -> Pending | None:
        """A pending place for a connection from ``address``; None (refusal reported) when no
        accept rule admits that address, or a pending limit is reached."""
        if not any(rule.admits_address(address) for rule in self.rules):
            refuse(address, "unknown_network", f"no accept rule admits the address {address}")
            return None
        digest = hashlib.blake2b(address.encode(), key=self.key, digest_size=8).digest()
        slot = 1 + int.from_bytes(digest, "big") % SOURCE_SLOTS
        counts = self.counts
        refusal: tuple[ConnectionRefusal, str]
        with counts.get_lock():
            if sum(counts[row] for row in self.rows) >= self.total_limit:
                refusal = ("pending_limit", f"{self.total_limit} connections are not past the "
                           "accept rules yet (node.max_pending_connections)")
            elif sum(counts[row + slot] for row in self.rows) >= self.per_source_limit:
                refusal = ("pending_per_source", f"{self.per_source_limit} connections from "
                           f"{address} are not past the accept rules yet "
                           "(node.max_pending_per_source)")
            else:
                counts[self.row] += 1
                counts[self.row + slot] += 1
                return Pending(self, slot)
        refuse(address, *refusal)
        return None
