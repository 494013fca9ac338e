"""Identifiers out of report text before it becomes training data.

A signed report names people (the radiologist who signed, the clinician told of a finding), dates
and times (of the comparison study, of a phone call), and numbers that point back to a patient
(accession, record and phone numbers). An adapter can learn and repeat any of them, so each is
replaced by ``XXXX``, the mark the public chest X-ray corpora (IU X-ray) use, so that public and
site text agree. What was removed is counted by kind, never kept: the counts go in the adapter
card and the training log.

Rules, not a model: they catch the forms reports use (titles and sign-off phrases before a name,
numeric and written dates, labelled and long numbers) and the names the study's own DICOM headers
give (patient, referring physician, operators). Measurements and anatomy ("3.2 x 2.1 cm", "T11",
"C5-6", "5/6") are kept: they are the report.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

MARK = "XXXX"
MIN_NAME_PART = 3
_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
          r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)")
_NAME_WORD = r"[A-Z][a-zA-Z'\-]+"
_NAME = rf"{_NAME_WORD}(?:\s+[A-Z]\.)?(?:\s+{_NAME_WORD})?"
_TITLE = r"(?i:dr|doctor|mr|mrs|ms|miss|prof|professor)\.?"

# (kind, pattern, group replaced): applied in order, each on the text the previous ones left.
_RULES: tuple[tuple[str, re.Pattern[str], int], ...] = (
    ("email", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), 0),
    ("url", re.compile(r"\bhttps?://\S+?(?=[.,;:)]?(?:\s|$))", re.IGNORECASE), 0),
    ("date", re.compile(r"\b\d{1,4}[/.\-]\d{1,2}[/.\-]\d{2,4}\b"), 0),
    ("date", re.compile(rf"\b{_MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b",
                        re.IGNORECASE), 0),
    ("date", re.compile(rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH}\.?,?\s+\d{{4}}\b",
                        re.IGNORECASE), 0),
    ("date", re.compile(rf"\b{_MONTH}\.?\s+\d{{4}}\b", re.IGNORECASE), 0),
    ("time", re.compile(r"\b\d{1,2}:\d{2}(?::\d{2})?(?:\s*(?:[ap]\.?m\.?|hrs?|h)\b)?",
                        re.IGNORECASE), 0),
    ("phone", re.compile(r"(?<![\w.])(?:\+?\d{1,3}[\s.\-])?\(?\d{3}\)?[\s.\-]\d{3}[\s.\-]\d{4}\b"),
     0),
    ("number", re.compile(r"\b(?:mrn|accession|acc|record|order|encounter|visit|pager|ext|"
                          r"extension|phone|tel|id)\.?\s*(?:#|no\.?|number|num)?\s*:?\s*"
                          r"([A-Za-z]*\d[A-Za-z0-9\-]{2,})\b", re.IGNORECASE), 1),
    ("number", re.compile(r"\b\d{5,}\b"), 0),
    ("number", re.compile(r"\b(?=[A-Za-z\-]*\d)(?=[0-9\-]*[A-Za-z])[A-Za-z0-9\-]*\d{4,}"
                          r"[A-Za-z0-9\-]*\b"), 0),
    ("name", re.compile(rf"\b{_TITLE}\s+({_NAME})"), 1),
    ("name", re.compile(
        r"\b(?i:signed|dictated|reported|read|reviewed|verified|approved|discussed|"
        r"communicated|transcribed|called|paged|notified|informed|attending|resident|"
        rf"radiologist)(?i:\s+electronically)?(?:\s+(?i:by|with|to)\s*:?|\s*:)\s*"
        rf"(?:{_TITLE}\s+)?({_NAME})"), 1),
)


@dataclass
class Scrubbed:
    text: str
    removed: Counter[str] = field(default_factory=Counter)


class Scrubber:
    """Replaces identifiers in text; `names` are the names the study's headers give."""

    def __init__(self, names: Iterable[str] = ()):
        parts = {part for name in names for part in re.split(r"[\s^,]+", name)
                 if len(part.strip(".")) >= MIN_NAME_PART}
        alternatives = sorted((re.escape(p.strip(".")) for p in parts), key=len, reverse=True)
        self._known = (re.compile(rf"\b(?:{'|'.join(alternatives)})\b", re.IGNORECASE)
                       if alternatives else None)

    def scrub(self, text: str) -> Scrubbed:
        removed: Counter[str] = Counter()
        if self._known is not None:
            text, count = self._known.subn(MARK, text)
            removed["name"] += count
        for kind, pattern, group in _RULES:
            text, count = _replace(pattern, group, text)
            removed[kind] += count
        return Scrubbed(_collapse(text), +removed)


def _replace(pattern: re.Pattern[str], group: int, text: str) -> tuple[str, int]:
    count = 0

    def mark(match: re.Match[str]) -> str:
        nonlocal count
        if match.group(group) in (MARK, None):
            return match.group(0)
        count += 1
        start, end = match.span(group)
        whole = match.group(0)
        return whole[: start - match.start()] + MARK + whole[end - match.start():]

    return pattern.sub(mark, text), count


def _collapse(text: str) -> str:
    """Neighbouring marks ("XXXX XXXX", a first and last name) as one."""
    return re.sub(rf"{MARK}(?:[\s,]+{MARK})+", MARK, text)
