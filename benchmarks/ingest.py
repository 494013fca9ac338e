"""Ingest throughput: large chest X-rays into cxr-node (fsync on) and into dcmtk storescp.

Both receivers run inside one private network namespace (storescp cannot bind to loopback only),
are sent the same files by dcmtk's storescu from that namespace with 1, 4 and 8 concurrent
associations (the files split across storescu processes, a study's two images in one association),
and are measured in alternating runs, each against a freshly started receiver. Both announce
128 KiB as their largest PDU, so storescu sends both the same PDUs.

What the node does meanwhile: receive, fsync, index and assemble; the routing rules then *skip*
each study (modality DX only; the files are CR), so no drafting competes for the CPU, while the
pipeline threads poll as in production. storescp only writes to the page cache (it has no fsync
option): "sync after" is the write-back it leaves behind, and "images/s incl. sync" counts it.
At the highest load, `storescp --ignore` (receives, stores nothing) shows the most any receiver
can take from these senders on this machine.

    .venv/bin/python benchmarks/ingest.py              # the tables in benchmarks/README.md
    .venv/bin/python benchmarks/ingest.py --quick      # smoke run, < 1 min
    .venv/bin/python benchmarks/ingest.py --soak       # 1,000 images into one node: RSS flat?
    .venv/bin/python benchmarks/ingest.py --profile    # + where one receiver process spends it

Needs root (ip netns) and dcmtk; --profile uses perf and/or py-spy, whichever is there.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import (
    CLOCK_TICKS,
    MIB,
    TreeMonitor,
    add_common_options,
    alternating,
    machine_summary,
    median,
    positive_ints,
    progress,
    scratch,
    settle_disk,
    table,
    tree_usage,
    wait_for_quiet,
    wait_until,
)
from dicomgen import make_cxr
from nodeproc import STORESCU, NodeProcess, parse_storescu, write_config
from pacs import NetworkNamespace
from pydicom.uid import generate_uid

STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
STORESCP_NAME = "storescp --fork"
NULL_SINK_NAME = "storescp --fork --ignore (stores nothing)"
AE_TITLE = "CXR_NODE"  # both receivers answer to the same called AE title
NODE_PORT, STORESCP_PORT = 11112, 11113  # the namespace is private: fixed ports cannot collide
PDU_BYTES = 131072  # dcmtk's largest; announced by both receivers


# --- input files -------------------------------------------------------------------------------


def write_studies(folder: Path, count: int, rows: int, columns: int,
                  first: int = 0) -> list[list[Path]]:
    """``count`` 16-bit CR images in studies of two (PA, lateral), sharing one random pixel array.

    Every file has UIDs of its own, so the node stores each one (no duplicate shortcut).
    """
    if count < 1 or rows < 1 or columns < 1:
        raise ValueError(f"need at least one image of at least 1x1, got {count} of "
                         f"{rows}x{columns}")
    folder.mkdir(parents=True, exist_ok=True)
    ds = make_cxr(generate_uid(), rows=rows, columns=columns, seed=first)
    studies: list[list[Path]] = []
    for index in range(first, first + count):
        if index % 2 == 0 or not studies:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            studies.append([])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ViewPosition = "PA" if index % 2 == 0 else "LL"
        ds.InstanceNumber = index % 2 + 1
        path = folder / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        studies[-1].append(path)
    return studies


def split(studies: Sequence[list[Path]], associations: int) -> list[list[Path]]:
    """Studies dealt round-robin to ``associations`` senders (fewer if there are fewer studies)."""
    groups: list[list[Path]] = [[] for _ in range(associations)]
    for index, study in enumerate(studies):
        groups[index % associations].extend(study)
    return [g for g in groups if g]


# --- receivers under test ----------------------------------------------------------------------


class Receiver(ABC):
    """A receiver under test, started fresh (empty state) inside the namespace for each run."""

    name: str
    port: int

    @abstractmethod
    def start(self) -> int:
        """Start and wait until it answers; the pid whose process tree is measured."""

    @abstractmethod
    def stop(self) -> None:
        """Stop it and remove everything it wrote."""


class CxrNode(Receiver):
    """`cxr-node serve` as the tests run it, with the ingest settings under test."""

    def __init__(self, ns: NetworkNamespace, workdir: Path, receivers: int, fsync: bool = True):
        self.ns = ns
        self.workdir = workdir
        self.receivers = receivers
        self.fsync = fsync
        self.name = f"cxr-node r={receivers}" + ("" if fsync else " fsync off")
        self.port = NODE_PORT
        self.node: NodeProcess | None = None

    def start(self) -> int:
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        config = write_config(
            self.workdir,
            node={"ae_title": AE_TITLE, "port": self.port, "receivers": self.receivers,
                  "fsync": self.fsync, "max_pdu_bytes": PDU_BYTES, "min_free_disk_mb": 512},
            study={"settle_seconds": 2, "max_wait_seconds": 60, "rules": {"modalities": ["DX"]}},
            queue={"local_worker": False},
        )
        self.node = NodeProcess(config, netns=self.ns.name).start()
        assert self.node.proc is not None
        return self.node.proc.pid

    def receiver_pids(self) -> list[int]:
        """The receiver processes: the node's multiprocessing (spawn) children."""
        assert self.node is not None and self.node.proc is not None
        pids = []
        for children in Path(f"/proc/{self.node.proc.pid}/task").glob("*/children"):
            for pid in children.read_text().split():
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(int(pid))
        return pids

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
            self.node.kill()
            self.node = None
        shutil.rmtree(self.workdir, ignore_errors=True)


class StoreSCP(Receiver):
    """dcmtk's storescp, one forked process per association, writing into a folder.

    With ``ignore`` it receives every byte and answers Success but stores nothing: no receiver
    that keeps the data can beat it, so it is the ceiling the senders set on this machine.
    """

    def __init__(self, ns: NetworkNamespace, workdir: Path, ignore: bool = False):
        self.ns = ns
        self.workdir = workdir
        self.ignore = ignore
        self.name = NULL_SINK_NAME if ignore else STORESCP_NAME
        self.port = STORESCP_PORT
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        shutil.rmtree(self.workdir, ignore_errors=True)
        out = self.workdir / "out"
        out.mkdir(parents=True)
        self.proc = subprocess.Popen(
            self.ns.command([STORESCP, "--fork", *(["--ignore"] if self.ignore else []),
                             "-aet", AE_TITLE, "-pdu", str(PDU_BYTES), "-od", str(out),
                             str(self.port)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(self._answers, 30, "storescp answering C-ECHO", interval=0.1)
        return self.proc.pid

    def _answers(self) -> bool:
        echo = [ECHOSCU, "-aec", AE_TITLE, "127.0.0.1", str(self.port)]
        return subprocess.run(self.ns.command(echo), capture_output=True).returncode == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)


# --- one run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    receiver: str
    associations: int
    images: int
    megabytes: float
    seconds: float
    failures: int
    cpu_seconds: float
    rss_peak_mib: float
    sync_after_seconds: float
    background_busy: float  # other work on the machine just before the run (0..1)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def images_per_second_with_sync(self) -> float:
        return self.images / (self.seconds + self.sync_after_seconds)

    @property
    def mb_per_second(self) -> float:
        return self.megabytes / self.seconds


def send(ns: NetworkNamespace, port: int, groups: Sequence[Sequence[Path]]) -> tuple[float, int]:
    """One storescu per group, all at once; (seconds until the last exits, files not stored)."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(ns.command([STORESCU, "-v", "-aet", "MODALITY1", "-aec", AE_TITLE,
                                     "127.0.0.1", str(port), *map(str, group)]),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for group in groups
    ]
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    seconds = time.perf_counter() - started
    stored = sum(Counter(parse_storescu(out).values())["Success"] for out in outputs)
    return seconds, sum(map(len, groups)) - stored


def measure(ns: NetworkNamespace, receiver: Receiver, groups: Sequence[Sequence[Path]]) -> Run:
    """Send ``groups`` to a fresh ``receiver``; the disk is synced before and after."""
    settle_disk()
    root = receiver.start()
    try:
        background = wait_for_quiet()
        with TreeMonitor(root) as monitor:
            seconds, failures = send(ns, receiver.port, groups)
            time.sleep(0.2)  # the receiver finishes the releases
        sync_after = settle_disk()  # before the files are removed, which would cancel it
    finally:
        receiver.stop()
    files = [f for g in groups for f in g]
    return Run(
        receiver=receiver.name, associations=len(groups), images=len(files),
        megabytes=sum(f.stat().st_size for f in files) / 1e6, seconds=seconds, failures=failures,
        cpu_seconds=monitor.cpu_seconds, rss_peak_mib=monitor.peak_rss / MIB,
        sync_after_seconds=sync_after, background_busy=background,
    )


# --- throughput --------------------------------------------------------------------------------


def throughput(args: argparse.Namespace, studies: list[list[Path]], work: Path,
               ns: NetworkNamespace) -> list[Run]:
    node = CxrNode(ns, work / "node", args.receivers[0])
    reference = StoreSCP(ns, work / "storescp")
    runs: list[Run] = []
    for associations in args.associations:
        variants: list[Receiver] = [node, reference]
        if associations == max(args.associations):  # what node settings change at the top load
            variants += [CxrNode(ns, work / "node", r) for r in args.receivers[1:]]
            variants.append(StoreSCP(ns, work / "storescp", ignore=True))
            if args.fsync_off:
                variants.append(CxrNode(ns, work / "node", args.receivers[0], fsync=False))
        groups = split(studies, associations)
        for repeat, receiver in alternating(variants, args.repeats):
            run = measure(ns, receiver, groups)
            runs.append(run)
            progress(f"{associations} assoc, {run.receiver}, run {repeat + 1}: "
                     f"{run.images_per_second:.1f} images/s, {run.failures} failed")
    return runs


def throughput_table(runs: Sequence[Run]) -> str:
    by: dict[tuple[int, str], list[Run]] = defaultdict(list)
    for run in runs:
        by[(run.associations, run.receiver)].append(run)
    rows = []
    def order(key: tuple[int, str]) -> tuple[int, bool, str]:
        return key[0], key[1] not in (STORESCP_NAME, NULL_SINK_NAME), key[1]  # dcmtk first

    for (associations, receiver), group in sorted(by.items(), key=lambda kv: order(kv[0])):
        ips = median([r.images_per_second for r in group])
        reference = by.get((associations, STORESCP_NAME))
        ratio = with_sync = "-"
        if reference and receiver not in (STORESCP_NAME, NULL_SINK_NAME):
            ratio = f"{ips / median([r.images_per_second for r in reference]):.2f}"
            with_sync = f"{ips / median([r.images_per_second_with_sync for r in reference]):.2f}"
        rows.append([
            associations, receiver, len(group), ips,
            median([r.images_per_second_with_sync for r in group]),
            round(median([r.mb_per_second for r in group])), ratio, with_sync,
            median([r.cpu_seconds for r in group]), round(median([r.rss_peak_mib for r in group])),
            median([r.sync_after_seconds for r in group]), sum(r.failures for r in group),
            f"{max(r.background_busy for r in group):.0%}",
        ])
    first = runs[0]
    title = (f"Ingest: {first.images} images of {first.megabytes / first.images:.1f} MB per run, "
             f"medians of alternating runs; {machine_summary()}")
    return table(["assoc", "receiver", "runs", "images/s", "images/s incl. sync", "MB/s",
                  "x storescp", "x storescp incl. sync", "CPU s", "peak RSS MiB",
                  "sync after s", "failed", "busy before (max)"], rows, title)


# --- where a receiver spends its time ----------------------------------------------------------

# py-spy (Python-level, wall time of non-idle threads): (label, frames); the first match wins.
PY_SPY_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("C-STORE: fsync + rename into the spool (durable.move_durably)", ("move_durably (",)),
    ("C-STORE: SQLite index + commit (Store.record_instance)",
     ("record_instance (", "copies_of (")),
    ("C-STORE: header parse + pixel check (Header.parse)", ("parse (cxr_node/part10.py",)),
    ("C-STORE: compare with kept copies, logging, audit (rest of on_c_store)", ("on_c_store (",)),
    ("socket: waiting for and reading PDUs (BulkReadSocket)",
     ("ready (cxr_node/transport.py", "recv (cxr_node/transport.py")),
    ("PDU decode + DIMSE reassembly, fragments written to the incoming file (pynetdicom)",
     ("_decode_pdu (", "decode_msg (", "do_action (")),
    ("pynetdicom reactor loops (waits, then the GIL)", ("|leaf:run_reactor", "|leaf:_run_reactor")),
)

# perf (on-CPU time, kernel included), matched against "dso symbol"; the first match wins.
# Kernel marks start with "] ", the end of the "[kernel.kallsyms]" dso name.
PERF_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kernel: copy into the page cache + ext4 (writing the spool file)",
     ("] copy_folio_from_iter", "] ext4_", "] block_commit_write", "] mpage_", "] filemap_",
      "] folio")),
    ("kernel: page faults on fresh buffers",
     ("] exc_page_fault", "] clear_page", "] handle_mm_fault", "] memcg", "] do_anonymous_page")),
    ("kernel: TCP receive (copy to user)", ("] _copy_to_iter", "] tcp_", "] skb", "] sock_")),
    ("kernel: scheduling, sleeps, futex (GIL hand-offs)",
     ("] finish_task_switch", "] schedule", "] futex", "] nanosleep",
      "] _raw_spin_unlock_irqrestore")),
    ("memory copies (libc memmove)", ("memmove", "memcpy")),
    ("malloc / free (libc, Python)",
     ("malloc", "_int_free", "cfree", "_PyObject_Free", "_int_malloc")),
    ("SQLite", ("sqlite",)),
    ("Python interpreter (pynetdicom, pydicom, node code)", ("libpython", "python3")),
    ("kernel: other", ("[kernel",)),
)

PERF_LINE = re.compile(r"^\s*[\d.]+%\s+(\d+)\s+(\S+)\s+\[(.)\]\s+(.+?)\s*$")


def shares(samples: Iterable[tuple[str, int]],
           rules: Sequence[tuple[str, Sequence[str]]]) -> Counter[str]:
    """Samples per rule label; ``samples`` are (text to match, count)."""
    out: Counter[str] = Counter()
    for text, count in samples:
        label = next((label for label, marks in rules if any(m in text for m in marks)), "other")
        out[label] += count
    return out


def py_spy_samples(raw: str) -> Iterator[tuple[str, int]]:
    """(stack + "|leaf:" + innermost function, count) from py-spy's raw (collapsed) output."""
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            leaf = stack.rsplit(";", 1)[-1].split(" (", 1)[0]
            yield f"{stack}|leaf:{leaf}", int(count)


def perf_samples(data: Path, perf: str) -> Iterator[tuple[str, int]]:
    """("dso symbol", count) from perf report."""
    report = subprocess.run([perf, "report", "-i", str(data), "--stdio", "-n", "--no-children",
                             "--sort", "dso,sym", "-g", "none"], capture_output=True, text=True,
                            check=True).stdout
    for line in report.splitlines():
        if match := PERF_LINE.match(line):
            yield f"{match.group(2)} {match.group(4)}", int(match.group(1))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def share_table(counts: Counter[str], header: str, title: str) -> str:
    total = sum(counts.values()) or 1
    rows = [[label, f"{100 * n / total:.0f}%"] for label, n in counts.most_common()]
    return table([header, "share"], rows, title)


def profile(py_spy: str | None, perf: str | None, node: CxrNode,
            send_all: Callable[[int], tuple[float, int]], work: Path) -> str:
    """One run with the receiver processes profiled: perf (on-CPU, kernel included) and py-spy
    (Python stacks; non-blocking, so it does not stop the receiver while it samples)."""
    node.start()
    try:
        wait_for_quiet()
        pids = node.receiver_pids()
        before = {pid: cpu_split(pid) for pid in pids}
        tools = []
        if perf:
            tools.append(subprocess.Popen(
                [perf, "record", "-F", "999", "-o", str(work / "perf.data"),
                 "-p", ",".join(map(str, pids))],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if py_spy:
            tools += [subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking",
                 "--format", "raw", "--output", str(work / f"py-spy-{pid}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids]
        time.sleep(1.0)  # the profilers attach
        seconds, failures = send_all(node.port)
        after = {pid: cpu_split(pid) for pid in pids}
        for tool in tools:
            tool.send_signal(signal.SIGINT)
        for tool in tools:
            tool.wait(timeout=120)
    finally:
        node.stop()
    user = sum(after[p][0] - before[p][0] for p in pids)
    system = sum(after[p][1] - before[p][1] for p in pids)
    what = (f"{node.name}, {len(pids)} receiver processes, one run of {seconds:.1f} s "
            f"({failures} failed); receivers' CPU {user:.1f} s user + {system:.1f} s system")
    out = []
    if perf:
        out.append(share_table(shares(perf_samples(work / "perf.data", perf), PERF_RULES),
                               "on-CPU time of the receiver processes (perf)",
                               f"Receiver CPU profile: {what}"))
    if py_spy:
        busiest = max(pids, key=lambda p: sum(after[p]) - sum(before[p]))
        raw = (work / f"py-spy-{busiest}.txt").read_text()
        out.append(share_table(shares(py_spy_samples(raw), PY_SPY_RULES),
                               "non-idle samples of the busiest receiver process (py-spy)",
                               f"Receiver Python profile: {what}"))
    return "\n".join(out)


# --- soak --------------------------------------------------------------------------------------


def soak(args: argparse.Namespace, work: Path, ns: NetworkNamespace) -> str:
    """``args.soak_images`` images, written and sent in chunks, into one node; RSS after each."""
    node = CxrNode(ns, work / "node", args.receivers[0])
    root = node.start()
    associations = max(args.associations)
    try:
        start = tree_usage(root)
        rows = [[0, round(start.rss_bytes / MIB), start.cpu_seconds, start.processes, "-"]]
        sent = 0
        while sent < args.soak_images:
            count = min(args.soak_chunk, args.soak_images - sent)
            studies = write_studies(work / "chunk", count, args.rows, args.columns, first=sent)
            seconds, failures = send(ns, node.port, split(studies, associations))
            shutil.rmtree(work / "chunk")
            sent += count
            usage = tree_usage(root)
            rows.append([sent, round(usage.rss_bytes / MIB), usage.cpu_seconds,
                         usage.processes, f"{count / seconds:.1f} images/s, {failures} failed"])
            progress(f"soak: {sent} images sent, node RSS {usage.rss_bytes / MIB:.0f} MiB")
    finally:
        node.stop()
    return table(["images sent", "node RSS MiB", "node CPU s", "processes", "this chunk"], rows,
                 f"Soak: {args.soak_images} images of {args.rows}x{args.columns} into one "
                 f"{node.name}, {associations} associations per chunk of {args.soak_chunk}; "
                 f"{machine_summary()}")


# --- main --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    parser.add_argument("--images", type=int, default=64, help="images per run (default 64)")
    parser.add_argument("--rows", type=int, default=2500, help="image rows (default 2500)")
    parser.add_argument("--columns", type=int, default=2048, help="image columns (default 2048)")
    parser.add_argument("--associations", type=positive_ints, default=[1, 4, 8],
                        help="concurrent associations (default 1,4,8)")
    parser.add_argument("--receivers", type=positive_ints, default=[4, 2, 8],
                        help="node.receivers: the first throughout, the others also tried at the "
                             "highest association count (default 4,2,8)")
    parser.add_argument("--no-fsync-off", dest="fsync_off", action="store_false",
                        help="skip the node.fsync=false run at the highest association count")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant (default 3)")
    parser.add_argument("--soak", action="store_true", help="run the memory soak instead")
    parser.add_argument("--soak-images", type=int, default=1000)
    parser.add_argument("--soak-chunk", type=int, default=100,
                        help="images written and sent at once (default 100)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the receiver processes (perf and/or py-spy) in one "
                             "extra run at the highest association count")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy executable")
    parser.add_argument("--perf", default=shutil.which("perf"), help="perf executable")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rows, args.columns, args.repeats = 16, 1024, 1024, 1
        args.receivers, args.fsync_off = args.receivers[:1], False
        args.soak_images, args.soak_chunk = 40, 20
    if args.profile and not (args.py_spy or args.perf):
        parser.error("--profile needs perf (Debian: linux-perf) or py-spy (`pip install py-spy` "
                     "in any environment; --py-spy PATH if it is not on PATH)")
    with scratch(args, "cxr-bench-ingest-") as work, NetworkNamespace() as ns:
        if args.soak:
            print(soak(args, work, ns))
            return 0
        progress(f"writing {args.images} images of {args.rows}x{args.columns} (16-bit)")
        studies = write_studies(work / "images", args.images, args.rows, args.columns)
        runs = throughput(args, studies, work, ns)
        if args.profile:
            groups = split(studies, max(args.associations))
            print(profile(args.py_spy, args.perf, CxrNode(ns, work / "node", args.receivers[0]),
                          lambda port: send(ns, port, groups), work))
        print(throughput_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
