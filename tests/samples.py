"""The real radiographs the tests use, gathered into one folder once per test session.

Nothing is read from outside the repository: the NEMA WG-04 compression samples come from the
``pydicom-data`` package (pinned in the ``dev`` extra, found by ``pydicom.data.get_testdata_file``
without a download), the small files kept in ``tests/data/`` are listed with their licences and
checksums in ``tests/data/README.md``, and every other sample is derived from those here, the
same way each time (fixed UIDs, no clock, dcmtk's encoders with ``+un``: no new UIDs).

=========================== ========================================================================
sample                      what it is (and why it is made the way it is)
=========================== ========================================================================
RG1_J2KI.dcm                WG-04 RG1 as published: CR chest PA, MONOCHROME1, 1955x1841, 15 bits,
                            JPEG 2000 (lossy)
RG3_J2KR.dcm                WG-04 RG3 as published: CR lower leg AP ("EXTREMITY"), MONOCHROME1,
                            1760x1760, 10 bits, JPEG 2000 lossless
highdicom_dx_image.dcm      tests/data: a dog's lateral thorax, DX, MONOCHROME1 + INVERSE, 8 bits,
                            explicit VR little endian; its header gives no view position
RG1_JLSN.dcm                RG1_UNCR encoded JPEG-LS near-lossless (dcmcjpls +en, NEAR 2), as
                            WG-04's own RG1_JLSN: same study as RG1_J2KI, its own SOP Instance UID
                            and instance number 7 (a later exposure of the same view)
RG3_MONO2_JPLL.dcm          RG3_UNCR made MONOCHROME2 (stored values and window mirrored), encoded
                            JPEG lossless SV1 (dcmcjpeg +e1), body part LEG, view position blank, a
                            study of its own: a non-chest study in the two syntaxes and photometric
                            interpretation no other sample has
CR-MONO1-10-chest.dcm       RG1_UNCR scaled to 440x414 and to 10 bits stored, a study of its own
                            (patient "Anonymized", no ID), written with neither preamble nor File
                            Meta, implicit VR little endian: what old devices and archives write
RG1_DX_J2KR.dcm             RG1_J2KR's codestream untouched in a DX For Presentation header with
                            Presentation LUT Shape INVERSE, a study of its own, and the defects of a
                            real export: a 56-character AccessionNumber (SH allows 16) and a hashed,
                            56-character PatientBirthDate (not a date)
RG1_DX_J2KR_broken.dcm      RG1_DX_J2KR with its codestream's COM marker segment given a length
                            below the minimum: same SOP Instance UID, other bytes, never decodes
=========================== ========================================================================
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    generate_uid,
)

DATA = Path(__file__).resolve().parent / "data"
NIH_IMAGES = DATA / "nih-cxr14"
SMALL_SIDE = 440
# A COM marker segment's length counts itself and Rcom: anything below 5 is malformed (T.800 A.9.2)
COM = b"\xff\x64"
BAD_COM_LENGTH = b"\x00\x01"


def wg04(name: str) -> Path:
    """A NEMA WG-04 sample from pydicom-data, never downloaded."""
    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(
            f"{name} is not installed: the test samples come from pydicom-data "
            "(pip install -e '.[dev]' installs the pinned version)")
    return Path(path)


def _source(name: str) -> Dataset:
    """A WG-04 sample to derive from, without its Data Set Trailing Padding: dcmtk drops that when
    it sends a file, and a derived copy has nothing to pad."""
    ds = pydicom.dcmread(wg04(name))
    ds.pop(0xFFFCFFFC, None)
    return ds


def uid(label: str) -> str:
    """A fixed UID for a derived object, so that every session derives the same files."""
    return str(generate_uid(entropy_srcs=["cxr-node test sample", label]))


def hashed(label: str) -> str:
    """A 56-character hex digest, as some exports write in place of identifying values."""
    return hashlib.sha224(label.encode()).hexdigest()


def _dcmtk(tool: str, source: Path, target: Path, *options: str) -> None:
    done = subprocess.run([f"/usr/bin/{tool}", *options, str(source), str(target)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} {source.name}: {done.stderr.strip() or done.stdout.strip()}")


def _encoded(ds: Dataset, target: Path, tool: str, *options: str) -> None:
    """``ds`` written uncompressed, then encoded by a dcmtk tool into ``target``."""
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.dcm"
        ds.save_as(plain, enforce_file_format=True)
        _dcmtk(tool, plain, target, "+un", *options)


def _new_study(ds: Dataset, label: str) -> None:
    ds.StudyInstanceUID = uid(f"{label} study")
    ds.SeriesInstanceUID = uid(f"{label} series")
    ds.SOPInstanceUID = uid(f"{label} instance")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def rg1_jlsn(target: Path) -> None:
    ds = _source("RG1_UNCR.dcm")
    ds.SOPInstanceUID = uid("RG1_JLSN instance")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = 7
    _encoded(ds, target, "dcmcjpls", "+en")


def rg3_mono2_jpll(target: Path) -> None:
    ds = _source("RG3_UNCR.dcm")
    top = 2**ds.BitsStored - 1
    ds.set_pixel_data((top - ds.pixel_array).astype(np.uint16), "MONOCHROME2", ds.BitsStored)
    # x -> top - x maps the LINEAR window (c - 0.5 +- (w - 1) / 2) onto centre top - c + 1
    ds.WindowCenter = top - float(ds.WindowCenter) + 1
    ds.BodyPartExamined = "LEG"
    ds.ViewPosition = ""
    _new_study(ds, "RG3_MONO2_JPLL")
    _encoded(ds, target, "dcmcjpeg", "+e1")


def small_chest(target: Path) -> None:
    ds = _source("RG1_UNCR.dcm")
    rows, columns = ds.Rows, ds.Columns
    size = (round(columns * SMALL_SIDE / rows), SMALL_SIDE)
    image = Image.fromarray(ds.pixel_array.astype(np.float32)).resize(size, Image.Resampling.BOX)
    shift = ds.BitsStored - 10
    pixels = np.clip(np.rint(np.asarray(image) / 2**shift), 0, 1023).astype(np.uint16)
    ds.set_pixel_data(pixels, "MONOCHROME1", 10)
    ds.WindowCenter = round(float(ds.WindowCenter) / 2**shift)
    ds.WindowWidth = round(float(ds.WindowWidth) / 2**shift)
    ds.PatientName = "Anonymized"
    del ds.PatientID  # de-identified as such files often are: another patient to every check
    _new_study(ds, "CR-MONO1-10-chest")
    ds.file_meta = FileMetaDataset()
    ds.preamble = None
    pydicom.dcmwrite(target, ds, implicit_vr=True, little_endian=True)


def _rg1_dx() -> Dataset:
    ds = _source("RG1_J2KR.dcm")
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PresentationLUTShape = "INVERSE"
    ds.PatientName = hashed("RG1_DX patient name")
    ds.PatientID = "RG1-DX-1"
    ds.AccessionNumber = ds.PatientBirthDate = hashed("RG1_DX accession")
    _new_study(ds, "RG1_DX_J2KR")
    return ds


def rg1_dx_j2kr(target: Path) -> None:
    _rg1_dx().save_as(target, enforce_file_format=True)


def rg1_dx_j2kr_broken(target: Path) -> None:
    ds = _rg1_dx()
    [codestream] = generate_frames(ds.PixelData, number_of_frames=1)
    at = codestream.find(COM)
    start = ds.PixelData.find(codestream[: at + 4])  # it spans fragments: find its main header
    if at < 0 or start < 0:
        raise ValueError("RG1_J2KR's codestream has no COM marker segment to break")
    length = start + at + 2  # where the segment's length field is
    ds.PixelData = ds.PixelData[:length] + BAD_COM_LENGTH + ds.PixelData[length + 2 :]
    ds.save_as(target, enforce_file_format=True)


def _copy(source: Callable[[], Path]) -> Callable[[Path], None]:
    return lambda target: shutil.copyfile(source(), target)


SAMPLES: dict[str, Callable[[Path], None]] = {
    "RG1_J2KI.dcm": _copy(lambda: wg04("RG1_J2KI.dcm")),
    "RG3_J2KR.dcm": _copy(lambda: wg04("RG3_J2KR.dcm")),
    "highdicom_dx_image.dcm": _copy(lambda: DATA / "highdicom_dx_image.dcm"),
    "RG1_JLSN.dcm": rg1_jlsn,
    "RG3_MONO2_JPLL.dcm": rg3_mono2_jpll,
    "CR-MONO1-10-chest.dcm": small_chest,
    "RG1_DX_J2KR.dcm": rg1_dx_j2kr,
    "RG1_DX_J2KR_broken.dcm": rg1_dx_j2kr_broken,
}


def build_samples(folder: Path) -> Path:
    """Every sample into ``folder`` (which must exist), read-only."""
    settings = pydicom.config.settings
    modes = settings.reading_validation_mode, settings.writing_validation_mode
    # pydicom warns of the invalid values written on purpose; the tests want them as they are
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        for name, make in SAMPLES.items():
            target = folder / name
            make(target)
            target.chmod(0o444)
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = modes
    return folder
