"""Drafting end to end: storescu -> node -> Celery worker (embedded and Redis) -> draft SR."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pydicom
import pytest
from dicomgen import write_study
from nodeproc import (
    DEMO_MODEL,
    NodeProcess,
    WorkerProcess,
    storescu,
    wait_for,
    write_config,
)
from redisserver import REDIS_ENV, redis_queue
from sr_validation import assert_valid_sr

pytestmark = pytest.mark.slow


def folder_config(tmp_path: Path, **sections: object) -> Path:
    defaults: dict[str, object] = {
        "study": {"settle_seconds": 1},
        "model": DEMO_MODEL,
        "destinations": [{"name": "folder", "folder": str(tmp_path / "sr-out")}],
    }
    return write_config(tmp_path, **{**defaults, **sections})


def test_single_machine_default_drafts_a_real_chest_xray(tmp_path: Path, cxr_dir: Path):
    """Embedded broker, local worker, demo model built on first start: one command does it all."""
    config = folder_config(tmp_path, queue={"local_worker": True})
    images = [cxr_dir / "CR-MONO1-10-chest.dcm", cxr_dir / "RG1_J2KI.dcm"]
    with NodeProcess(config) as node:
        assert set(storescu(node.port, images).values()) == {"Success"}
        assert wait_for(lambda: node.states() == ["sent", "sent"], 180), node.log()[-4000:]
    assert (node.state_dir / "models" / "demo" / "cxr-model.json").is_file()
    out = sorted((tmp_path / "sr-out").glob("*.dcm"))
    assert len(out) == 2
    for sr_path in out:
        sr = pydicom.dcmread(sr_path)
        source = next(i for i in images
                      if pydicom.dcmread(i, force=True).StudyInstanceUID == sr.StudyInstanceUID)
        assert_valid_sr(sr_path, source)
        assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
        assert sr.SeriesDescription.startswith("DEMO MODEL")
        texts = [item.TextValue for section in sr.ContentSequence
                 for item in getattr(section, "ContentSequence", []) if "TextValue" in item]
        assert "DEMO MODEL — not a clinical report" in texts
    history = [r["state"] for r in node.db("SELECT state FROM transitions ORDER BY id")]
    for state in ("receiving", "stable", "queued", "drafted", "reported", "sent"):
        assert state in history


def test_redis_broker_and_a_separate_worker(tmp_path: Path, cxr_dir: Path, redis_port: int,
                                             demo_model: Path):
    env = REDIS_ENV
    config = folder_config(tmp_path, queue=redis_queue(redis_port),
                           model={**DEMO_MODEL, "path": str(demo_model)})
    worker = WorkerProcess(config, env).start()
    try:
        with NodeProcess(config, env=env) as node:
            assert set(storescu(node.port, [cxr_dir / "CR-MONO1-10-chest.dcm"]).values()) == {"Success"}
            assert wait_for(lambda: node.states() == ["sent"], 120), worker.log()[-3000:]
    finally:
        worker.stop()
    assert not (node.state_dir / "queue").exists()  # nothing of the embedded broker was used


def test_worker_killed_mid_draft_is_drafted_once_by_another(tmp_path: Path, cxr_dir: Path,
                                                            redis_port: int, demo_model: Path):
    env = REDIS_ENV
    slow = {"max_new_tokens": 1800, "min_new_tokens": 1800, "no_repeat_ngram_size": 2}
    config = folder_config(
        tmp_path,
        queue=redis_queue(redis_port, task_time_limit_seconds=40, visibility_timeout_seconds=60,
                          start_timeout_seconds=5, retry_delay_seconds=0),
        model={**DEMO_MODEL, "path": str(demo_model), "generation": slow},
        limits={"max_draft_characters": 20_000},  # 1800 demo tokens: about 11,000 characters
    )
    first = WorkerProcess(config, env, name="first").start()
    second = WorkerProcess(config, env, name="second")
    try:
        with NodeProcess(config, env=env) as node:
            assert set(storescu(node.port, [cxr_dir / "CR-MONO1-10-chest.dcm"]).values()) == {"Success"}
            assert wait_for(lambda: node.states() == ["drafting"], 120), first.log()[-3000:]
            second.start()
            first.kill()
            assert wait_for(lambda: node.states() == ["sent"], 150), second.log()[-3000:]
            jobs = node.db("SELECT attempt, state, reason FROM jobs ORDER BY id")
            assert [(j["attempt"], j["state"]) for j in jobs] == [(1, "lost"), (2, "done")]
            # given up once it could no longer run: its copy redelivered to the second worker
            # came too late to start (discarded unrun), or no result within 5 + 40 + 30 s
            assert ("could not start within 5 s" in jobs[0]["reason"]
                    or "no result after 75 s" in jobs[0]["reason"]), jobs[0]["reason"]
            assert len(node.db("SELECT 1 FROM reports")) == 1
    finally:
        second.stop()
        first.kill()
    assert len(list((tmp_path / "sr-out").glob("*.dcm"))) == 1
    assert "second@test" in second.log() or "draft task done" in second.log()


IDENTIFIERS = {
    "PatientName": "ZEBRA^QUOKKA",
    "PatientID": "PID778899",
    "PatientBirthDate": "19451231",
    "AccessionNumber": "ACCX5566",
    "StudyDate": "20240229",
    "InstitutionName": "ST ELSEWHERE HOSPITAL",
    "ReferringPhysicianName": "WOMBAT^DOCTOR",
    "StudyID": "STUDY4242",
}


def test_task_payload_carries_no_patient_identifiers(tmp_path: Path):
    """The message a worker receives, read off the embedded broker as the worker would."""
    source = tmp_path / "send"
    source.mkdir()
    files = write_study(source, ["PA", "LL"], rows=256, columns=256, **IDENTIFIERS)
    uids = set()
    for f in files:
        ds = pydicom.dcmread(f)
        uids |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    config = folder_config(tmp_path, queue={"local_worker": False},
                           model={"send_indication": False})
    with NodeProcess(config) as node:
        assert set(storescu(node.port, files).values()) == {"Success"}
        messages = node.state_dir / "queue" / "messages"
        assert wait_for(lambda: list(messages.glob("*.msg")), 60), node.log()[-3000:]
    raw = next(messages.glob("*.msg")).read_text()
    envelope = json.loads(raw)
    body = base64.b64decode(envelope["body"]).decode()
    args, kwargs, _ = json.loads(body)
    [requests] = args
    assert kwargs == {}
    assert len(requests) == 1
    request = requests[0]
    assert set(request) == {"request_id", "images", "indication"}
    assert request["indication"] is None
    assert [set(i) for i in request["images"]] == [{"view", "png_b64", "rows", "columns"}] * 2
    assert [i["view"] for i in request["images"]] == ["PA", "LATERAL"]
    everything = raw + body
    for name, value in IDENTIFIERS.items():
        for part in value.split("^"):
            assert part not in everything, f"{name} leaked into the task message"
    for uid in uids:
        assert uid not in everything, "a DICOM UID leaked into the task message"
    log = node.log()
    for name, value in IDENTIFIERS.items():
        for part in value.split("^"):
            assert part not in log, f"{name} appeared in the node's log"


def test_late_lateral_is_drafted_again_and_supersedes_the_first_draft(tmp_path: Path):
    source = tmp_path / "send"
    source.mkdir()
    frontal, lateral = write_study(source, ["PA", "LL"], rows=256, columns=256)
    config = folder_config(tmp_path, queue={"local_worker": True})
    with NodeProcess(config) as node:
        assert set(storescu(node.port, [frontal]).values()) == {"Success"}
        assert wait_for(lambda: node.states() == ["sent"], 180), node.log()[-3000:]
        assert set(storescu(node.port, [lateral]).values()) == {"Success"}
        assert wait_for(lambda: len(node.db("SELECT 1 FROM reports")) == 2
                        and node.states() == ["sent"], 180), node.log()[-3000:]
        # the frontal sent again changes nothing: no third draft
        assert set(storescu(node.port, [frontal]).values()) == {"Success"}
        assert node.events("instance.duplicate")
        first, second = node.db("SELECT * FROM reports ORDER BY revision")
    assert (first["revision"], second["revision"]) == (1, 2)
    assert second["supersedes"] == first["path"]
    old, new = pydicom.dcmread(first["path"]), pydicom.dcmread(second["path"])
    assert new.SeriesInstanceUID == old.SeriesInstanceUID and new.InstanceNumber == 2
    [predecessor] = new.PredecessorDocumentsSequence
    assert (predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            .ReferencedSOPInstanceUID) == old.SOPInstanceUID
    evidence = new.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert len(evidence.ReferencedSOPSequence) == 2  # the model read both views
    assert len(list((tmp_path / "sr-out").glob("*.dcm"))) == 2
    assert_valid_sr(Path(second["path"]), frontal)
