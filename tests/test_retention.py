"""Retention: a finished study's images, then its draft SRs and rows, leave the node on schedule;
quarantine goes by age and size; every purge is in the audit trail; nothing in work is touched.

Studies are taken through the real state machine (Store), the purge runs with a clock moved
forward; the last test lets a real node draft, send and then purge a real study on its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomgen import make_cxr
from nodeproc import DEMO_MODEL, NodeProcess, storescu, wait_for, write_config
from pydicom.uid import generate_uid

from cxr_node import audit
from cxr_node.config import Config
from cxr_node.dispatch import Outbox
from cxr_node.retention import DAY, Retention
from cxr_node.store import InstanceRecord, Store, StudyState

S = StudyState
FORWARD = [S.STABLE, S.QUEUED, S.DRAFTED, S.REPORTED]
# how a study gets to a state outside the forward path (receiving: where it starts)
PATHS = {S.RECEIVING: [], S.SKIPPED: [S.SKIPPED], S.FAILED: [S.STABLE, S.FAILED],
         S.SENT: [*FORWARD, S.SENT]}


def config_for(tmp_path: Path, **retention: object) -> Config:
    return Config.model_validate({"node": {"state_dir": str(tmp_path / "state")},
                                  "retention": retention})


class Node:
    """A state directory and database with studies put where a test needs them."""

    def __init__(self, config: Config):
        self.config = config
        self.store = Store(config.database_path)
        audit.open_trail(config.audit_path)

    def study(self, state: StudyState, images: int = 1, at: float = 0.0,
              outbox: str | None = None) -> tuple[str, list[Path]]:
        """A study with ``images`` spooled files, moved to ``state`` at time ``at``; a report
        (and an outbox row in ``outbox`` state) once it got that far."""
        uid = generate_uid()
        files = []
        for i in range(images):
            path = self.config.spool_dir / "study" / f"{generate_uid()}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            make_cxr(uid).save_as(path, enforce_file_format=True)
            files.append(path)
            self.store.record_instance(InstanceRecord(
                sop_instance_uid=generate_uid(), study_uid=uid, series_uid="1.2.3",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax="1.2.840.10008.1.2.1",
                modality="CR", body_part="CHEST", view_position="PA", view="PA",
                instance_number=i + 1, path=str(path), size=path.stat().st_size,
                calling_ae="MODALITY1", peer="127.0.0.1"), same_content=lambda _: False, now=at)
        path = self._walk(uid, state, at)
        if path is not None:
            files.append(path)
        if outbox:
            with self.store.transaction() as db:
                Outbox.enqueue(db, sr_uid=f"{uid}.9", study_uid=uid, destinations=["pacs"], now=at)
                db.execute("UPDATE outbox SET state = ? WHERE study_uid = ?", (outbox, uid))
        return uid, files

    def _walk(self, uid: str, state: StudyState, at: float) -> Path | None:
        path = None
        for step in PATHS[state] if state in PATHS else FORWARD[:FORWARD.index(state) + 1]:
            study = self.store.study(uid)
            assert study is not None
            with self.store.transaction() as db:
                assert self.store.transition(db, study, step, now=at)
                if step == S.REPORTED:
                    path = self.config.reports_dir / "study" / f"{uid}.9.dcm"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"SR")
                    db.execute("INSERT INTO jobs (study_uid, revision, attempt, state, task_id, "
                               "inputs, created_at) VALUES (?, 1, 1, 'done', 't', '{}', ?)",
                               (uid, at))
                    db.execute("INSERT INTO reports (sr_uid, study_uid, revision, job_id, path, "
                               "demo, created_at) VALUES (?, ?, 1, 1, ?, 1, ?)",
                               (f"{uid}.9", uid, str(path), at))
        return path

    def rows(self, uid: str) -> dict[str, int]:
        return {t: self.store.db.execute(f"SELECT COUNT(*) FROM {t} WHERE study_uid = ?",
                                         (uid,)).fetchone()[0]
                for t in ("studies", "instances", "transitions", "jobs", "reports", "outbox")}

    def trail(self) -> list[dict]:
        return audit.read_trail(self.config.audit_path).records


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    yield Node(config_for(tmp_path, images_days=30, studies_days=90))
    audit._trail = None


def test_a_finished_study_loses_its_images_then_everything_and_each_purge_is_audited(node: Node):
    uid, files = node.study(S.SENT, images=2, outbox="delivered")
    images, report = files[:2], files[2]
    retention = Retention(node.config, node.store)

    assert retention.apply(retention.plan(now=29 * DAY)) == 0
    assert all(f.exists() for f in files)

    assert retention.apply(retention.plan(now=31 * DAY)) == 1
    assert not any(f.exists() for f in images) and report.exists()
    assert node.rows(uid) == {"studies": 1, "instances": 0, "transitions": 6, "jobs": 1,
                              "reports": 1, "outbox": 1}

    assert retention.apply(retention.plan(now=91 * DAY)) == 1
    assert not report.exists()
    assert set(node.rows(uid).values()) == {0}
    events = [(r["event"], r.get("files")) for r in node.trail() if r["event"].startswith("ret")]
    assert events == [("retention.images_purged", 2), ("retention.study_purged", 1)]
    assert all(r["study_uid"] == uid for r in node.trail() if r["event"].startswith("ret"))


def test_studies_in_work_or_with_a_report_to_send_are_kept(node: Node):
    kept = [node.study(state)[0] for state in (S.RECEIVING, S.STABLE, S.QUEUED, S.DRAFTED)]
    kept.append(node.study(S.REPORTED, outbox="pending")[0])
    kept.append(node.study(S.REPORTED, outbox="sending")[0])
    gone = [node.study(S.SKIPPED)[0], node.study(S.FAILED)[0],
            node.study(S.REPORTED, outbox="dead")[0], node.study(S.REPORTED)[0]]
    retention = Retention(node.config, node.store)
    plan = retention.plan(now=365 * DAY)
    assert sorted(p.study_uid for p in plan.studies) == sorted(gone)
    retention.apply(plan)
    assert all(node.rows(uid)["instances"] == 1 for uid in kept)
    assert all(node.rows(uid)["studies"] == 0 for uid in gone)


def test_an_instance_arriving_after_the_plan_is_never_lost(node: Node):
    uid, files = node.study(S.SENT, outbox="delivered")
    retention = Retention(node.config, node.store)
    plan = retention.plan(now=31 * DAY)
    late = node.config.spool_dir / "study" / "late.dcm"
    make_cxr(uid).save_as(late, enforce_file_format=True)
    node.store.record_instance(InstanceRecord(
        sop_instance_uid=generate_uid(), study_uid=uid, series_uid="1.2.3",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax="1.2.840.10008.1.2.1",
        modality="CR", body_part="CHEST", view_position="LL", view="LATERAL",
        instance_number=2, path=str(late), size=late.stat().st_size, calling_ae="MODALITY1",
        peer="127.0.0.1"), same_content=lambda _: False, now=31 * DAY)  # reopens the study
    assert retention.apply(plan) == 0
    assert late.exists() and all(f.exists() for f in files)
    assert node.rows(uid)["instances"] == 2


def test_a_recorded_path_outside_the_state_dir_is_never_deleted(node: Node, tmp_path: Path):
    victim = tmp_path / "not-ours.txt"
    victim.write_text("keep me")
    uid, _ = node.study(S.SENT, outbox="delivered")
    with node.store.transaction() as db:  # a tampered or restored database
        db.execute("UPDATE instances SET path = ? WHERE study_uid = ?",
                   (str(node.config.spool_dir / ".." / ".." / victim.name), uid))
    retention = Retention(node.config, node.store)
    retention.apply(retention.plan(now=31 * DAY))
    assert victim.read_text() == "keep me"
    assert node.rows(uid)["instances"] == 0


def test_quarantine_goes_by_age_then_oldest_first_by_size(tmp_path: Path):
    config = config_for(tmp_path, quarantine_days=14, quarantine_max_mb=1)
    folder = config.quarantine_dir
    folder.mkdir(parents=True)
    now = time.time()
    ages = {"old": 20, "a": 3, "b": 2, "c": 1}
    for name, days in ages.items():
        for suffix, size in ((".dcm", 400_000), (".json", 100)):
            path = folder / f"{name}{suffix}"
            path.write_bytes(b"x" * size)
            os.utime(path, (now - days * DAY, now - days * DAY))
    store = Store(config.database_path)
    retention = Retention(config, store)
    plan = retention.plan(now)
    assert [[p.name for p in q.files] for q in plan.quarantine] == [
        ["old.dcm", "old.json"], ["a.dcm", "a.json"]]
    assert "quarantine_days" in plan.quarantine[0].reason
    assert "quarantine_max_mb" in plan.quarantine[1].reason
    retention.apply(plan)
    assert sorted(p.name for p in folder.iterdir()) == ["b.dcm", "b.json", "c.dcm", "c.json"]


def test_purge_dry_run_lists_what_is_due_and_deletes_nothing(node: Node, tmp_path: Path):
    uid, files = node.study(S.SENT, outbox="delivered", at=time.time() - 40 * DAY)
    config_path = tmp_path / "node.yaml"
    config_path.write_text(f"node: {{state_dir: {node.config.state_dir}}}\n")
    cmd = [sys.executable, "-m", "cxr_node", "purge", "--config", str(config_path)]
    dry = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    study = node.store.study(uid)
    assert study is not None and study.study_key in dry.stdout and "images" in dry.stdout
    assert "dry run: nothing was deleted" in dry.stdout
    assert all(f.exists() for f in files)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "purged 1 of 1" in done.stdout, done.stdout + done.stderr
    assert not files[0].exists()
    purge = [r for r in node.trail() if r["event"] == "retention.images_purged"]
    assert len(purge) == 1 and purge[0]["by"]


def test_retention_settings_are_checked(tmp_path: Path):
    with pytest.raises(ValueError, match="studies_days at least images_days"):
        config_for(tmp_path, images_days=30, studies_days=7)
    with pytest.raises(ValueError, match="studies_days at least images_days"):
        config_for(tmp_path, images_days=None, studies_days=90)
    assert config_for(tmp_path, images_days=None, studies_days=None).retention.images_days is None


@pytest.mark.slow
def test_the_node_purges_a_sent_study_on_its_own(tmp_path: Path, demo_model: Path):
    config = write_config(
        tmp_path, queue={"local_worker": True},
        model={**DEMO_MODEL, "path": str(demo_model)},
        destinations=[{"name": "folder", "folder": str(tmp_path / "out")}],
        retention={"images_days": 4 / DAY, "studies_days": 8 / DAY, "interval_minutes": 0.01})
    image = tmp_path / "chest.dcm"
    make_cxr(generate_uid(), rows=256, columns=256).save_as(image, enforce_file_format=True)
    with NodeProcess(config) as node:
        assert set(storescu(node.port, [image]).values()) == {"Success"}
        assert wait_for(lambda: node.states() == ["sent"], 90), node.log()[-3000:]
        sent_copy = next((tmp_path / "out").iterdir())
        assert wait_for(lambda: not list((node.state_dir / "spool").rglob("*.dcm")), 30)
        assert wait_for(lambda: not node.db("SELECT * FROM studies"), 30), node.log()[-3000:]
        assert not list((node.state_dir / "reports").rglob("*.dcm"))
        assert sent_copy.exists()  # what a destination received is the destination's
        assert node.events("retention.purged")
