"""End-to-end latency: from a study's last C-STORE to its draft SR accepted by the PACS (Orthanc).

The node runs as `cxr-node serve` with the single-machine set-up (embedded broker, local worker,
demo model on the CPU) inside a private network namespace with a real Orthanc as its destination;
dcmtk storescu sends from the same namespace. Studies have one (PA) or two (PA + lateral) small
images, alternately. A two-view study is complete at once; a one-view study waits
``--settle`` seconds of quiet (study.settle_seconds) first.

Every timestamp comes from the node's own database (one clock):
instances.received_at (last image stored) -> transitions "stable" -> jobs.submitted_at (task on
the broker) -> jobs.finished_at (result collected; the worker's timings.generate_seconds inside)
-> transitions "reported" (SR built and filed) -> outbox.delivered_at (Orthanc answered Success).

"Node overhead" = total - intended settle wait - generate (the model's own time).

    .venv/bin/python benchmarks/e2e.py           # 50 studies one at a time, then 50 in a burst
    .venv/bin/python benchmarks/e2e.py --quick   # smoke run, < 1 min

Needs root (ip netns), dcmtk and Orthanc.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from common import (
    add_common_options,
    machine_summary,
    median,
    percentile,
    progress,
    scratch,
    table,
    wait_for_quiet,
    wait_until,
)
from dicomgen import write_study
from nodeproc import NodeProcess, storescu, write_config
from pacs import Orthanc, running_orthanc

from cxr_node.config import QueueConfig

OVERHEAD_TARGET_SECONDS = 0.25


@dataclass(frozen=True)
class Latency:
    """One study's way through the node, in seconds; see the module docstring for the points."""

    intended_settle: float  # settle_seconds for a study made stable by quiet, 0 for both views
    assembler_delay: float  # last image -> stable, beyond the intended wait
    queue_wait: float  # stable -> task on the broker (room in flight, image prep, PNG, put)
    worker_round_trip: float  # on the broker -> result collected by the node, less generate
    generate: float  # the model's generate call (the worker's own timing)
    sr_build: float  # result collected -> SR built, filed, outbox row committed
    send: float  # -> Orthanc answered Success (outbox pickup + association + C-STORE)
    total: float  # last image stored -> SR delivered
    node_overhead: float  # total - intended settle - generate
    batch_size: int


PHASES = {
    "intended_settle": "settle: intended wait (settle_seconds, or 0 with both views)",
    "assembler_delay": "settle: assembler noticing, beyond the intended wait",
    "queue_wait": "queue wait: stable -> task on broker (slot, image prep, submit)",
    "worker_round_trip": "worker round trip less generate (broker, pickup, result)",
    "generate": "draft: generate (demo model, CPU)",
    "sr_build": "SR build + file + outbox row",
    "send": "send: outbox pickup + C-STORE to Orthanc",
    "total": "total: last C-STORE -> SR accepted by Orthanc",
    "node_overhead": "node overhead = total - intended settle - generate",
}


def node_config(work: Path, pacs: Orthanc, demo_model: Path, settle: float, tokens: int,
                poll_interval: float) -> Path:
    return write_config(
        work,
        study={"settle_seconds": settle, "max_wait_seconds": max(60.0, settle)},
        queue={"local_worker": True, "poll_interval_seconds": poll_interval},
        model={"path": str(demo_model), "device": "cpu", "quantization": "none",
               "image_size": 512,
               # Fixed length; no word twice, or the random demo weights repeat themselves and
               # the worker rejects the draft as degenerate.
               "generation": {"max_new_tokens": tokens, "min_new_tokens": tokens,
                              "no_repeat_ngram_size": 1}},
        destinations=[{"name": "pacs", "ae_title": pacs.AE_TITLE, "host": "127.0.0.1",
                       "port": pacs.DICOM_PORT}],
    )


class NodeDatabase:
    """Read-only looks at the running node's SQLite database (WAL: readers do not block it)."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self, sql: str, *args: object) -> list[sqlite3.Row]:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def sent(self, study_uids: Sequence[str]) -> bool:
        marks = ",".join("?" * len(study_uids))
        states = self.rows(f"SELECT state, reason FROM studies WHERE study_uid IN ({marks})",
                           *study_uids)
        failed = [r for r in states if r["state"] in ("failed", "skipped")]
        if failed:
            raise RuntimeError(f"a study ended {failed[0]['state']} instead of sent: "
                               f"{failed[0]['reason']}")
        return len(states) == len(study_uids) and all(r["state"] == "sent" for r in states)

    def latency(self, study_uid: str, settle: float) -> Latency:
        [study] = self.rows("SELECT revision FROM studies WHERE study_uid = ?", study_uid)
        last = self.rows("SELECT MAX(received_at) AS at FROM instances WHERE study_uid = ?",
                         study_uid)[0]["at"]
        moves = {r["state"]: r for r in self.rows(
            "SELECT state, reason, at FROM transitions WHERE study_uid = ? AND revision = ? "
            "ORDER BY id", study_uid, study["revision"])}
        [job] = self.rows("SELECT * FROM jobs WHERE study_uid = ? AND state = 'done' "
                          "ORDER BY id DESC LIMIT 1", study_uid)
        [row] = self.rows("SELECT delivered_at FROM outbox WHERE study_uid = ? AND "
                          "state = 'delivered'", study_uid)
        timings = json.loads(job["result"])["timings"]
        generate = float(timings["generate_seconds"])
        stable = moves["stable"]
        intended = settle if stable["reason"].startswith("no new instance") else 0.0
        total = row["delivered_at"] - last
        return Latency(
            intended_settle=intended,
            assembler_delay=stable["at"] - last - intended,
            queue_wait=job["submitted_at"] - stable["at"],
            worker_round_trip=job["finished_at"] - job["submitted_at"] - generate,
            generate=generate,
            sr_build=moves["reported"]["at"] - job["finished_at"],
            send=row["delivered_at"] - moves["reported"]["at"],
            total=total,
            node_overhead=total - intended - generate,
            batch_size=int(timings["batch_size"]),
        )


def study_uid_of(files: Sequence[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def make_studies(folder: Path, count: int) -> list[list[Path]]:
    """Alternately one view (PA) and two views (PA + lateral), 256 x 256, distinct UIDs."""
    studies = []
    for index in range(count):
        target = folder / f"study-{index:04d}"
        target.mkdir(parents=True)
        views = ["PA"] if index % 2 == 0 else ["PA", "LL"]
        studies.append(write_study(target, views, seed=index, rows=256, columns=256))
    return studies


def send_and_wait(node: NodeProcess, db: NodeDatabase, ns_name: str,
                  studies: Sequence[list[Path]], timeout: float) -> list[str]:
    """Send the studies in one association, in order; wait until every one is sent."""
    files = [f for study in studies for f in study]
    answers = storescu(node.port, files, netns=ns_name)
    refused = [a for a in answers.values() if a != "Success"]
    if refused:
        raise RuntimeError(f"the node refused {len(refused)} images: {refused[0]}")
    uids = [study_uid_of(study) for study in studies]
    wait_until(lambda: db.sent(uids), timeout, f"{len(uids)} studies sent to Orthanc",
               interval=0.05)
    return uids


def run_mode(node: NodeProcess, db: NodeDatabase, ns_name: str, studies: list[list[Path]],
             one_at_a_time: bool, settle: float) -> list[Latency]:
    uids: list[str] = []
    if one_at_a_time:
        for index, study in enumerate(studies):
            wait_for_quiet(limit=0.3, timeout=30)
            uids += send_and_wait(node, db, ns_name, [study], timeout=settle + 120)
            if (index + 1) % 10 == 0:
                progress(f"one at a time: {index + 1} of {len(studies)} sent")
    else:
        wait_for_quiet(limit=0.3, timeout=60)
        uids = send_and_wait(node, db, ns_name, studies, timeout=settle + 10 * len(studies) + 120)
    return [db.latency(uid, settle) for uid in uids]


def bare_send_seconds(pacs: Orthanc, reports: Sequence[Path]) -> list[float]:
    """One association + C-STORE + release per SR by the node's own DicomStore, no outbox:
    the part of the 'send' phase that is the network and the PACS."""
    from cxr_node.destinations import Draft
    from cxr_node.destinations.dicom import DicomDestination, DicomStore

    store = DicomStore(DicomDestination(name="pacs", ae_title=pacs.AE_TITLE, host="127.0.0.1",
                                        port=pacs.DICOM_PORT), "CXR_NODE")

    def once(path: Path) -> float:
        started = time.perf_counter()
        delivery = store.send(Draft(path.stem, "benchmark", {"sr": path}))
        if delivery.outcome != "delivered":
            raise RuntimeError(f"Orthanc did not take {path.name}: {delivery.reason}")
        return time.perf_counter() - started

    return [pacs.ns.call(once, path) for path in reports]


def summary(results: dict[str, list[Latency]], bare_send: Sequence[float], settle: float,
            tokens: int, poll_interval: float) -> str:
    headers = ["seconds"]
    for mode in results:
        headers += [f"{mode} p50", f"{mode} p95"]
    rows = []
    for phase, label in PHASES.items():
        row: list[object] = [label]
        for latencies in results.values():
            values = [getattr(lat, phase) for lat in latencies]
            row += [round(median(values), 3), round(percentile(values, 95), 3)]
        rows.append(row)
    rows.append(["(reference, no node) one SR straight to Orthanc"]
                + [round(median(bare_send), 3), round(percentile(bare_send, 95), 3)] * len(results))
    row = ["studies per generate call (p50, max)"]
    for latencies in results.values():
        sizes = [lat.batch_size for lat in latencies]
        row += [f"{median(sizes):g}", max(sizes)]
    rows.append(row)
    overhead_p95 = {mode: percentile([lat.node_overhead for lat in lats], 95)
                    for mode, lats in results.items()}
    verdict = ", ".join(f"{mode} {'meets' if p95 <= OVERHEAD_TARGET_SECONDS else 'misses'} it "
                        f"({p95 * 1000:.0f} ms)" for mode, p95 in overhead_p95.items())
    counts = ", ".join(f"{len(lats)} {mode}" for mode, lats in results.items())
    title = (f"End to end ({counts}; settle {settle:g} s for one-view studies, {tokens} new "
             f"tokens, embedded broker, local worker, poll interval {poll_interval:g} s). Target "
             f"node overhead p95 <= {OVERHEAD_TARGET_SECONDS * 1000:.0f} ms: {verdict}. "
             f"{machine_summary()}")
    return table(headers, rows, title)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    parser.add_argument("--studies", type=int, default=50, help="studies per mode (default 50)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="study.settle_seconds (default 2)")
    parser.add_argument("--tokens", type=int, default=48,
                        help="new tokens per draft, min = max (default 48, the most that "
                             "config/single-machine.yaml allows)")
    default_poll = QueueConfig().poll_interval_seconds
    parser.add_argument("--poll-interval", type=float, default=default_poll,
                        help="queue.poll_interval_seconds: how often idle stages look for work "
                             f"(default {default_poll:g}, the product default)")
    parser.add_argument("--modes", default="one-at-a-time,burst",
                        help="one-at-a-time, burst or both (default both)")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"one-at-a-time", "burst"}:
        parser.error(f"--modes: one-at-a-time and/or burst, got {args.modes!r}")
    if args.quick:
        args.studies, args.settle = 5, 1.0
    if args.studies < 2:
        parser.error("--studies: at least 2 (one of each kind)")
    from workers.demo import build_demo_model  # imports torch: only once the arguments are good

    with scratch(args, "cxr-bench-e2e-") as work:
        demo = build_demo_model(work / "demo-model")
        with running_orthanc(work / "pacs") as pacs:
            config = node_config(work, pacs, demo, args.settle, args.tokens, args.poll_interval)
            with NodeProcess(config, netns=pacs.ns.name) as node:
                db = NodeDatabase(node.state_dir / "cxr-node.sqlite3")
                progress("warm-up study (the local worker starts and loads the model)")
                send_and_wait(node, db, pacs.ns.name, make_studies(work / "warmup", 2), 300)
                results: dict[str, list[Latency]] = {}
                for mode in modes:
                    progress(f"{mode}: {args.studies} studies")
                    studies = make_studies(work / mode, args.studies)
                    started = time.perf_counter()
                    results[mode] = run_mode(node, db, pacs.ns.name, studies,
                                             mode == "one-at-a-time", args.settle)
                    progress(f"{mode}: done in {time.perf_counter() - started:.1f} s")
                reports = sorted((node.state_dir / "reports").glob("*/*.dcm"))[:20]
            delivered = len(pacs.instances())
            expected = 2 + sum(len(r) for r in results.values())  # SRs; images stay on the node
            if delivered != expected:
                raise RuntimeError(f"Orthanc holds {delivered} instances, expected {expected} SRs")
            bare_send = bare_send_seconds(pacs, reports)
    print(summary(results, bare_send, args.settle, args.tokens, args.poll_interval))
    return 0


if __name__ == "__main__":
    sys.exit(main())
