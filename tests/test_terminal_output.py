"""What cxr-node prints on a terminal cannot be used to attack that terminal.

An SR from anywhere (`cxr-node show` renders anyone's document) and reasons that quote a peer can
carry escape sequences that clear the screen, retitle the window or hide lines, and bidirectional
overrides that make text read differently from its bytes. They are shown as escapes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, generate_uid

from cxr_node.show import printable, render_sr

ATTACK = "No acute disease.\x1b[2J\x1b]0;owned\x07\x1b[8m hidden\u202e tfel\x9b31m"


def hostile_sr(path: Path) -> Path:
    """A minimal SR whose header and text carry terminal escapes."""
    text = Dataset()
    text.RelationshipType = "CONTAINS"
    text.ValueType = "TEXT"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding\x1b[1A"
    text.ConceptNameCodeSequence = [name]
    text.TextValue = ATTACK
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.Modality = "SR"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SeriesDescription = "AI DRAFT\x1b[0m\x1b]52;c;ZWNobyBwd25lZA==\x07"
    ds.ValueType = "CONTAINER"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", "Report"
    ds.ConceptNameCodeSequence = [title]
    ds.ContentSequence = [text]
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_terminal_safe(output: str) -> None:
    lines = output.split("\n")
    for line in lines:
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in line), repr(line)
        assert "\u202e" not in line


def test_show_escapes_control_characters_from_the_document(tmp_path: Path):
    path = hostile_sr(tmp_path / "hostile.dcm")
    rendered = render_sr(pydicom.dcmread(path))
    assert_terminal_safe(rendered)
    assert "No acute disease.\\x1b[2J\\x1b]0;owned\\x07" in rendered
    assert "\\u202e tfel\\x9b31m" in rendered and "\\x1b]52;c;" in rendered
    done = subprocess.run([sys.executable, "-m", "cxr_node", "show", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert_terminal_safe(done.stdout)


def test_printable_keeps_every_language_and_escapes_only_controls():
    assert printable("Kein Erguss. 胸水なし. Épanchement: non. ليس") == (
        "Kein Erguss. 胸水なし. Épanchement: non. ليس")
    assert printable("\x00\t\x1b\x7f\x85\u2066") == "\\x00\\x09\\x1b\\x7f\\x85\\u2066"
