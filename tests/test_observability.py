"""Metrics, health check and audit trail, read off the real node the way operators read them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
import redis
from dicomgen import make_cxr, write_study
from nodeproc import (
    NodeProcess,
    free_port,
    run_storescu,
    storescu,
    wait_for,
    write_config,
)
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage
from redisserver import NODE_PASSWORD, REDIS_ENV, redis_queue

import cxr_node
from cxr_node import audit
from cxr_node.audit import AuditTrail, read_trail, study_history
from cxr_node.logs import study_key
from cxr_node.store import Study, StudyState
from cxr_node.web import CHECK_TIMEOUT_SECONDS

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def healthz(port: int) -> tuple[int, dict]:
    status, body = http_get(port, "/healthz")
    return status, json.loads(body)


def scrape(port: int) -> Samples:
    status, body = http_get(port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def http_config(tmp_path: Path, **sections: object) -> Path:
    return write_config(tmp_path, http={"enabled": True, "port": free_port()}, **sections)


def http_port(node: NodeProcess) -> int:
    return int(node.config["http"]["port"])


def counting_pids(node: NodeProcess) -> set[int]:
    """Processes that wrote counters into the node's multiprocess metrics folder."""
    return {int(p.stem.rsplit("_", 1)[1]) for p in (node.state_dir / "metrics").glob("counter_*.db")}


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* shows them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def c_store(port: int, ds: pydicom.Dataset) -> int:
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_NODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def audit_records(node: NodeProcess) -> list[dict]:
    trail = read_trail(node.state_dir / "audit.jsonl")
    assert trail.torn == 0
    return trail.records


# --- audit trail, in-process -------------------------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
from cxr_node.audit import AuditTrail
trail = AuditTrail(Path(sys.argv[1]))
name, count, pause = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
pad = "x" * 5000  # more than PIPE_BUF, and two pages
i = 0
while count < 0 or i < count:
    trail.append("test.line", {"writer": name, "seq": i, "pad": pad})
    if i == 0:
        print("writing", flush=True)
    i += 1
    time.sleep(pause)
"""
LINES = 1000


def writer(path: Path, name: str, count: int, pause: float = 0.0) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(count), str(pause)],
                            stdout=subprocess.PIPE, text=True)


def test_concurrent_writers_and_a_killed_one_leave_whole_lines(tmp_path: Path):
    path = tmp_path / "state" / "audit.jsonl"
    crasher = writer(path, "crash", -1, pause=0.0005)
    try:
        assert crasher.stdout and crasher.stdout.readline() == "writing\n"
        writers = [writer(path, f"w{i}", LINES) for i in range(3)]
        for w in writers:
            assert w.stdout and w.stdout.readline() == "writing\n"
    finally:  # killed while the others append
        crasher.send_signal(signal.SIGKILL)
        crasher.wait()
    for w in writers:
        assert w.wait(60) == 0
    assert path.stat().st_mode & 0o777 == 0o600
    trail = read_trail(path)
    assert trail.torn <= 1  # only the killed writer's last line can be cut, inside its write()
    by_writer: dict[str, list[int]] = {}
    for r in trail.records:
        assert r["event"] == "test.line" and len(r["pad"]) == 5000
        by_writer.setdefault(r["writer"], []).append(r["seq"])
    for name in ("w0", "w1", "w2"):
        assert by_writer[name] == list(range(LINES))
    crashed = by_writer["crash"]
    assert crashed == list(range(len(crashed))) and len(crashed) > 10

    # a line cut inside its write, with the next writer's record glued to it
    cut = b'{"at":"2030-01-01T00:00:00.000Z","event":"cut","pad":"xx'
    whole = b'{"at":"2030-01-01T00:00:01.000Z","event":"after"}\n'
    with path.open("ab") as fh:
        fh.write(cut + whole + cut)
    trail = read_trail(path)
    assert trail.records[-1]["event"] == "after"
    assert len(trail.records) == LINES * 3 + len(crashed) + 1


def test_audit_record_refuses_patient_attributes(tmp_path: Path):
    trail = AuditTrail(tmp_path / "audit.jsonl")
    with pytest.raises(ValueError, match="patient_name"):
        trail.append("study.sent", {"study_key": "abc", "patient_name": "DOE^JANE"})
    trail.close()
    assert (tmp_path / "audit.jsonl").read_bytes() == b""


def test_an_audit_event_that_fails_never_raises_into_the_pipeline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from prometheus_client import REGISTRY

    study = Study(study_uid="1.2.3", study_key=study_key("1.2.3"), state=StudyState.STABLE,
                  revision=1, reason=None, first_received_at=0, revision_started_at=0,
                  last_received_at=0, state_changed_at=0)
    monkeypatch.setattr(audit, "_trail", AuditTrail(tmp_path / "audit.jsonl"))
    audit.study_state(study, StudyState.QUEUED, patient_name="DOE^JANE")  # refused and logged
    audit.study_state(study, StudyState.QUEUED, job=7)
    [line] = read_trail(tmp_path / "audit.jsonl").records
    assert line["event"] == "study.queued" and line["job"] == 7 and line["study_key"] == study.study_key

    errors = "cxr_node_audit_write_errors_total"
    before = REGISTRY.get_sample_value(errors) or 0
    monkeypatch.setattr(audit, "_trail", AuditTrail(Path("/dev/full")))  # a disk that is full
    audit.study_state(study, StudyState.QUEUED, job=8)
    assert REGISTRY.get_sample_value(errors) == before + 1


def test_audit_command_prints_one_study_oldest_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from cxr_node.cli import main

    config = write_config(tmp_path)
    trail = AuditTrail(tmp_path / "state" / "audit.jsonl")
    study, other = {"study_key": "k1", "study_uid": "1.2.3"}, {"study_key": "k2", "study_uid": "1.2.4"}
    # processes append in the order they finish, not always in time order
    trail.append("study.stable", {**study, "revision": 1, "reason": "quiet"}, at=1_700_000_010)
    trail.append("instance.stored", {**study, "status": "0x0000"}, at=1_700_000_000)
    trail.append("instance.stored", {**other, "status": "0x0000"}, at=1_700_000_005)
    trail.append("study.sent", {**study, "revision": 1}, at=1_700_000_020)
    trail.close()

    trail = AuditTrail(tmp_path / "state" / "audit.jsonl")
    trail.append("instance.stored", {**study, "sop_instance_uid": "1.2.3.9"}, at=1_700_000_030)
    trail.close()

    assert main(["audit", "--config", str(config), "--study", "k1"]) == 0
    out = capsys.readouterr().out
    assert "1.2.3" not in out  # UIDs only on request
    assert main(["audit", "--config", str(config), "--study", "k1", "--phi"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("study k1  1.2.3  (4 events")
    assert "sop_instance_uid=1.2.3.9" in out[-1]
    events = [line.split()[2] for line in out[3:]]
    assert events == ["instance.stored", "study.stable", "study.sent", "instance.stored"]
    assert "reason=quiet" in out[4] and "revision=1" in out[4]
    assert main(["audit", "--config", str(config), "--study", "1.2.3",
                 "--since", "2023-11-14T22:13:31"]) == 0
    assert [line.split()[2] for line in capsys.readouterr().out.splitlines()[3:]] == [
        "study.sent", "instance.stored"]
    assert main(["audit", "--config", str(config), "--study", "nope"]) == 1
    assert "no audit record" in capsys.readouterr().err


# --- the real node -----------------------------------------------------------------------------


@pytest.mark.slow
def test_counters_add_up_across_receiver_processes(tmp_path: Path):
    """Stores in two receiver processes, rejections, quarantine: /metrics adds them all up."""
    source = tmp_path / "send"
    source.mkdir()
    config = http_config(tmp_path, accept=[{"ae_title": "MODALITY1", "network": "127.0.0.1/32"}],
                         study={"settle_seconds": 0.5, "max_wait_seconds": 60})
    with NodeProcess(config) as node:
        port = http_port(node)
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only
        receivers = node.receiver_pids()
        assert len(receivers) == 2
        assert wait_for(lambda: healthz(port)[0] == 200, 10), healthz(port)

        # one association per study, until both receiver processes have stored some
        sent: list[Path] = []
        while len(counting_pids(node) & receivers) < 2 and len(sent) < 30:
            [path] = write_study(source, ["PA"], seed=len(sent))
            assert storescu(node.port, [path]) == {str(path): "Success"}
            sent.append(path)
        assert len(counting_pids(node) & receivers) == 2
        first = pydicom.dcmread(sent[0])
        assert storescu(node.port, [sent[0]]) == {str(sent[0]): "Success"}  # duplicate
        conflict = make_cxr(first.StudyInstanceUID, series_uid=first.SeriesInstanceUID,
                            sop_uid=first.SOPInstanceUID, seed=999)
        assert c_store(node.port, conflict) == 0x0000
        short = make_cxr(generate_uid())
        short.PixelData = short.PixelData[: len(short.PixelData) // 2]
        assert c_store(node.port, short) == 0xC000
        for aet, aec in (("INTRUDER", "CXR_NODE"), ("MODALITY1", "WRONG")):
            out = run_storescu(["-aet", aet, "-aec", aec, "127.0.0.1", str(node.port),
                                str(sent[0])])
            assert "Association Rejected" in out

        samples = scrape(port)
        received = "cxr_node_instances_received_total"
        assert value(samples, received, outcome="stored") == len(sent)
        assert value(samples, received, outcome="duplicate") == 1
        assert value(samples, received, outcome="conflict") == 1
        assert value(samples, "cxr_node_instances_rejected_total", reason="quarantined",
                     status="0xC000") == 1
        assert value(samples, "cxr_node_associations_accepted_total") == len(sent) + 3
        rejected = "cxr_node_associations_rejected_total"
        assert value(samples, rejected, reason="unknown_calling_ae_or_address") == 1
        assert value(samples, rejected, reason="wrong_called_ae_title") == 1
        [build] = [dict(labels) for name, labels in samples if name == "cxr_node_build_info"]
        assert build["version"] == cxr_node.__version__ and build["pydicom"] == pydicom.__version__
        assert value(samples, "cxr_node_state_disk_free_bytes") > 0

        # gauges read from the database agree with it (compared while it stands still)
        def by_state() -> dict[str, int]:
            return {r[0]: r[1] for r in node.db("SELECT state, COUNT(*) FROM studies GROUP BY state")}

        def gauges_match_db() -> dict[str, int] | None:
            before, gauges, after = by_state(), scrape(port), by_state()
            if before != after or "receiving" in after:
                return None  # moving: compare again
            shown = {s: int(value(gauges, "cxr_node_studies", state=s)) for s in after}
            assert shown == after
            return after

        states = wait_for(gauges_match_db, 20)
        assert states and sum(states.values()) == len(sent), states
        def queued_jobs() -> int:  # no worker runs: what the queue stage submitted stays queued
            return node.db("SELECT COUNT(*) FROM jobs WHERE state = 'queued'")[0][0]

        queued = wait_for(queued_jobs, 20)
        assert queued > 0
        assert value(scrape(port), "cxr_node_queue_jobs", state="queued") == queued

        # a receiver killed: /healthz names it until its replacement listens, counts survive it
        victim = sorted(receivers)[0]
        os.kill(victim, signal.SIGKILL)
        def failing() -> dict | None:
            status, body = healthz(port)
            return body if status == 503 else None

        unhealthy = wait_for(failing, 5, 0.02)
        assert unhealthy and unhealthy["failing"] == ["receivers"], unhealthy
        assert "cxr-receiver-" in unhealthy["checks"]["receivers"]["detail"]
        assert wait_for(lambda: healthz(port)[0] == 200, 30), healthz(port)
        assert value(scrape(port), received, outcome="stored") == len(sent)
        assert victim not in node.receiver_pids()

    records = audit_records(node)
    events = [r["event"] for r in records]
    assert events.count("association.accepted") == len(sent) + 3
    assert events.count("instance.stored") == len(sent)
    rejected_lines = [r for r in records if r["event"] == "association.rejected"]
    assert {r["calling_ae"] for r in rejected_lines} == {"INTRUDER", "MODALITY1"}
    assert all(r["peer"] == "127.0.0.1" and r["reason"] for r in rejected_lines)
    [quarantined] = [r for r in records if r["event"] == "instance.quarantined"]
    assert quarantined["status"] == "0xC000" and "Pixel Data" in quarantined["reason"]
    [conflicting] = [r for r in records if r["event"] == "instance.conflict"]
    assert conflicting["sop_instance_uid"] == first.SOPInstanceUID
    assert conflicting["sop_class_uid"] == ComputedRadiographyImageStorage


@pytest.mark.slow
def test_healthz_names_the_disk_below_its_threshold(tmp_path: Path, cxr_dir: Path):
    with NodeProcess(http_config(tmp_path, node={"min_free_disk_mb": 10**9})) as node:
        port = http_port(node)
        status, body = healthz(port)
        assert status == 503 and body["failing"] == ["disk"], body
        assert "node.min_free_disk_mb" in body["checks"]["disk"]["detail"]
        assert body["checks"]["database"]["ok"] and body["checks"]["receivers"]["ok"]
        f = cxr_dir / "CR-MONO1-10-chest.dcm"
        assert storescu(node.port, [f]) == {str(f): "Refused: OutOfResources"}
        assert value(scrape(port), "cxr_node_instances_rejected_total", reason="out_of_resources",
                     status="0xA700") == 1
    [refused] = [r for r in audit_records(node) if r["event"] == "instance.refused"]
    assert refused["status"] == "0xA700" and refused["calling_ae"] == "MODALITY1"


@pytest.mark.slow
def test_healthz_names_the_broker_when_redis_stops(tmp_path: Path, redis_port: int):
    config = http_config(tmp_path, queue=redis_queue(redis_port, local_worker=False))
    with NodeProcess(config, env=REDIS_ENV) as node:
        port = http_port(node)
        status, body = healthz(port)
        assert status == 200, body
        assert "worker" not in body["checks"]  # workers run elsewhere with Redis
        client = redis.Redis(host="127.0.0.1", port=redis_port, username="admin",
                             password="admin-secret")
        try:
            client.shutdown(nosave=True)
        except redis.ConnectionError:
            pass  # the server went away while answering
        started = time.monotonic()
        status, body = healthz(port)
        assert time.monotonic() - started < CHECK_TIMEOUT_SECONDS + 1
        assert status == 503 and body["failing"] == ["broker"], body
        assert f"127.0.0.1:{redis_port}" in body["checks"]["broker"]["detail"]
        assert NODE_PASSWORD not in json.dumps(body)


@pytest.mark.slow
def test_a_drafted_study_leaves_its_whole_history(tmp_path: Path, demo_model: Path):
    source = tmp_path / "send"
    source.mkdir()
    files = write_study(source, ["PA", "LL"], rows=256, columns=256)
    uid = pydicom.dcmread(files[0]).StudyInstanceUID
    config = http_config(
        tmp_path, queue={"local_worker": True},
        model={"path": str(demo_model), "device": "cpu", "quantization": "none",
               "image_size": 256, "generation": {"max_new_tokens": 16}},
        destinations=[{"name": "folder", "folder": str(tmp_path / "sr-out")}])
    with NodeProcess(config) as node:
        port = http_port(node)
        assert set(storescu(node.port, files).values()) == {"Success"}
        assert wait_for(lambda: node.states() == ["sent"], 120), node.log()[-3000:]
        e2e = "cxr_node_end_to_end_seconds_count"
        assert wait_for(lambda: value(scrape(port), e2e) == 1, 10)  # counted just after the commit
        samples = scrape(port)
        status, health = healthz(port)
        assert status == 200 and health["checks"]["worker"]["ok"], health
    assert value(samples, "cxr_node_drafts_total", outcome="done") == 1
    for histogram in ("draft_generate_seconds", "draft_roundtrip_seconds", "end_to_end_seconds"):
        assert value(samples, f"cxr_node_{histogram}_count") == 1, histogram
    assert value(samples, "cxr_node_draft_roundtrip_seconds_sum") >= value(
        samples, "cxr_node_draft_generate_seconds_sum") > 0
    assert value(samples, "cxr_node_deliveries_total", destination="folder",
                 outcome="delivered") == 1
    assert value(samples, "cxr_node_outbox", destination="folder", state="dead") == 0

    assert audit_records(node)
    mine = study_history(node.state_dir / "audit.jsonl", uid).records
    events = [r["event"] for r in mine]
    # receivers and the main process append on their own: a study can be stable (both views in)
    # a moment before the receiver has written the second instance's line
    assert sorted(events[:3]) == ["instance.stored", "instance.stored", "study.stable"]
    assert events[3:] == ["study.queued", "study.drafted", "study.reported", "outbox.delivered",
                          "study.sent"]
    drafted = mine[4]
    assert drafted["model"]["demo"] is True and len(drafted["model"]["fingerprint"]) == 64
    assert drafted["model"]["name"] and drafted["model"]["version"]
    reported = mine[5]
    [sr] = (tmp_path / "sr-out").glob("*.dcm")
    assert reported["sr_uid"] == sr.stem and reported["destinations"] == ["folder"]
    assert mine[6]["destination"] == "folder" and mine[6]["sr_uid"] == sr.stem
    [stable] = [r for r in mine if r["event"] == "study.stable"]
    assert stable["reason"] == "frontal and lateral views present"
    text = (node.state_dir / "audit.jsonl").read_text()
    for identifier in ("SYNTHETIC", "TEST-0001", "19700101", "ACC0001"):
        assert identifier not in text

    done = subprocess.run([sys.executable, "-m", "cxr_node", "audit", "--config", str(config),
                           "--study", mine[0]["study_key"], "--phi"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert uid in lines[0]
    assert [line.split()[2] for line in lines[3:]] == [r["event"] for r in mine]
    assert "demo:True" in lines[3 + 4] and "destination=folder" in lines[3 + 6]


@pytest.mark.slow
def test_an_http_port_in_use_is_a_clear_start_error(tmp_path: Path):
    config = http_config(tmp_path)
    port = NodeProcess(config).config["http"]["port"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = subprocess.run([sys.executable, "-m", "cxr_node", "serve", "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"cannot serve HTTP on 127.0.0.1:{port}" in done.stderr
