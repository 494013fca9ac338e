"""What the node takes from a worker: results forged in the real result backend, one task at a time.

Anyone who can write to Redis or to the embedded broker's result folder can answer a draft task.
These tests answer real tasks of the real queue stage that way (``backend.store_result`` for a
task the node sent), and check that a bad answer costs only its own study, that the node and not
the worker decides what the SR says about the model, and that sign-off text never becomes an SR.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from dicomgen import write_study
from redisserver import NODE_PASSWORD, RedisServer, redis_queue
from test_report import worker_result

from cxr_node.config import BROKER_PASSWORD_ENV, Config, ConfigError, load_config
from cxr_node.dispatch import Outbox
from cxr_node.identity import model_identity
from cxr_node.queue import BACKEND_DOWN, DraftQueue
from cxr_node.report import DEMO_DISCLAIMER, Reporter
from cxr_node.store import InstanceRecord, Store, StudyState

REPO = Path(__file__).resolve().parents[1]


class Node:
    """The queue and report stages of one node, on the embedded broker, with no worker."""

    def __init__(self, tmp_path: Path, **sections: Any):
        data: dict[str, Any] = {"node": {"state_dir": str(tmp_path / "state")},
                                "queue": {"local_worker": False}}
        self.config = Config.model_validate({**data, **sections})
        self.store = Store(self.config.database_path)
        self.queue = DraftQueue(self.config, self.store)
        self.reporter = Reporter(self.config, self.store, Outbox(self.config, self.store))
        self.images = tmp_path / "images"
        self.images.mkdir()
        self.seed = 0

    def stable_study(self) -> str:
        """A one-image study indexed as the receiver does, then made stable."""
        self.seed += 1
        [path] = write_study(self.images, ["PA"], seed=self.seed, rows=128, columns=128)
        ds = pydicom.dcmread(path)
        self.store.record_instance(InstanceRecord(
            ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID,
            "1.2.840.10008.1.2.1", "CR", "CHEST", "PA", "PA", 1, str(path), path.stat().st_size,
            "MODALITY", "127.0.0.1"), same_content=lambda _: False)
        assert self.store.move(self.store.study(ds.StudyInstanceUID), StudyState.STABLE, "test")
        return ds.StudyInstanceUID

    def submitted(self, study_uid: str) -> dict[str, Any]:
        """Run the queue stage until the study's draft task is out; its job row."""
        for _ in range(5):
            self.queue.step()
            job = self.store.db.execute(
                "SELECT * FROM jobs WHERE study_uid = ? AND state = 'queued' ORDER BY id DESC",
                (study_uid,)).fetchone()
            if job:
                return dict(job)
        raise AssertionError("the study was never submitted")

    def answer(self, job: dict[str, Any], value: Any, state: str = "SUCCESS") -> None:
        """Write a task result into the backend, as a worker (or anyone with access) can."""
        self.queue.app.backend.store_result(job["task_id"], value, state)

    def steps(self, n: int = 3) -> None:
        for _ in range(n):
            self.queue.step()
            self.reporter.step()

    def study(self, uid: str) -> Any:
        return self.store.study(uid)


def result(job: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A well-formed result for ``job`` as the worker sends it; ``model`` changes are merged."""
    return worker_result(request_id=f"job-{job['id']}", **changes)


FORGED: dict[str, Any] = {
    "an integer": 42,
    "a string": "garbage",
    "a mapping": {"request_id": "job-1", "ok": True},
    "null": None,
    "a list of integers": [1, 2, 3],
    "a list of lists": [[]],
    "an unhashable request id": [{"request_id": ["job-1"], "ok": True}],
}


def forged_for(job: dict[str, Any], shape: str) -> Any:
    """Garbage shaped ``shape``, addressed to ``job`` where the shape has a request id."""
    if shape in FORGED:
        return FORGED[shape]
    return [{
        "wrong types": result(job, ok="yes", findings=7, notes="none"),
        "a huge finding": result(job, findings="Clear lungs. " * 2_000_000),
        "missing keys": {"request_id": f"job-{job['id']}", "ok": True, "findings": "Clear."},
        "extra keys": result(job, signature="Dr X", model={"serial": "1"}),
        "a bad model": result(job, model={"fingerprint": None, "demo": "no"}),
        "a nested bomb": result(job, notes=[[[[["x"]]]]] * 1000),
    }[shape]]


SHAPES = [*FORGED, "wrong types", "a huge finding", "missing keys", "extra keys", "a bad model",
          "a nested bomb"]


@pytest.mark.parametrize("shape", SHAPES)
def test_a_forged_result_fails_only_its_own_study(tmp_path: Path, shape: str) -> None:
    node = Node(tmp_path)
    victim = node.stable_study()
    job = node.submitted(victim)
    node.answer(job, forged_for(job, shape))
    node.steps()
    study = node.study(victim)
    assert study.state == StudyState.FAILED, (study.state, study.reason)
    assert study.reason and len(study.reason) < 600
    assert "Clear lungs. Clear lungs." not in study.reason
    # the forged result is forgotten: the next study goes out and is drafted
    assert not node.queue.app.AsyncResult(job["task_id"]).ready()
    nxt = node.stable_study()
    follow = node.submitted(nxt)
    node.answer(follow, [result(follow)])
    node.steps()
    assert node.study(nxt).state in (StudyState.REPORTED, StudyState.SENT)
    assert node.study(victim).state == StudyState.FAILED


def test_a_forged_failure_or_an_unreadable_result_file_fails_only_its_own_study(
    tmp_path: Path,
) -> None:
    """A failure naming a non-exception 'class' (Celery refuses to build it), and a torn file."""
    node = Node(tmp_path)
    first = node.stable_study()
    job = node.submitted(first)
    backend = node.queue.app.backend
    meta = {"status": "FAILURE", "result": {"exc_type": "system", "exc_module": "os",
                                            "exc_message": ["touch /tmp/pwned"]},
            "traceback": None, "children": [], "date_done": None, "task_id": job["task_id"]}
    backend.set(backend.get_key_for_task(job["task_id"]), json.dumps(meta))
    node.steps()
    second = node.stable_study()
    torn = node.submitted(second)
    backend.set(backend.get_key_for_task(torn["task_id"]), b'{"status": "SUCC')
    node.steps()
    for uid in (first, second):
        assert node.study(uid).state == StudyState.FAILED, node.study(uid)
    assert "result" in node.study(second).reason
    third = node.stable_study()
    follow = node.submitted(third)
    node.answer(follow, [result(follow)])
    node.steps()
    assert node.study(third).state in (StudyState.REPORTED, StudyState.SENT)


def test_a_giant_or_special_result_file_is_refused_unread(tmp_path: Path) -> None:
    """The embedded broker's result folder: a 20 MiB file, a FIFO (a read would block forever)."""
    node = Node(tmp_path)
    backend = node.queue.app.backend

    def result_file(job: dict[str, Any]) -> Path:
        return Path(os.fsdecode(backend._filename(backend.get_key_for_task(job["task_id"]))))

    for make in (lambda p: p.write_bytes(b'{"status": "SUCCESS", "result": "' + b"x" * (20 << 20)
                                         + b'"}'),
                 os.mkfifo):
        uid = node.stable_study()
        make(result_file(node.submitted(uid)))
        stepping = threading.Thread(target=node.steps, daemon=True)
        stepping.start()
        stepping.join(20)
        assert not stepping.is_alive(), "the queue stage hangs on a result file"
        study = node.study(uid)
        assert study.state == StudyState.FAILED, study
        assert study.reason == "the task's result cannot be read (ValueError)"
    follow = node.submitted(node.stable_study())
    node.answer(follow, [result(follow)])
    node.steps()
    assert node.study(follow["study_uid"]).state in (StudyState.REPORTED, StudyState.SENT)


def test_one_bad_result_in_a_batch_fails_only_its_own_study(tmp_path: Path) -> None:
    node = Node(tmp_path, queue={"local_worker": False, "batch_size": 2})
    good, bad = node.stable_study(), node.stable_study()
    node.queue.step()
    jobs = {j["study_uid"]: dict(j) for j in node.store.db.execute("SELECT * FROM jobs")}
    assert jobs[good]["task_id"] == jobs[bad]["task_id"]  # one task, two studies
    node.answer(jobs[good], [result(jobs[good]), result(jobs[bad], timings={"batch_size": -1})])
    node.steps()
    assert node.study(good).state in (StudyState.REPORTED, StudyState.SENT)
    assert node.study(bad).state == StudyState.FAILED
    assert "timings" in node.study(bad).reason


def sr_texts(node: Node, uid: str) -> list[str]:
    [row] = node.store.db.execute("SELECT path FROM reports WHERE study_uid = ?", (uid,))
    sr = pydicom.dcmread(row["path"])
    return [item.TextValue for section in sr.ContentSequence
            for item in getattr(section, "ContentSequence", []) if "TextValue" in item]


def test_a_rogue_sign_off_claiming_a_real_model_is_never_filed(tmp_path: Path) -> None:
    node = Node(tmp_path)
    uid = node.stable_study()
    job = node.submitted(uid)
    node.answer(job, [result(
        job, findings="Lungs clear.\nElectronically signed: Dr X, Attending Radiologist",
        impression="FINAL REPORT. Normal chest.",
        model={"name": "Certified Radiologist AI", "demo": False})])
    node.steps()
    study = node.study(uid)
    assert study.state == StudyState.FAILED, study
    assert "electronically signed" in study.reason.lower()
    assert not node.store.db.execute("SELECT 1 FROM reports").fetchall()


def test_a_worker_cannot_turn_the_demo_label_off(tmp_path: Path) -> None:
    """No pinned identity and no model folder the node can read: the node cannot vouch for it."""
    node = Node(tmp_path)
    uid = node.stable_study()
    job = node.submitted(uid)
    node.answer(job, [result(job, model={"name": "Certified Radiologist AI", "demo": False})])
    node.steps()
    assert node.study(uid).state in (StudyState.REPORTED, StudyState.SENT), node.study(uid)
    assert DEMO_DISCLAIMER in sr_texts(node, uid)
    [row] = node.store.db.execute("SELECT demo, path FROM reports")
    assert row["demo"] == 1
    sr = pydicom.dcmread(row["path"])  # nor does it name the model in the SR
    assert sr.ManufacturerModelName == "unverified model"
    assert "Certified" not in str(sr)


# --- the node decides what the SR says about the model -----------------------------------------


def model_folder(path: Path, **manifest: Any) -> Path:
    """A model folder as far as identity goes: config, weights, manifest (never loaded here)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "gemma3"}')
    (path / "model.safetensors").write_bytes(b"weights " * 1000)
    (path / "cxr-model.json").write_text(json.dumps(manifest))
    return path


def sr_header(node: Node, uid: str) -> pydicom.Dataset:
    [row] = node.store.db.execute("SELECT path FROM reports WHERE study_uid = ?", (uid,))
    return pydicom.dcmread(row["path"])


def test_the_sr_names_the_model_in_the_node_s_folder_not_the_worker_s_claim(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "model", name="CXR-Clinical", version="2.1", demo=False)
    node = Node(tmp_path, model={"path": str(folder)})
    expected = model_identity(node.config.model, folder)
    uid = node.stable_study()
    job = node.submitted(uid)
    node.answer(job, [result(job, model={"name": "Totally Certified AI", "version": "9",
                                         "fingerprint": expected.fingerprint, "demo": False})])
    node.steps()
    sr = sr_header(node, uid)
    assert sr.ManufacturerModelName == "CXR-Clinical" and "2.1" in sr.SoftwareVersions
    assert not sr.SeriesDescription.startswith("DEMO")
    stored = json.loads(node.store.db.execute("SELECT result FROM jobs").fetchone()[0])
    assert stored["model"] == expected.model_dump(mode="json")


def test_a_worker_running_another_model_fails_its_study(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "model", name="CXR-Clinical", version="2.1", demo=False)
    node = Node(tmp_path, model={"path": str(folder)})
    uid = node.stable_study()
    job = node.submitted(uid)
    node.answer(job, [result(job, model={"fingerprint": "0" * 64})])
    node.steps()
    study = node.study(uid)
    assert study.state == StudyState.FAILED
    assert study.reason.startswith("draft refused: the worker's model (fingerprint 000000000000")
    assert f"the model in {folder}" in study.reason


def test_a_changed_model_folder_is_noticed(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "model", name="CXR-Clinical", version="2.1", demo=False)
    node = Node(tmp_path, model={"path": str(folder)})
    before = model_identity(node.config.model, folder)
    (folder / "model.safetensors").write_bytes(b"new weights " * 1000)
    after = model_identity(node.config.model, folder)
    first = node.stable_study()
    job = node.submitted(first)
    node.answer(job, [result(job, model={"fingerprint": after.fingerprint})])
    node.steps()
    assert node.study(first).state in (StudyState.REPORTED, StudyState.SENT)
    (folder / "model.safetensors").write_bytes(b"weights " * 1000)  # back, new mtime
    second = node.stable_study()
    job = node.submitted(second)
    node.answer(job, [result(job, model={"fingerprint": after.fingerprint})])
    node.steps()
    assert node.study(second).state == StudyState.FAILED, "a stale identity was used"
    assert before.fingerprint[:12] in node.study(second).reason


def test_a_demo_model_stays_a_demo_whatever_the_worker_says(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "model", name="cxr-node DEMO", version="demo-1", demo=True)
    node = Node(tmp_path, model={"path": str(folder)})
    fingerprint = model_identity(node.config.model, folder).fingerprint
    uid = node.stable_study()
    job = node.submitted(uid)
    node.answer(job, [result(job, model={"fingerprint": fingerprint, "demo": False})])
    node.steps()
    assert DEMO_DISCLAIMER in sr_texts(node, uid)
    assert sr_header(node, uid).SeriesDescription.startswith("DEMO MODEL")


PINNED = {"name": "CXR-Remote", "version": "3.0", "architecture": "qwen2_5_vl",
          "quantization": "nf4", "adapter": None, "fingerprint": "ab" * 32, "demo": False}


def test_a_pinned_identity_is_what_the_sr_says_for_workers_on_another_host(tmp_path: Path) -> None:
    node = Node(tmp_path, model={"identity": PINNED})  # no model folder on this host
    good, other = node.stable_study(), node.stable_study()
    node.queue.step()
    jobs = {j["study_uid"]: dict(j) for j in node.store.db.execute("SELECT * FROM jobs")}
    node.answer(jobs[good], [  # one task drafted both
        result(jobs[uid], model={"fingerprint": fingerprint, "name": "Whatever"})
        for uid, fingerprint in ((good, PINNED["fingerprint"]), (other, "cd" * 32))])
    node.steps()
    assert sr_header(node, good).ManufacturerModelName == "CXR-Remote"
    assert DEMO_DISCLAIMER not in sr_texts(node, good)
    assert node.study(other).state == StudyState.FAILED
    assert "model.identity" in node.study(other).reason


@pytest.mark.parametrize(("identity", "expected"), [
    ({**PINNED, "fingerprint": "AB" * 32}, "'model.identity.fingerprint' = 'ABAB"),
    ({**PINNED, "name": "x" * 65}, "expected at most 64 bytes in UTF-8 (a DICOM LO value)"),
    ({k: v for k, v in PINNED.items() if k != "demo"}, "'model.identity.demo' is required"),
    ({**PINNED, "demo": "no"}, "'model.identity.demo' = 'no'"),
])
def test_a_bad_pinned_identity_is_a_configuration_error(tmp_path: Path, identity: dict[str, Any],
                                                        expected: str) -> None:
    path = tmp_path / "cxr-node.yaml"
    path.write_text(yaml.safe_dump({"model": {"identity": identity}}))
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(path)


def test_model_identity_prints_what_the_node_pins(tmp_path: Path) -> None:
    """`cxr-node model identity` on the worker host, pasted into the node's file, is accepted and
    names that model; `config check` says where the identity comes from."""
    folder = model_folder(tmp_path / "model", name="CXR-Clinical", version="2.1", demo=False)
    worker = tmp_path / "worker.yaml"
    worker.write_text(yaml.safe_dump({"node": {"state_dir": str(tmp_path / "w")},
                                      "model": {"path": str(folder)}}))
    done = subprocess.run([sys.executable, "-m", "cxr_node", "model", "identity", "--config",
                           str(worker)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    node_file = tmp_path / "node.yaml"
    node_file.write_text(f"node: {{state_dir: {tmp_path / 'n'}}}\n{done.stdout}")
    pinned = load_config(node_file).model.identity
    assert pinned == model_identity(load_config(worker).model, folder)
    checks = {}
    for name, path in (("pinned", node_file), ("computed", worker)):
        checks[name] = subprocess.run([sys.executable, "-m", "cxr_node", "config", "check",
                                       str(path)], capture_output=True, text=True, timeout=60,
                                      cwd=REPO).stderr
    assert "model identity: pinned by model.identity: CXR-Clinical 2.1" in checks["pinned"]
    assert f"model identity: computed by the node from {folder}" in checks["computed"]
    remote = tmp_path / "remote.yaml"
    remote.write_text(f"node: {{state_dir: {tmp_path / 'r'}}}\nqueue: {{local_worker: false}}\n")
    said = subprocess.run([sys.executable, "-m", "cxr_node", "config", "check", str(remote)],
                          capture_output=True, text=True, timeout=60, cwd=REPO).stderr
    assert "Every draft will be labelled DEMO MODEL" in said
    assert "cxr-node model identity --config FILE" in said


# --- reasons name images by a handle -------------------------------------------------------------


def test_reasons_name_an_unusable_image_by_its_handle_not_its_file(tmp_path: Path) -> None:
    """Spool file names can hold a SOP Instance UID; reasons reach the log, status and the API."""
    node = Node(tmp_path)
    broken, vanished = node.stable_study(), node.stable_study()
    rows = {uid: node.store.instances(uid)[0] for uid in (broken, vanished)}
    Path(rows[broken]["path"]).write_bytes(b"DICM" * 10)
    node.queue._claim()  # vanished is claimed and its pixels prepared ...
    node.queue._pixels.clear()  # ... then forgotten (a restart), and its file disappears
    Path(rows[vanished]["path"]).unlink()
    node.queue._send()
    for uid, row in rows.items():
        reason = node.study(uid).reason
        assert node.study(uid).state == StudyState.FAILED, reason
        assert row["sop_instance_uid"] not in reason and Path(row["path"]).name not in reason
        assert str(node.images) not in reason
    assert node.study(broken).reason.startswith("no usable image: ")
    assert node.study(vanished).reason.startswith("image no longer readable: ")


# --- the backend itself failing is not a bad result ---------------------------------------------


def test_an_unreachable_result_backend_fails_no_study(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis down: the stage fails (and backs off, node.StageRunner); the drafts stay in flight."""
    monkeypatch.setenv(BROKER_PASSWORD_ENV, NODE_PASSWORD)
    server = RedisServer(tmp_path)
    try:
        node = Node(tmp_path, queue=redis_queue(server.port))
        uid = node.stable_study()
        job = node.submitted(uid)
    finally:
        server.close()
    with pytest.raises(BACKEND_DOWN):
        node.queue.step()
    assert node.study(uid).state == StudyState.QUEUED
    assert node.store.db.execute("SELECT state FROM jobs WHERE id = ?",
                                 (job["id"],)).fetchone()[0] == "queued"
