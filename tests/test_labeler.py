"""The CheXpert-style labeler: negation, uncertainty and their reach, the weak organ phrases,
No Finding, agreement with the manual MeSH indexing of the IU X-ray reports, and
`cxr-node eval label` end to end."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from statistics import fmean

import pytest

from cxr_node.cli import main
from cxr_node.evaluation import OBSERVATIONS, agreement, label, labels, mesh, significant_misses


@pytest.mark.parametrize(("text", "expected"), [
    # negation, before and after the mention
    ("No pneumothorax.", {"Pneumothorax": 0, "No Finding": 1}),
    ("No focal consolidation, pleural effusion, or pneumothorax.",
     {"Consolidation": 0, "Pleural Effusion": 0, "Pneumothorax": 0}),
    ("Lungs are free of focal airspace disease.", {"Lung Opacity": 0}),
    ("The left apical pneumothorax has resolved.", {"Pneumothorax": 0}),
    ("Right IJ catheter has been removed.", {"Support Devices": 0}),
    ("Negative for pneumothorax.", {"Pneumothorax": 0}),
    # uncertainty
    ("Opacity may represent atelectasis.", {"Atelectasis": -1, "Lung Opacity": -1}),
    ("Findings suspicious for pneumonia.", {"Pneumonia": -1}),
    ("Atelectasis versus pneumonia.", {"Atelectasis": -1, "Pneumonia": -1}),
    ("Pneumothorax cannot be excluded.", {"Pneumothorax": -1}),
    ("Cannot exclude a small effusion.", {"Pleural Effusion": -1}),
    ("No new consolidation.", {"Consolidation": -1}),
    ("Pulmonary vascular congestion.", {"Edema": -1}),
    ("Borderline cardiomegaly.", {"Cardiomegaly": -1}),
    # the reach of a cue: its sentence, up to words such as "but" and "otherwise"
    ("No pneumothorax. Small left pleural effusion.",
     {"Pneumothorax": 0, "Pleural Effusion": 1, "No Finding": None}),
    ("No pneumothorax, but a small left pleural effusion.",
     {"Pneumothorax": 0, "Pleural Effusion": 1}),
    ("Mild cardiomegaly, otherwise no acute abnormality.", {"Cardiomegaly": 1}),
    ("Possible pneumonia. Large right effusion.", {"Pneumonia": -1, "Pleural Effusion": 1}),
    ("No change in the left effusion.", {"Pleural Effusion": 1}),
    # the heart and mediastinum: an organ named is not a finding until qualified
    ("Heart size is normal.", {"Cardiomegaly": 0, "No Finding": 1}),
    ("The heart is normal in size and the mediastinum is unremarkable.",
     {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0}),
    ("Normal heart size and mediastinal contours.",
     {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0}),
    ("Heart size is at the upper limits of normal.", {"Cardiomegaly": 0}),
    ("The heart is mildly enlarged.", {"Cardiomegaly": 1}),
    ("Enlarged cardiac silhouette.", {"Cardiomegaly": 1}),
    ("Stable heart size.", {"Cardiomegaly": -1, "No Finding": None}),
    ("Opacity overlying the heart.", {"Cardiomegaly": None, "Lung Opacity": 1}),
    ("The heart and lungs are seen.", {"Cardiomegaly": None}),
    ("Widened mediastinum.", {"Enlarged Cardiomediastinum": 1}),
    # words that contain a mention but name something else
    ("Small pericardial effusion.", {"Pleural Effusion": None}),
    ("Calcified nodule in the left upper lobe.", {"Lung Lesion": None, "No Finding": None}),
    ("Sequela of old granulomatous infection.", {"Pneumonia": None}),
    # CheXpert's exception: heart failure is also an uncertain Cardiomegaly
    ("Findings consistent with CHF.", {"Edema": 1, "Cardiomegaly": -1}),
    # No Finding: 1 unless a finding other than a device is positive or uncertain
    ("No acute cardiopulmonary abnormality.", {"No Finding": 1}),
    ("Right PICC tip in the SVC. Lungs are clear.", {"Support Devices": 1, "No Finding": 1}),
    ("Degenerative changes of the spine. No acute disease.", {"No Finding": None}),
    ("Healed right rib fractures.", {"Fracture": 1, "No Finding": None}),
    ("", dict.fromkeys(OBSERVATIONS)),
    ("...", dict.fromkeys(OBSERVATIONS)),
])
def test_label(text: str, expected: dict[str, int | None]) -> None:
    got = label(text)
    assert list(got) == list(OBSERVATIONS)
    assert {k: got[k] for k in expected} == expected


def test_label_is_case_blind_and_reads_every_section() -> None:
    assert label("FINDINGS: NO PNEUMOTHORAX.\nIMPRESSION: Large right PLEURAL EFFUSION.") == {
        **dict.fromkeys(OBSERVATIONS), "Pneumothorax": 0, "Pleural Effusion": 1}


def test_a_hostile_sentence_is_cut_so_labeling_time_stays_linear() -> None:
    """Each mention looks for cues in its clause: one endless sentence would make that quadratic
    (a 190 kB line took 78 s), so clauses are cut to MAX_CLAUSE_CHARS."""
    text = "no effusion " * 20_000
    assert max(len(c) for c in labels._clauses(text)) <= labels.MAX_CLAUSE_CHARS
    assert label(text)["Pleural Effusion"] is not None


def test_significant_misses() -> None:
    reference = label("Large right pneumothorax. Moderate cardiomegaly. Small left effusion.")
    assert significant_misses(reference, label("No pneumothorax. The heart is enlarged.")) == [
        "Pneumothorax", "Pleural Effusion"]
    # an uncertain draft is not a miss; a positive draft of another finding does not help
    assert significant_misses(reference, label(
        "Possible pneumothorax. Cardiomegaly. Small left pleural effusion.")) == []
    assert significant_misses(label("Lungs are clear."), label("")) == []


# -- the MeSH mapping and the IU X-ray agreement --------------------------------------------


@pytest.mark.parametrize(("terms", "expected"), [
    (["normal"], {"No Finding": 1, "Cardiomegaly": 0}),
    (["Pleural Effusion/bilateral/small", "Pulmonary Atelectasis/base/left"],
     {"Pleural Effusion": 1, "Atelectasis": 1, "No Finding": 0}),
    (["Cardiomegaly/borderline"], {"Cardiomegaly": -1}),
    (["Cardiomegaly/borderline", "Cardiac Shadow/enlarged/mild"], {"Cardiomegaly": 1}),
    (["Cardiac Shadow/right/prominent"], {"Cardiomegaly": 0}),
    (["Opacity/lung/middle lobe/right/round"], {"Lung Opacity": 1, "Lung Lesion": 1}),
    (["Opacity/lung/base/left"], {"Lung Opacity": 1, "Lung Lesion": 0}),
    (["Catheters, Indwelling/right", "Stents/coronary vessels"],
     {"Support Devices": 1, "No Finding": 1}),
    (["Catheters, Indwelling/right", "Spondylosis/thoracic vertebrae"],
     {"Support Devices": 1, "No Finding": 0}),
    (["Thickening/pleura/apex"], {"Pleural Other": 1}),
    (["Calcified Granuloma/lung"], dict.fromkeys(OBSERVATIONS, 0)),
])
def test_mesh_labels(terms: list[str], expected: dict[str, int]) -> None:
    got = mesh.mesh_labels(terms)
    assert {k: got[k] for k in expected} == expected


def test_agreement_with_the_iu_mesh_indexing(iu_reports: Path) -> None:
    """The labeler against the manual MeSH indexing of the 3,800 indexed IU X-ray reports:
    macro F1 0.8 or more over the observations MeSH covers (benchmarks/labeler_agreement.py
    prints the table)."""
    reports = [r for r in mesh.iu_reports(iu_reports) if r.indexed and r.text]
    assert len(reports) > 3800
    rows = agreement([mesh.mesh_labels(r.major) for r in reports],
                     [label(r.text) for r in reports], mesh.COVERED)
    assert fmean(r.f1 or 0.0 for r in rows) >= 0.8, rows
    assert min(r.f1 or 0.0 for r in rows) >= 0.7, rows


def test_iu_archive_bounds(tmp_path: Path) -> None:
    import tarfile

    archive = tmp_path / "big.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("ecgen-radiology/1.xml")
        info.size = mesh.MAX_MEMBER_BYTES + 1
        tar.addfile(info, io.BytesIO(b" " * info.size))
    with pytest.raises(ValueError, match=r"1\.xml is 1000001 bytes"):
        list(mesh.iu_reports(archive))


# -- cxr-node eval label --------------------------------------------------------------------


def eval_label(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
               data: bytes) -> tuple[int, list[dict], str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    code = main(["eval", "label"])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def test_eval_label(monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    code, rows, err = eval_label(monkeypatch, capsys, b"".join(
        json.dumps(r).encode() + b"\n" for r in [
            {"id": "s1", "text": "No pneumothorax. Small left pleural effusion."},
            {"id": 2, "text": "Possible pneumonia."}]))
    assert code == 0 and err == ""
    assert rows[0] == {"id": "s1", **label("No pneumothorax. Small left pleural effusion.")}
    assert rows[0]["Pleural Effusion"] == 1 and rows[0]["Pneumothorax"] == 0
    assert rows[0]["Edema"] is None
    assert rows[1]["id"] == "2" and rows[1]["Pneumonia"] == -1
    assert all(list(r)[1:] == list(OBSERVATIONS) for r in rows)


def test_eval_label_names_bad_lines_and_labels_the_others(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    data = (b'{"id": "a", "text": "No pneumothorax."}\n'
            b"not json\n"
            b"\n"
            b'{"id": "b\\u001b[2J", "text": "x"}\n'
            b'{"id": "c", "text": "' + b"a" * 300_000 + b'"}\n'
            b'{"id": "d", "text": "Cardiomegaly."}\n')
    code, rows, err = eval_label(monkeypatch, capsys, data)
    assert code == 1
    assert [r["id"] for r in rows] == ["a", "d"]
    assert "stdin:2: not JSON" in err
    assert 'stdin:4: "id" must be 1 to 200 printable characters' in err
    assert "stdin:5: longer than" in err
    assert "\x1b" not in err


def test_eval_label_command_stops_at_the_record_limit() -> None:
    """The installed command, reading a pipe; past the limit it stops with an error."""
    from cxr_node.evaluation.jsonl import MAX_RECORDS

    data = b'{"id": 1, "text": "No pneumothorax."}\n' * (MAX_RECORDS + 5)
    done = subprocess.run([str(Path(sys.executable).parent / "cxr-node"), "eval", "label"],
                          input=data, capture_output=True, timeout=300)
    assert done.returncode == 2
    assert done.stdout.count(b"\n") == MAX_RECORDS
    assert f"stdin:{MAX_RECORDS + 1}: more than {MAX_RECORDS} reports".encode() in done.stderr
