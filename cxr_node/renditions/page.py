"""The draft as a Secondary Capture image of its page, for viewers that show only images.

The image is the PDF rendition rasterised by PDFium (pypdfium2), so both show the same thing and
no text is laid out twice: 8-bit MONOCHROME2 (black text on white), BurnedInAnnotation YES,
ConversionType WSD, at RESOLUTION dots per inch (an A4 page is 1654 x 2339 pixels, legible on a
report monitor at fit-to-height and sharp when zoomed). It is stored uncompressed (Explicit VR
Little Endian, about 3.9 MB a page), which every PACS takes; the PACS may compress it as it
stores images.

One page is a Secondary Capture Image (the SOP class every image viewer shows); a longer draft is
a Multi-frame Grayscale Byte Secondary Capture Image with one frame per page, numbered in its
Page Number Vector, so nothing of the draft is cut off. A draft of more than MAX_PAGES pages gets
no page image but a reason (ReportError); its PDF shows it whole.
"""

from __future__ import annotations

import numpy as np
import pypdfium2 as pdfium
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from cxr_node import report
from cxr_node.config import ReportConfig
from cxr_node.renditions import pdf

RESOLUTION = 200  # dots per inch
# About 3.9 MB of pixels a page: a draft of the default 8,000 characters fills three pages; text
# that is mostly line breaks would fill dozens, and is refused before any page is drawn.
MAX_PAGES = 16
POINTS_PER_INCH = 72


def build(sr: Dataset, settings: ReportConfig) -> Dataset:
    """The draft SR's page(s) as a Secondary Capture instance in the SR's study."""
    pages = rasterise(pdf.render(sr, settings))
    multi = len(pages) > 1
    ds = pdf.rendition_dataset(
        sr, settings, "page",
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage if multi
        else SecondaryCaptureImageStorage)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientOrientation = ""
    ds.BodyPartExamined = "CHEST"  # what the node drafts; an unpaired part needs no Laterality
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pages[0].shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = 128, 256  # the page as printed, whatever the viewer guesses
    if multi:
        ds.NumberOfFrames = len(pages)
        ds.FrameIncrementPointer = Tag("PageNumberVector")
        ds.PageNumberVector = list(range(1, len(pages) + 1))
        ds.PresentationLUTShape = "IDENTITY"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PixelData = np.stack(pages).tobytes()
    return ds


def rasterise(document: bytes) -> list[np.ndarray]:
    """Each page of a PDF as 8-bit grey levels (0 black, 255 white) at RESOLUTION dpi."""
    try:
        pdf_document = pdfium.PdfDocument(document)
    except pdfium.PdfiumError as exc:
        raise report.ReportError(f"the PDF rendition cannot be rasterised: {exc}") from exc
    try:
        if len(pdf_document) > MAX_PAGES:
            raise report.ReportError(
                f"the draft fills {len(pdf_document)} pages; the page rendition holds at most "
                f"{MAX_PAGES} (about {MAX_PAGES * 4} MB of pixels): send the pdf rendition to "
                "this destination instead")
        pages = []
        for page in pdf_document:
            bitmap = page.render(scale=RESOLUTION / POINTS_PER_INCH, grayscale=True)
            pages.append(bitmap.to_numpy().copy())
            bitmap.close()
            page.close()
    finally:
        pdf_document.close()
    if not pages or len({p.shape for p in pages}) != 1:
        raise report.ReportError("the PDF rendition has no pages, or pages of different sizes")
    return pages
