"""Check an SR file with the reference validators, for any test that writes one.

``assert_valid_sr(path)`` runs dicom3tools ``dciodvfy`` (the IOD validator: it prints to stderr
and exits 1 only on errors, so every line containing "Error" counts) and dcmtk ``dsrdump +U8``
(the SR tree must parse: exit 0 and no E:/F: line, and no W: line beyond dcmtk 3.6.7's notice
that its VR checker does not know ISO_IR 192). With ``image``, it also runs ``dcentvfy SR IMAGE``,
which reports "Error - ..." lines and exits 1 when the two files disagree on patient or study
attributes of the same Study Instance UID. dcentvfy compares entities by UID only: a different
Study Instance UID or Patient ID makes them different entities and it says nothing, and it files
AccessionNumber under different entities for SR and CR, so those three are compared here as well,
together with the image being listed as evidence.

None of these tools notices a missing evidence or template sequence, so tests still check those
themselves. A missing tool fails the test: a validator that did not run must never look like one
that passed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

TOOLS = {
    "dciodvfy": "dicom3tools",
    "dcentvfy": "dicom3tools",
    "dsrdump": "dcmtk",
}
# dcmtk 3.6.7 says this about every UTF-8 file; it is about its checker, not about the file.
DSRDUMP_CHARSET_NOTICE = "The VR checker does not support this Specific Character Set: ISO_IR 192"


def assert_valid_sr(path: Path, image: Path | None = None) -> None:
    """Fail (showing the tool's output) unless ``path`` is a valid SR, consistent with ``image``."""
    path = Path(path)
    assert path.is_file(), f"{path}: no such file"
    _dciodvfy(path)
    _dsrdump(path)
    if image is not None:
        _dcentvfy(path, Path(image))
        _same_patient_and_study(path, Path(image))


def _run(tool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    executable = shutil.which(tool)
    if executable is None:
        pytest.fail(
            f"{tool} not found on PATH: install the Debian package {TOOLS[tool]}; SR validation "
            "cannot be skipped",
            pytrace=False,
        )
    return subprocess.run(
        [executable, *map(str, args)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        check=False,
    )


def _output(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout}--- stderr\n{done.stderr}"


def _dciodvfy(path: Path) -> None:
    done = _run("dciodvfy", path)
    lines = (done.stdout + done.stderr).splitlines()
    errors = [line for line in lines if "Error" in line]
    if errors or done.returncode != 0:
        pytest.fail(f"dciodvfy {path.name}: {len(errors)} error(s)\n{_output(done)}")


def _dsrdump(path: Path) -> None:
    done = _run("dsrdump", "+U8", path)
    complaints = [
        line
        for line in done.stderr.splitlines()
        if line[:2] in ("E:", "F:", "W:") and DSRDUMP_CHARSET_NOTICE not in line
    ]
    if done.returncode != 0 or complaints or not done.stdout.strip():
        pytest.fail(f"dsrdump +U8 {path.name} did not read the SR cleanly\n{_output(done)}")


def _dcentvfy(path: Path, image: Path) -> None:
    done = _run("dcentvfy", path, image)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]
    if errors or done.returncode != 0:
        pytest.fail(f"dcentvfy {path.name} {image.name}: entities disagree\n{_output(done)}")


def _same_patient_and_study(path: Path, image: Path) -> None:
    """What dcentvfy cannot see: same study, same patient, same order, image listed as evidence."""
    sr = pydicom.dcmread(path)
    img = pydicom.dcmread(image, stop_before_pixels=True, force=True)
    for keyword in ("StudyInstanceUID", "PatientID", "AccessionNumber"):
        assert str(sr.get(keyword, "")) == str(img.get(keyword, "")), (
            f"{path.name} and {image.name} differ in {keyword}"
        )
    listed = {
        str(instance.ReferencedSOPInstanceUID)
        for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert str(img.SOPInstanceUID) in listed, f"{path.name} does not list {image.name} as evidence"
