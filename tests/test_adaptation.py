"""Site adaptation: the public-case corpus, the node's own pairs, identifiers out of report text,
the patient split, QLoRA training of a tiny Gemma3 on CPU (loss, checkpoints, resume after a kill),
the adapter in the worker's real path and in the SR, and the promote guard."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cxr_node.adaptation.card import CARD_NAME, read_card
from cxr_node.adaptation.corpus import (
    ATTRIBUTION,
    CORPUS,
    REPORT,
    build_covid_corpus,
    licence_decision,
)
from cxr_node.adaptation.pairs import export_pairs
from cxr_node.adaptation.promote import promote, unpromoted
from cxr_node.adaptation.scrub import MARK, Scrubber
from cxr_node.adaptation.split import SplitError, patient_of, split_by_patient
from cxr_node.config import load_config
from cxr_node.evaluation.datasets import Study, StudyImage, load_dataset
from cxr_node.identity import ExpectedModel, IdentityError, model_identity
from cxr_node.store import Store
from tests.samples import DATA, NIH_IMAGES

REPO = Path(__file__).resolve().parent.parent
COVID = DATA / "covid-chestxray"
DX = DATA / "highdicom_dx_image.dcm"


# -- identifiers out of report text ---------------------------------------------------------------


def test_identifiers_are_taken_out_of_report_text_and_counted() -> None:
    scrubber = Scrubber(["DOE^JANE^M", "Wilson^Robert"])
    text = ("Compared with 11/28/2026 and Nov 3, 2025. Discussed with Dr. Alan Brown at 14:35 on "
            "3 March 2026, phone 555-123-4567. Accession 12345678, MRN: A1234. Jane Doe is 65. "
            "Electronically signed by: Mary K. Jones on 2026-11-28 (jones@example.org). "
            "Order ACC20261128001. Robert Wilson verified.")
    done = scrubber.scrub(text)
    for identifier in ("11/28/2026", "Nov 3, 2025", "Alan", "Brown", "14:35", "3 March 2026",
                       "555-123-4567", "12345678", "A1234", "Jane", "Doe", "Mary", "Jones",
                       "2026-11-28", "jones@example.org", "ACC20261128001", "Robert", "Wilson"):
        assert identifier not in done.text, identifier
    assert done.removed == {"date": 4, "name": 6, "time": 1, "phone": 1, "number": 3,
                            "email": 1}, done.removed
    assert "Dr. XXXX" in done.text and "signed by: XXXX" in done.text


def test_measurements_and_anatomy_are_kept() -> None:
    text = ("A 3.2 x 2.1 cm nodule at T11. C5-6 degenerative change. 5/6 ribs. Heart size normal. "
            "Read with the lateral view. Dr. findings reviewed: no pneumothorax.")
    done = Scrubber().scrub(text)
    assert done.text == text and not done.removed


# -- the public-case corpus -----------------------------------------------------------------------


@pytest.mark.parametrize(("licence", "usable", "why"), [
    ("CC BY", True, ""), ("CC BY-SA", True, ""), ("CC BY 4.0", True, ""), ("CC0", True, ""),
    ("Apache 2.0", True, ""), ("CC BY-NC-SA", False, "non-commercial"),
    ("CC BY-NC-SA 4.0", False, "non-commercial"), ("CC BY-NC-ND 4.0", False, "no derivatives"),
    ("CC BY-ND", False, "no derivatives"), ("", False, "no licence stated"),
    ("unclear", False, "no licence stated"), ("All rights reserved", False, "not a licence"),
])
def test_a_record_is_used_only_when_its_licence_allows_training(licence: str, usable: bool,
                                                                 why: str) -> None:
    decision = licence_decision(licence)
    assert decision.usable is usable
    assert why in decision.reason


def test_non_commercial_records_only_when_asked() -> None:
    assert licence_decision("CC BY-NC-SA", allow_non_commercial=True).usable
    assert not licence_decision("CC BY-NC-ND", allow_non_commercial=True).usable


def _collection(tmp_path: Path) -> Path:
    """The repository's sample of the collection (the non-commercial records' images stand in as
    grey pictures: they are not kept here), plus three records a real table also has: one without
    a licence, a CT slice, and one whose image is missing."""
    folder = tmp_path / "collection"
    shutil.copytree(COVID, folder)
    with (folder / "metadata.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        stand_in = folder / "images" / row["filename"]
        if not stand_in.exists():
            Image.new("L", (96, 80), 100).save(stand_in, format="PNG" if stand_in.suffix ==
                                               ".png" else "JPEG")
    template = rows[0]
    extra = [
        {**template, "patientid": "900", "license": "", "filename": "ARDSSevere.png"},
        {**template, "patientid": "901", "modality": "CT", "view": "Axial"},
        {**template, "patientid": "902", "filename": "absent.png"},
    ]
    with (folder / "metadata.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(template))
        writer.writeheader()
        writer.writerows(rows + extra)
    return folder


def test_the_corpus_keeps_each_record_with_its_licence_and_says_what_it_left_out(
        tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    done = subprocess.run([sys.executable, "-m", "cxr_node.cli", "corpus", "build",
                           str(_collection(tmp_path)), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "kept 3 studies (3 images; CC BY: 2, CC BY-SA: 1)" in done.stdout
    assert "left out 12 records:" in done.stdout
    report = json.loads((out / REPORT).read_text())
    reasons = [item["reason"] for item in report["left_out"]]
    assert sum("non-commercial use only (NC)" in r for r in reasons) == 9  # the Radiopaedia/SIRM ones
    assert sum("no licence stated" in r for r in reasons) == 1
    assert sum("not an X-ray" in r for r in reasons) == 1
    assert sum("image is not in the collection" in r for r in reasons) == 1
    assert all(".csv:" in item["record"] for item in report["left_out"])  # each names its line
    dataset = load_dataset(out / CORPUS)
    assert {s.licence for s in dataset.studies} == {"CC BY", "CC BY-SA"}
    assert {s.source for s in dataset.studies} == {"covid-chestxray"}
    assert all(s.findings and s.impression for s in dataset.studies)
    attribution = (out / ATTRIBUTION).read_text()
    assert "https://en.wikipedia.org/wiki/File:ARDSSevere.png" in attribution
    assert "radiopaedia.org/cases/covid-19" not in attribution  # left-out records are not named
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in out.rglob("*") if p.is_file())
    with_nc = build_covid_corpus(_collection(tmp_path / "again"), tmp_path / "nc",
                                 allow_non_commercial=True)
    assert len(with_nc.left_out) == 3
    assert {s["patient_id"] for s in with_nc.kept} >= {"covid-chestxray-177"}
    frontal_and_lateral = [s for s in with_nc.kept if s["patient_id"] == "covid-chestxray-177"]
    assert [i["view"] for i in frontal_and_lateral[0]["images"]] == ["PA", "LATERAL"]


def test_a_table_that_is_not_a_collection_is_named(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "metadata.csv").write_text("id,text\n1,hello\n")
    done = subprocess.run([sys.executable, "-m", "cxr_node.cli", "corpus", "build",
                           str(tmp_path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2
    assert "metadata.csv: not a COVID-19 image data collection table: no column" in done.stderr


# -- the held-out split -----------------------------------------------------------------------------


def _study(number: int, patient: str | None) -> Study:
    return Study(f"s{number}", (StudyImage(Path("x.png")),), "findings", "", patient)


def test_no_patient_is_in_both_the_training_and_the_held_out_studies() -> None:
    studies = [_study(n, f"p{n % 7}") for n in range(40)] + [_study(99, None)]
    split = split_by_patient(studies, 0.3, seed=1)
    assert not {patient_of(s) for s in split.train} & {patient_of(s) for s in split.heldout}
    assert len({patient_of(s) for s in split.heldout}) == 2  # 30 % of 8 patients
    assert split == split_by_patient(list(reversed(studies)), 0.3, seed=1).__class__(
        tuple(s for s in studies if s in split.train), tuple(s for s in studies if s in split.heldout))
    assert split != split_by_patient(studies, 0.3, seed=2)
    with pytest.raises(SplitError, match="at least 2"):
        split_by_patient([_study(1, "a"), _study(2, "a")], 0.5, seed=0)


# -- the node's own pairs ---------------------------------------------------------------------------


def _paired_study(db: sqlite3.Connection, number: int, image: Path, text: str) -> None:
    study, sr = f"1.2.3.{number}", f"1.2.3.{number}.9"
    db.execute("INSERT INTO instances (sop_instance_uid, study_uid, series_uid, sop_class_uid, "
               "transfer_syntax, modality, body_part, view_position, view, path, size, "
               "received_at, calling_ae, peer) VALUES (?, ?, '1.2', '1.2', '1.2', 'DX', 'CHEST', "
               "'PA', 'PA', ?, 1, 0, 'M', '127.0.0.1')", (f"{study}.1", study, str(image)))
    db.execute("INSERT INTO reports VALUES (?, ?, 1, 1, '/x', NULL, 1, 0)", (sr, study))
    db.execute("INSERT INTO feedback (source, document, received_at, state, study_uid, sr_uid, "
               "findings, impression) VALUES ('import', ?, 1764460800, 'paired', ?, ?, ?, "
               "'Cardiomegaly.')", (f"d{number}", study, sr, text))


def test_the_node_pairs_leave_without_identifiers(tmp_path: Path) -> None:
    config_path = tmp_path / "node.yaml"
    config_path.write_text(f"node: {{state_dir: {tmp_path / 'state'}}}\n")
    config = load_config(config_path)
    image = tmp_path / "state" / "spool" / "a.dcm"
    image.parent.mkdir(parents=True)
    header = pydicom.dcmread(DX)
    header.PatientName, header.PatientID = "Doe^Jane", "MRN-778812"
    header.ReferringPhysicianName = "Wilson^Robert"
    header.save_as(image)
    store = Store(config.database_path)
    with store.transaction() as db:
        _paired_study(db, 1, image, "Heart enlarged since 11/28/2026. Jane Doe. Discussed with "
                                    "Dr. Wilson. Accession 44556677.")
        _paired_study(db, 2, tmp_path / "purged.dcm", "Normal.")
    pairs = export_pairs(config, tmp_path / "out")
    assert pairs.studies == 1
    assert dict(pairs.left_out) == {"images deleted by retention (retention.images_days)": 1}
    assert pairs.removed == {"date": 1, "name": 3, "number": 1}
    text = pairs.manifest.read_text()
    for identifier in ("Jane", "Doe", "Wilson", "11/28/2026", "44556677", "MRN-778812",
                       "1.2.3.1"):
        assert identifier not in text, identifier
    dataset = load_dataset(pairs.manifest, allow_outside=True)
    (study,) = dataset.studies
    assert study.findings.startswith(f"Heart enlarged since {MARK}.")
    assert study.patient_id.startswith("patient-") and study.day == "2025-11-30"
    assert study.images[0].path == image.resolve() and study.source == "node"
    assert pairs.manifest.stat().st_mode & 0o777 == 0o600
    # the pseudonym's key is made per export and forgotten: no two exports link a patient
    again = export_pairs(config, tmp_path / "again")
    assert load_dataset(again.manifest, allow_outside=True).studies[0].patient_id != \
        study.patient_id


# -- training a tiny Gemma3 on CPU ------------------------------------------------------------------

ENLARGED = ("the heart size is large . cardiomegaly . no pleural effusion .",
            "cardiomegaly .")
NORMAL = ("the lungs are clear . the heart size is normal .", "normal chest .")
PATIENTS = ("p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8")
HELDOUT_FRACTION = 0.25
SETTINGS = ("--epochs", "6", "--accumulate", "1", "--learning-rate", "0.01", "--rank", "8",
            "--alpha", "16", "--warmup-steps", "2", "--heldout-fraction", str(HELDOUT_FRACTION),
            "--projector-steps", "2", "--projector-learning-rate", "0.001")


def _manifest(folder: Path, heldout_text: tuple[str, str], train_text: tuple[str, str]) -> Path:
    """Eight studies of eight patients on the NIH images; the held-out patients' reports say
    `heldout_text`, the others' `train_text`."""
    images = sorted(p.name for p in NIH_IMAGES.glob("*.png"))
    studies = [Study(f"study-{n}", (StudyImage(NIH_IMAGES / images[n % len(images)]),), "", "",
                     patient) for n, patient in enumerate(PATIENTS)]
    held = {s.id for s in split_by_patient(studies, HELDOUT_FRACTION, seed=0).heldout}
    shutil.copytree(NIH_IMAGES, folder / "images", ignore=shutil.ignore_patterns("*.csv"))
    lines = []
    for study in studies:
        findings, impression = heldout_text if study.id in held else train_text
        image = f"images/{study.images[0].path.name}"
        lines.append(json.dumps({"id": study.id, "patient_id": study.patient_id,
                                 "images": [{"path": image, "view": "PA"}],
                                 "findings": findings, "impression": impression,
                                 "day": f"2026-0{len(lines) + 1}-15"}) + "\n")
    path = folder / "manifest.jsonl"
    path.write_text("".join(lines))
    return path


def _config(folder: Path, model: Path, adapter: Path | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"node-{adapter.name if adapter else 'base'}.yaml"
    path.write_text(
        f"node: {{state_dir: {folder / 'state'}}}\n"
        f"model:\n  path: {model}\n  image_size: 64\n"
        + (f"  adapter: {adapter}\n" if adapter else "")
        + "  generation: {max_new_tokens: 24}\nqueue: {batch_size: 4}\n")
    return path


def cli(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cxr_node.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def site(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An adapter trained to write the held-out patients' kind of report ("enlarged")."""
    folder = tmp_path_factory.mktemp("site")
    manifest = _manifest(folder / "enlarged", ENLARGED, ENLARGED)
    adapter = folder / "enlarged-adapter"
    done = cli("train", "--base", demo_model, "--data", manifest, "--out", adapter,
               "--config", _config(folder, demo_model), "--checkpoint-every", "5", *SETTINGS)
    assert done.returncode == 0, done.stderr
    yield {"folder": folder, "adapter": adapter, "manifest": manifest, "stderr": done.stderr}


@pytest.mark.slow
def test_training_lowers_the_loss_and_writes_a_card(site: dict[str, Any], demo_model: Path) -> None:
    adapter = site["adapter"]
    losses = [json.loads(line) for line in
              (adapter / "training" / "loss.jsonl").read_text().splitlines()]
    assert [line["stage"] for line in losses[:3]] == ["projector", "projector", "lora"]
    lora = [line["loss"] for line in losses if line["stage"] == "lora"]
    per_epoch = len(lora) // 6
    # a random 2-layer model whose norms and output layer stay frozen: a floor near 3.9 nats
    assert sum(lora[-per_epoch:]) / per_epoch < 0.85 * sum(lora[:per_epoch]) / per_epoch
    assert "steps" in site["stderr"] and "studies prepared" in site["stderr"]  # progress
    card = read_card(adapter)
    assert card is not None and card.demo is True
    assert card.base.name == model_identity(
        load_config(_config(site["folder"], demo_model)).model, demo_model).name
    assert card.data.studies == 6 and card.data.patients == 6
    assert card.data.heldout_studies == 2 and card.data.heldout_patients == 2
    assert (card.data.first_day, card.data.last_day) != (None, None)
    assert card.training["rank"] == 8 and card.training["projector_steps"] == 2
    assert card.training["lora_modules"] == 14  # 2 layers x 7 projections, none in the vision tower
    assert set(card.heldout) == {"base", "adapter"}
    assert card.heldout["adapter"].studies == 2
    # the adapter learnt the held-out patients' kind of report; the random base did not
    assert card.heldout["adapter"].scores["ROUGE-L"] > card.heldout["base"].scores["ROUGE-L"]
    files = {p.name for p in adapter.iterdir() if p.is_file()}
    assert files == {"adapter_config.json", "adapter_model.safetensors", "cxr-model.json",
                     CARD_NAME}
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in adapter.rglob("*") if p.is_file())
    assert str(demo_model) not in (adapter / "adapter_config.json").read_text()
    done = cli("train", "--base", demo_model, "--data", site["manifest"], "--out", adapter)
    assert done.returncode == 2 and "holds a trained adapter" in done.stderr


@pytest.mark.slow
def test_a_killed_training_resumes_at_its_checkpoint_and_ends_the_same(
        site: dict[str, Any], demo_model: Path, tmp_path: Path) -> None:
    config = _config(site["folder"], demo_model)
    args = ("train", "--base", demo_model, "--data", site["manifest"], "--config", config,
            "--checkpoint-every", "3", "--no-eval", *SETTINGS, "--epochs", "40")
    whole = cli(*args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "cxr_node.cli", *map(str, args), "--out",
                                str(out)], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoints = out / "training" / "checkpoints"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (checkpoints.is_dir() and any(
            p.name.startswith("step-") for p in checkpoints.iterdir())):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    assert not (out / "adapter_model.safetensors").exists(), "killed too late: training had ended"
    resumed = cli(*args, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert "training.resumed" in resumed.stderr
    steps = [json.loads(line)["step"] for line in
             (out / "training" / "loss.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # each step once, none lost or repeated
    a, b = (load_file(folder / "adapter_model.safetensors") for folder in (tmp_path / "whole", out))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_the_adapter_drafts_in_the_worker_path_and_changes_the_sr_identity(
        site: dict[str, Any], demo_model: Path, tmp_path: Path) -> None:
    from cxr_node.config import ReportConfig
    from cxr_node.report import DraftReport, build_draft_sr
    from tests.modelzoo import xray_image
    from workers.model import ModelLoadError, load_model
    from workers.payload import parse_result

    request = {"request_id": "r1", "images": [xray_image(NIH_IMAGES, "00000129_000.png", "PA",
                                                         image_size=64)]}
    results = {}
    for side, adapter in (("adapter", site["adapter"]), ("base", None)):
        config = load_config(_config(site["folder"], demo_model, adapter))
        model = load_model(config.model, demo_model)
        (answer,) = model.draft([request])
        result = parse_result(answer)
        # the node's own identity of the model agrees with what the worker reports
        identity = ExpectedModel(config.model, demo_model).identity_for(result.model)
        assert (identity.adapter is not None) is (adapter is not None)
        results[side] = result.model_copy(update={"model": identity})
    adapter_result = results["adapter"]
    assert adapter_result.ok and "cardiomegaly" in adapter_result.impression  # what it learnt
    # the same words under each identity: only the model's identity differs between the SRs
    srs = {side: build_draft_sr([DX], DraftReport.from_result(adapter_result.model_copy(
        update={"model": r.model}), 10_000), ReportConfig()) for side, r in results.items()}
    base, adapted = srs["base"], srs["adapter"]
    assert base.AuthorObserverSequence[0].DeviceUID != adapted.AuthorObserverSequence[0].DeviceUID
    assert base.DeviceSerialNumber != adapted.DeviceSerialNumber
    label = json.loads((site["adapter"] / "cxr-model.json").read_text())
    assert f"{label['name']}@{label['version']}" in adapted.SoftwareVersions
    assert "DEMO" in adapted.SeriesDescription  # trained on the demo base: still a demo
    # an adapter on another base model is refused, by the worker and by the node
    other = tmp_path / "other-base"
    shutil.copytree(demo_model, other)
    weights = load_file(other / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] + 0.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    config = load_config(_config(tmp_path, other, site["adapter"]))
    with pytest.raises(ModelLoadError, match="was trained on cxr-node DEMO"):
        load_model(config.model, other)
    with pytest.raises(IdentityError, match="not on the model in"):
        model_identity(config.model, other)


@pytest.mark.slow
def test_promote_accepts_a_better_adapter_refuses_a_worse_one_and_the_node_serves_only_accepted(
        site: dict[str, Any], demo_model: Path) -> None:
    folder = site["folder"]
    base_config = _config(folder, demo_model)
    accepted = cli("model", "promote", site["adapter"], "--config", base_config)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "ACCEPTED" in accepted.stdout and "in service: cxr-node DEMO" in accepted.stdout
    # a second adapter learnt to call every heart normal: on its held-out patients (enlarged
    # hearts) it misses what the adapter in service finds
    manifest = _manifest(folder / "normal", ENLARGED, NORMAL)
    worse = folder / "normal-adapter"
    done = cli("train", "--base", demo_model, "--data", manifest, "--out", worse, "--config",
               base_config, *SETTINGS)
    assert done.returncode == 0, done.stderr
    in_service = _config(folder, demo_model, site["adapter"])
    refused = cli("model", "promote", worse, "--config", in_service)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "REFUSED" in refused.stdout
    assert "more than adaptation.promote.max_label_f1_drop (0.0)" in refused.stdout
    assert "more than adaptation.promote.max_added_significant_misses (0)" in refused.stdout
    # the model in service was measured now, on the worse adapter's held-out studies
    assert list((worse / "training").glob("eval-service-*/summary.json"))
    config = load_config(in_service)
    trail = [json.loads(line) for line in config.audit_path.read_text().splitlines()]
    decisions = [r for r in trail if r["event"] == "model.promotion"]
    assert [r["decision"] for r in decisions] == ["accepted", "refused"]
    assert decisions[1]["scores"]["candidate"]["significant_misses"] == 2
    store = Store(config.database_path)
    assert unpromoted(config, store.db) is None
    # the node vouches for the accepted adapter's drafts, and stops when its files change on disk
    # (a worker restarted on the new files reports their fingerprint: it is refused all the same)
    expected = ExpectedModel(config.model, demo_model, refusal=lambda: unpromoted(config, store.db))
    assert expected.identity_for(model_identity(config.model, demo_model)).adapter is not None
    with (site["adapter"] / "adapter_config.json").open("a") as file:
        file.write("\n")
    try:
        with pytest.raises(IdentityError, match="has not passed `cxr-node model promote`"):
            expected.identity_for(model_identity(config.model, demo_model))
    finally:
        path = site["adapter"] / "adapter_config.json"
        path.write_text(path.read_text()[:-1])
    assert expected.identity_for(model_identity(config.model, demo_model)).adapter is not None
    serving_worse = _config(folder / "normal", demo_model, worse)
    refused_node = load_config(serving_worse)
    refused_node.state_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(config.database_path, refused_node.database_path)
    message = unpromoted(refused_node, Store(refused_node.database_path).db)
    assert message is not None and "was refused by `cxr-node model promote`" in message
    serve = cli("serve", "--config", serving_worse, timeout=60)
    assert serve.returncode == 2 and "cxr-node model promote" in serve.stderr
    # an adapter never judged is not served either
    never = load_config(_config(folder / "never", demo_model, site["adapter"]))
    assert "has not passed" in (unpromoted(never, None) or "")
    check = cli("config", "check", serving_worse)
    assert check.returncode == 0 and "adapter: model.adapter: the adapter in" in check.stderr
    assert "was refused by" in check.stderr
    check = cli("config", "check", in_service)
    assert "adapter: accepted by `cxr-node model promote`" in check.stderr
    # a card edited to flatter the adapter fools the card's numbers, not a measurement
    card = json.loads((worse / CARD_NAME).read_text())
    card["heldout"]["adapter"]["scores"]["label F1 micro (14)"] = 1.0
    card["heldout"]["adapter"]["significant_misses"] = 0
    (worse / CARD_NAME).write_text(json.dumps(card))
    remeasured = promote(config, worse, remeasure=True)
    assert not remeasured.accepted and remeasured.candidate.significant_misses == 2
    assert list((worse / "training").glob("eval-candidate-*/summary.json"))
    # promote's decision follows the margins in the YAML
    lenient = folder / "lenient.yaml"
    lenient.write_text(in_service.read_text() + "adaptation:\n  promote: {max_label_f1_drop: 1.0,"
                                               " max_added_significant_misses: 10}\n")
    assert promote(load_config(lenient), worse).accepted


@pytest.mark.slow
def test_training_from_the_node_uses_its_pairs_without_identifiers(demo_model: Path,
                                                                   tmp_path: Path) -> None:
    config_path = _config(tmp_path, demo_model)
    config = load_config(config_path)
    store = Store(config.database_path)
    with store.transaction() as db:
        for number, name in enumerate(("Doe^Jane", "Roe^Richard", "Poe^Edgar"), 1):
            image = config.spool_dir / f"{number}.dcm"
            image.parent.mkdir(parents=True, exist_ok=True)
            header = pydicom.dcmread(DX)
            header.PatientName, header.PatientID = name, f"MRN-{number}"
            header.save_as(image)
            _paired_study(db, number, image, f"the heart size is large . {name.split('^')[1]} "
                                             "was told on 11/28/2026 .")
    out = tmp_path / "site-adapter"
    done = cli("train", "--base", demo_model, "--from-node", "--config", config_path, "--out",
               out, "--no-eval", "--epochs", "2", "--accumulate", "1", "--heldout-fraction", "0.3")
    assert done.returncode == 0, done.stderr
    card = read_card(out)
    assert card is not None and card.heldout == {}
    assert card.data.studies == 2 and card.data.heldout_studies == 1
    assert card.data.sources[0].source == "node"
    assert card.data.identifiers_removed == {"name": 3, "date": 3}  # from the three exported
    work = (out / "training").rglob("*.jsonl")
    for path in work:
        text = path.read_text()
        for identifier in ("Jane", "Richard", "Edgar", "11/28/2026", "MRN-"):
            assert identifier not in text, (path.name, identifier)
    refused = cli("model", "promote", out, "--config", config_path)
    assert refused.returncode == 1 and "no held-out scores" in refused.stdout
