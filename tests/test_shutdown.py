"""Graceful stop: what systemd does on `systemctl stop` (SIGTERM to the node, KillMode=mixed).

The node stops accepting, lets associations in flight finish within node.network_timeout_seconds
(then aborts them), stops its local worker with Celery's warm shutdown, and exits 0, leaving no
process behind. Nothing acknowledged to a modality and no draft in progress is lost.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pydicom
import pytest
from dicomgen import same_dataset, write_study
from nodeproc import (
    NodeProcess,
    parse_storescu,
    storescu,
    storescu_in_background,
    wait_for,
    write_config,
)
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

pytestmark = pytest.mark.slow

SUCCESS = "Success"


def sigterm_and_wait(node: NodeProcess, timeout: float) -> tuple[int, float]:
    """SIGTERM to the node's main process only, as KillMode=mixed sends it; (exit code, seconds)."""
    assert node.proc is not None
    started = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    code = node.proc.wait(timeout)
    return code, time.monotonic() - started


def session_processes(session: int) -> list[str]:
    """Processes still alive in the node's session (receivers, worker, Celery pool children)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[3]) == session and fields[0] != "Z":  # fields[3]: session id
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            alive.append(f"{stat.parent.name} (parent {fields[1]}, {fields[0]}): {command[:150]}")
    return alive


def assert_whole(node: NodeProcess, files: list[Path]) -> None:
    """Each file has exactly one index row, and the spooled copy holds the whole dataset sent."""
    for f in files:
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        rows = node.db("SELECT path FROM instances WHERE sop_instance_uid = ?", uid)
        assert len(rows) == 1, f
        assert same_dataset(Path(rows[0]["path"]), f), f


def test_sigterm_mid_transfer_finishes_the_association_and_exits_0(tmp_path: Path, request):
    source = tmp_path / "send"
    source.mkdir()
    files = [f for i in range(15) for f in write_study(
        source, ["PA", "LL"], seed=i, rows=1024, columns=1024)]
    grace = 30
    config = write_config(tmp_path, node={"network_timeout_seconds": grace})
    node = NodeProcess(config).start()
    request.addfinalizer(node.kill)
    sender = storescu_in_background(node.port, files)
    assert wait_for(lambda: len(node.events("instance.stored")) >= 4, 60)
    code, seconds = sigterm_and_wait(node, grace + 30)
    out, _ = sender.communicate(timeout=60)
    responses = parse_storescu(out)
    acknowledged = [Path(f) for f, status in responses.items() if status == SUCCESS]
    assert code == 0, node.log()[-3000:]
    assert seconds < grace, seconds
    # the association in flight was let finish: every file sent and acknowledged, none refused
    assert len(acknowledged) == len(files), out[-2000:]
    assert "Releasing Association" in out and "Association Aborted" not in out
    stopping = node.events("node.stopping")[0]["timestamp"]  # ISO 8601 UTC: compares as text
    assert sum(e["timestamp"] > stopping for e in node.events("instance.stored")) >= 5
    assert wait_for(lambda: not session_processes(node.proc.pid), 10), \
        session_processes(node.proc.pid)
    assert node.events("receiver.stopped") and node.events("node.stopped")

    with NodeProcess(config) as node:
        assert_whole(node, acknowledged)
        assert len(node.db("SELECT 1 FROM instances")) == len(files)
        assert not list((node.state_dir / "spool").rglob(".tmp-*"))


def test_an_association_longer_than_the_grace_is_aborted_and_the_node_still_exits_0(
    tmp_path: Path, request
):
    """A peer that keeps its association busy past the grace: aborted, node exits 0 in time."""
    source = tmp_path / "send"
    source.mkdir()
    [image] = write_study(source, ["PA"], rows=64, columns=64)
    grace = 3
    config = write_config(tmp_path, node={"network_timeout_seconds": grace, "receivers": 1})
    node = NodeProcess(config).start()
    request.addfinalizer(node.kill)
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXR_NODE")
    assert assoc.is_established
    assert assoc.send_c_store(image).Status == 0x0000

    def keep_busy() -> None:  # never idle, so only the node's stop grace can end it
        while assoc.is_established:
            assoc.send_c_echo()
            time.sleep(0.3)

    busy = threading.Thread(target=keep_busy, daemon=True)
    busy.start()
    code, seconds = sigterm_and_wait(node, grace + 30)
    busy.join(10)
    assert code == 0, node.log()[-3000:]
    assert grace - 0.5 <= seconds < grace + 8, seconds
    assert assoc.is_aborted
    assert any(e["how"] == "aborted" for e in node.events("association.ended"))
    with NodeProcess(config) as node:
        assert_whole(node, [image])


def test_sigterm_while_the_local_worker_drafts_loses_nothing_and_leaves_no_process(
    tmp_path: Path, cxr_dir: Path, demo_model: Path, request
):
    slow = {"max_new_tokens": 400, "min_new_tokens": 400, "no_repeat_ngram_size": 2}
    config = write_config(
        tmp_path,
        queue={"local_worker": True, "task_time_limit_seconds": 120},
        model={"path": str(demo_model), "device": "cpu", "quantization": "none",
               "image_size": 256, "generation": slow},
        destinations=[{"name": "folder", "folder": str(tmp_path / "sr-out")}],
    )
    node = NodeProcess(config).start()
    request.addfinalizer(node.kill)
    assert set(storescu(node.port, [cxr_dir / "CR-MONO1-10-chest.dcm"]).values()) == {SUCCESS}
    assert wait_for(lambda: node.states() == ["drafting"], 120), node.log()[-3000:]
    # the node, two receivers, the Celery worker and its pool child, all in the node's session
    assert len(session_processes(node.proc.pid)) >= 5, session_processes(node.proc.pid)
    code, seconds = sigterm_and_wait(node, 120 + 60)
    assert code == 0, node.log()[-3000:]
    assert seconds < 120, seconds  # the worker's draft, then its exit: well inside its time limit
    # multiprocessing's resource tracker ends when it sees the node gone: give it a moment
    assert wait_for(lambda: not session_processes(node.proc.pid), 10), \
        session_processes(node.proc.pid)
    finished_before_exit = "draft task done" in node.log()

    with NodeProcess(config) as node:
        assert wait_for(lambda: node.states() == ["sent"], 240), node.log()[-3000:]
        jobs = [(j["attempt"], j["state"]) for j in node.db("SELECT * FROM jobs ORDER BY id")]
        reports = node.db("SELECT 1 FROM reports")
    assert len(list((tmp_path / "sr-out").glob("*.dcm"))) == 1
    assert len(reports) == 1
    # Celery's warm shutdown finished the draft in hand before the node exited; the restarted
    # node took that result, or (if it re-queued the job first) drafted once more: one SR either way
    assert finished_before_exit, node.log()[-3000:]
    assert jobs in ([(1, "done")], [(1, "lost"), (2, "done")]), jobs
