"""Metrics for Prometheus: counters and histograms of what happened, gauges of what is.

Receivers are separate processes, so counters and histograms use prometheus_client's multiprocess
mode: each process keeps its values in small files under ``<state_dir>/metrics`` (emptied at every
start) and the node's HTTP endpoint adds them up when scraped, including the counts of a receiver
that died and was replaced. prometheus_client chooses between in-memory and file-backed values
when it is *first imported*, so this module imports it only when the first instrument is built;
``enable_multiprocess`` runs before that in the node (and before any receiver is spawned), and
refuses to run if the choice was already made the other way.

What the database already knows (studies by state, queue depth, outbox, free disk) is never
counted: ``StateCollector`` reads it at scrape time with a few indexed queries, so it cannot drift.
Labels hold outcomes, reasons, DIMSE statuses and destination names, never UIDs or patient data.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cxr_node import __version__
from cxr_node.config import Config
from cxr_node.durable import private_dir
from cxr_node.store import Store, StudyState

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DRAFT_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
END_TO_END_BUCKETS = (5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
JOB_STATES = ("pending", "queued", "drafting")
OUTBOX_STATES = ("pending", "sending", "dead")


def metrics_dir(state_dir: Path) -> Path:
    return state_dir / "metrics"


def enable_multiprocess(state_dir: Path) -> Path:
    """Make this process and every process it starts from now on count into shared files.

    Call before prometheus_client is imported here and before child processes are started.
    """
    directory = private_dir(metrics_dir(state_dir)).resolve()
    if "prometheus_client" in sys.modules and os.environ.get(MULTIPROC_ENV) != str(directory):
        raise RuntimeError(
            "prometheus_client was imported before enable_multiprocess(): this process's counts "
            "would stay in its own memory and never reach /metrics"
        )
    for stale in directory.glob("*.db"):  # counts of an earlier run of the node
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


def process_exited(pid: int) -> None:
    """A receiver is gone: drop its live gauges (its counters still count)."""
    if MULTIPROC_ENV in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


class Instruments:
    """Every counter and histogram the node updates, built once per process."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.associations_accepted = Counter(
            "cxr_node_associations_accepted", "DICOM associations accepted")
        self.associations_rejected = Counter(
            "cxr_node_associations_rejected",
            "DICOM associations rejected (A-ASSOCIATE-RJ) or connections closed before "
            "negotiating, by reason", ["reason"])
        self.associations_aborted = Counter(
            "cxr_node_associations_aborted",
            "Accepted associations the node aborted for what the peer sent, by reason",
            ["reason"])
        self.instances_received = Counter(
            "cxr_node_instances_received", "Instances answered with success, by outcome",
            ["outcome"])
        self.instances_rejected = Counter(
            "cxr_node_instances_rejected",
            "Instances refused: quarantined (unusable dataset), out of resources (retry later) "
            "or over limits (too large to keep)", ["reason", "status"])
        self.instances_reconciled = Counter(
            "cxr_node_instances_reconciled",
            "Spool files found at start without an index row: indexed, removed or quarantined",
            ["outcome"])
        self.drafts = Counter("cxr_node_drafts", "Draft jobs finished, by outcome", ["outcome"])
        self.draft_retries = Counter(
            "cxr_node_draft_retries", "Draft jobs lost or failed and submitted again, or given up",
            ["final"])
        self.draft_generate_seconds = Histogram(
            "cxr_node_draft_generate_seconds",
            "Worker-reported time of the generate call that drafted a study",
            buckets=DRAFT_BUCKETS)
        self.draft_roundtrip_seconds = Histogram(
            "cxr_node_draft_roundtrip_seconds",
            "Node-measured time from submitting a draft task to taking its result",
            buckets=DRAFT_BUCKETS)
        self.deliveries = Counter(
            "cxr_node_deliveries", "Attempts to send a draft SR, by destination and outcome",
            ["destination", "outcome"])
        self.end_to_end_seconds = Histogram(
            "cxr_node_end_to_end_seconds",
            "From a study's last instance received to every destination having its draft SR",
            buckets=END_TO_END_BUCKETS)
        self.audit_write_errors = Counter(
            "cxr_node_audit_write_errors", "Audit records that could not be written")
        self.purges = Counter(
            "cxr_node_purges", "Retention purges: a study's images, a whole study, quarantine, "
            "signed reports without a study",
            ["kind"])
        self.feedback_reports = Counter(
            "cxr_node_feedback_reports",
            "Signed reports: SRs received to be read, reports stored to be paired, duplicates, "
            "and those ignored (not signed, our own draft, no text), by source", ["source", "outcome"])
        self.feedback_pairs = Counter(
            "cxr_node_feedback_pairs", "Signed reports paired with a draft and scored, by source",
            ["source"])
        self.significant_misses = Counter(
            "cxr_node_significant_misses",
            "Pairs whose signed report is positive for the observation where the draft is "
            "negative or silent", ["observation"])
        self.feedback_refused = Counter(
            "cxr_node_feedback_refused",
            "HL7 feedback connections and messages refused, by cause", ["cause"])


_instruments: Instruments | None = None
_lock = threading.Lock()


def instruments() -> Instruments:
    """This process's instruments; built on first use, after the node chose the value mode."""
    global _instruments
    with _lock:
        if _instruments is None:
            _instruments = Instruments()
        return _instruments


class StateCollector:
    """Gauges read from the state database and the file system at each scrape."""

    def __init__(self, config: Config, store: Store):
        self.config = config
        self.store = store

    def describe(self) -> list[Metric]:
        return []  # no query at registration; the families are known from collect()

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        db = self.store.db
        studies = GaugeMetricFamily("cxr_node_studies", "Studies by state", labels=["state"])
        counts = self.store.counts_by_state()
        for state in StudyState:
            studies.add_metric([state.value], counts.get(state.value, 0))
        yield studies

        jobs = GaugeMetricFamily("cxr_node_queue_jobs",
                                 "Draft jobs waiting to be sent, queued at the broker, or running",
                                 labels=["state"])
        by_state = dict(db.execute(
            f"SELECT state, COUNT(*) FROM jobs WHERE state IN {JOB_STATES} GROUP BY state"
        ).fetchall())
        for state in JOB_STATES:
            jobs.add_metric([state], by_state.get(state, 0))
        yield jobs

        outbox = GaugeMetricFamily("cxr_node_outbox", "Draft SRs not delivered, by destination",
                                   labels=["destination", "state"])
        rows: dict[tuple[str, str], int] = {
            (d.name, s): 0 for d in self.config.destinations for s in OUTBOX_STATES}
        for name, state, count in db.execute(
                f"SELECT destination, state, COUNT(*) FROM outbox WHERE state IN {OUTBOX_STATES} "
                "GROUP BY destination, state"):
            rows[(name, state)] = count
        for (name, state), count in sorted(rows.items()):
            outbox.add_metric([name, state], count)
        yield outbox

        st = os.statvfs(self.config.state_dir)
        yield GaugeMetricFamily("cxr_node_state_disk_free_bytes",
                                "Free space for the node on the state directory's file system",
                                value=st.f_bavail * st.f_frsize)
        yield GaugeMetricFamily("cxr_node_state_disk_min_free_bytes",
                                "Below this, C-STORE answers out of resources "
                                "(node.min_free_disk_mb)", value=self.config.node.min_free_disk_mb * 2**20)
        yield from self._feedback()
        info = GaugeMetricFamily("cxr_node_build_info", "Versions of the node and its runtime",
                                 labels=["version", "python", "pynetdicom", "pydicom"])
        info.add_metric([__version__, platform.python_version(), _version("pynetdicom"),
                         _version("pydicom")], 1)
        yield info


    def _feedback(self) -> Iterator[Metric]:
        """Agreement of the drafts with the signed reports, over the rolling window
        (feedback.window_pairs, feedback.window_days); a value without pairs is left out."""
        from prometheus_client.core import GaugeMetricFamily

        from cxr_node.feedback import rolling

        window = rolling(self.store.db, self.config.feedback)
        states = GaugeMetricFamily("cxr_node_feedback_signed_reports",
                                   "Signed reports kept, by state", labels=["state"])
        for state, count in window.states.items():
            states.add_metric([state], count)
        yield states
        yield GaugeMetricFamily("cxr_node_feedback_window_pairs",
                                "Pairs in the rolling window", value=window.pairs)
        means = {"cxr_node_feedback_rouge_l": ("ROUGE-L (pycocoevalcap, beta 1.2, R2Gen-cleaned "
                                               "text), mean over the window", window.rouge_l),
                 "cxr_node_feedback_bleu_2": ("BLEU-2 (ReXrank, per report), mean over the window",
                                              window.bleu_2),
                 "cxr_node_feedback_significant_miss_ratio": (
                     "Share of the window's pairs with a significant miss", window.miss_share)}
        for name, (help_text, value) in means.items():
            if value is not None:
                yield GaugeMetricFamily(name, help_text, value=value)
        f1 = GaugeMetricFamily("cxr_node_feedback_label_f1",
                               "Label F1 of the drafts against the signed reports over the window "
                               "(CheXpert-style labeler on both)",
                               labels=["observations", "average"])
        for name, value in window.label_f1.items():
            if value is not None:  # "label F1 micro (5 common)" -> ["5 common", "micro"]
                average, observations = name.removeprefix("label F1 ").split(" ", 1)
                f1.add_metric([observations.strip("()"), average], value)
        yield f1


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def scrape_registry(state_dir: Path, collector: StateCollector) -> CollectorRegistry:
    """What /metrics shows: every process's counters and histograms, and the state gauges."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=str(metrics_dir(state_dir)))
    registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus's text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST
