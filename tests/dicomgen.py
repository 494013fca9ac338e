"""Synthetic chest X-ray instances for tests that need many studies (real files are too few)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)


def make_cxr(
    study_uid: str,
    view: str = "PA",
    rows: int = 64,
    columns: int = 64,
    seed: int = 0,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    **attributes: object,
) -> Dataset:
    """A CR chest image with random 12-bit pixels; identifiers are obviously synthetic."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "SYNTHETIC^TEST"
    ds.PatientID = "TEST-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, size=(rows, columns), dtype=np.uint16).tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


def write_study(directory: Path, views: list[str], seed: int = 0, **kw: object) -> list[Path]:
    """One study with the given views, written as Part-10 files; returns the paths."""
    study_uid = generate_uid()
    series_uid = generate_uid()
    paths = []
    for i, view in enumerate(views):
        ds = make_cxr(study_uid, view=view, seed=seed * 100 + i, series_uid=series_uid,
                      InstanceNumber=i + 1, **kw)
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dataset_bytes(path: Path) -> bytes:
    """The dataset as encoded after the File Meta group (the whole file if it has none)."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        return data
    (group_length,) = struct.unpack_from("<I", data, 132 + 8)
    return data[132 + 12 + group_length:]


def same_dataset(stored: Path, source: Path) -> bool:
    """Every element equal, Pixel Data bytes identical (dcmtk pads odd lengths with one byte).

    storescu re-encodes sequences (explicit instead of undefined lengths) when it sends, so the
    bytes on the wire differ from the source file; what the node must keep is exactly what came.
    """
    a = pydicom.dcmread(stored)
    b = pydicom.dcmread(source, force=True)
    pa, pb = a.get("PixelData"), b.get("PixelData")
    if pa != pb and not (pb and len(pa) == len(pb) + 1 and pa.startswith(pb) and pa[-1] == 0):
        return False
    for ds in (a, b):
        ds.pop("PixelData", None)
    return a == b
