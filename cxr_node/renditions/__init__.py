"""Renditions: the draft in forms that viewers which never show an SR can show, one module each.

Many PACS viewers display no Structured Report (or only TID 1500 measurement SRs); a destination
that feeds one asks for ``renditions: [sr, pdf, page]``. Each rendition is built from the SR
dataset itself, after the SR is written, so it shows exactly what the SR says, with the same
labels (AI PRELIMINARY DRAFT, NOT VERIFIED, DEMO where it applies), in the images' study, in a
series of its own, with a UID derived from the SR's (a rebuilt draft is the same instance again).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pydicom.dataset import Dataset

from cxr_node.config import ReportConfig
from cxr_node.renditions import page, pdf

Builder = Callable[[Dataset, ReportConfig], Dataset]

BUILDERS: dict[str, Builder] = {
    "pdf": pdf.build,
    "page": page.build,
}
"""rendition -> how it is built from the draft SR (``sr`` is the SR itself)."""


def needed(destinations: Iterable[object]) -> list[str]:
    """The renditions other than the SR that at least one destination asks for."""
    wanted = {r for d in destinations for r in getattr(d, "renditions", ())}
    return [r for r in ("pdf", "page") if r in wanted]
