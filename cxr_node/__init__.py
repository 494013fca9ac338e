"""cxr-node: a DICOM node that drafts preliminary chest X-ray reports."""

__version__ = "0.1.0"
