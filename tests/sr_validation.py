"""Check an SR file with the reference validators, for any test that writes one.

``assert_valid_sr(path)`` runs dicom3tools ``dciodvfy`` (the IOD validator: it prints to stderr
and exits 1 only on errors, so every line containing "Error" counts) and dcmtk ``dsrdump +U8``
(the SR tree must parse: exit 0 and no E:/F: line, and no W: line beyond dcmtk 3.6.7's notice
that its VR checker does not know ISO_IR 192). With ``image``, it also runs ``dcentvfy SR IMAGE``,
which reports "Error - ..." lines and exits 1 when the two files disagree on patient or study
attributes of the same Study Instance UID; it compares bytes, so an image in another character set
than the SR's is given to it as a copy holding the same text in the SR's. dcentvfy compares
entities by UID only: a different Study Instance UID or Patient ID makes them different entities
and it says nothing, and it files AccessionNumber under different entities for SR and CR, so those
three are compared here as well, together with the image being listed as evidence.

An SR of images whose identifiers are not valid DICOM carries them unchanged (cxr_node/report.py,
"Source values"); ``nonconformant_source`` names those attributes, and dciodvfy may then report
errors that name them (and its summary line after a value invalid for its VR), dsrdump warnings
that name them, and nothing else. ``dciodvfy_errors`` gives a test the error lines themselves.

None of these tools notices a missing evidence or template sequence, so tests still check those
themselves. A missing tool fails the test: a validator that did not run must never look like one
that passed.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Collection
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.tag import Tag

TOOLS = {
    "dciodvfy": "dicom3tools",
    "dcentvfy": "dicom3tools",
    "dsrdump": "dcmtk",
}
# dcmtk 3.6.7 says this about every UTF-8 file; it is about its checker, not about the file.
DSRDUMP_CHARSET_NOTICE = "The VR checker does not support this Specific Character Set: ISO_IR 192"
# dciodvfy's closing line after any value invalid for its VR; it names no attribute itself.
DCIODVFY_VR_SUMMARY = "Error - Dicom dataset contains invalid data values for Value Representations"


def assert_valid_sr(path: Path, image: Path | None = None, *,
                    nonconformant_source: Collection[str] = ()) -> None:
    """Fail (showing the tool's output) unless ``path`` is a valid SR, consistent with ``image``.

    ``nonconformant_source``: keywords of the values copied unchanged from a source that is not
    valid DICOM; dciodvfy errors on them are expected, any other error still fails.
    """
    path = Path(path)
    assert path.is_file(), f"{path}: no such file"
    _dciodvfy(path, nonconformant_source)
    _dsrdump(path, nonconformant_source)
    if image is not None:
        _dcentvfy(path, Path(image))
        _same_patient_and_study(path, Path(image))


def assert_valid_dicom(path: Path, image: Path | None = None, *,
                       nonconformant_source: Collection[str] = ()) -> None:
    """Fail unless dciodvfy finds ``path`` a valid instance of its IOD (any IOD: a PDF, an image;
    errors only on the ``nonconformant_source`` values, as for an SR) and, with ``image``,
    dcentvfy finds the two agreeing on patient and study."""
    path = Path(path)
    assert path.is_file(), f"{path}: no such file"
    _dciodvfy(path, nonconformant_source)
    if image is not None:
        _dcentvfy(path, Path(image))


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


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines in which dciodvfy reports an error in ``path``; none for a valid object."""
    done = _run("dciodvfy", path)
    errors = _errors(done)
    if done.returncode != 0 and not errors:
        pytest.fail(f"dciodvfy {Path(path).name} failed without naming an error\n{_output(done)}")
    return errors


def names_attribute(line: str, keyword: str) -> bool:
    """Whether a dciodvfy line is about ``keyword``, which it names by tag, "(0x0008,0x0050)", or
    by keyword, "Element=<AccessionNumber>"."""
    tag = Tag(tag_for_keyword(keyword))
    return (f"(0x{tag.group:04x},0x{tag.element:04x})" in line.lower()
            or f"Element=<{keyword}>" in line)


def _dciodvfy(path: Path, nonconformant_source: Collection[str] = ()) -> None:
    errors = dciodvfy_errors(path)
    named = [e for e in errors if any(names_attribute(e, k) for k in nonconformant_source)]
    expected = named + ([DCIODVFY_VR_SUMMARY] if named else [])
    unexpected = [e for e in errors if e not in expected]
    if unexpected:
        pytest.fail(f"dciodvfy {path.name}: {len(unexpected)} error(s)\n" + "\n".join(errors))


def _errors(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.strip() for line in (done.stdout + done.stderr).splitlines() if "Error" in line]


def _dsrdump(path: Path, nonconformant_source: Collection[str] = ()) -> None:
    done = _run("dsrdump", "+U8", path)
    expected = (DSRDUMP_CHARSET_NOTICE, *(f"W: {keyword} (" for keyword in nonconformant_source))
    complaints = [
        line
        for line in done.stderr.splitlines()
        if line[:2] in ("E:", "F:", "W:") and not any(e in line for e in expected)
    ]
    if done.returncode != 0 or complaints or not done.stdout.strip():
        pytest.fail(f"dsrdump +U8 {path.name} did not read the SR cleanly\n{_output(done)}")


def _dcentvfy(path: Path, image: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        done = _run("dcentvfy", path, _in_character_set_of(path, image, Path(tmp)))
    errors = _errors(done)
    if errors or done.returncode != 0:
        pytest.fail(f"dcentvfy {path.name} {image.name}: entities disagree\n{_output(done)}")


def _in_character_set_of(sr: Path, image: Path, directory: Path) -> Path:
    """``image``, or a header-only copy holding the same text in the SR's Specific Character Set
    when the image has another one: dcentvfy compares bytes, not text."""
    charset = pydicom.dcmread(sr, stop_before_pixels=True).get("SpecificCharacterSet")
    header = pydicom.dcmread(image, stop_before_pixels=True, force=True)
    if header.get("SpecificCharacterSet") == charset:
        return image
    header.decode()  # every text value now held as text, so it is written in the new set
    header.SpecificCharacterSet = charset
    copy = directory / image.name
    header.save_as(copy)
    return copy


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
