"""Reading reports as JSON lines of `{"id": ..., "text": ...}`, as files from elsewhere: bounded.

A line longer than MAX_LINE_BYTES is skipped without being held in memory, at most MAX_RECORDS
reports are read, every line is checked (UTF-8, one JSON object, an "id" string or integer of
at most MAX_ID_CHARS printable characters, a "text" string), and each problem names the file and
the line. Ids are shown in messages with `ascii()`, so a hostile id cannot write to the terminal.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAX_LINE_BYTES = 65_536  # a long signed report with its id is a few kB; JSON escapes take 6x
MAX_RECORDS = 20_000  # public test sets have fewer (IU X-ray R2Gen 590, MIMIC-CXR 3,858)
MAX_ID_CHARS = 200


class InputError(ValueError):
    """A file of reports that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    line: int
    id: str
    text: str


def records(stream: BinaryIO, name: str) -> Iterator[Record | InputError]:
    """Each non-blank line as a Record, or the InputError that says what is wrong with it.
    More than MAX_RECORDS lines raise InputError: nothing after them is read."""
    count = 0
    for number, line in _lines(stream, name):
        if isinstance(line, InputError) or line.strip():
            count += 1
            if count > MAX_RECORDS:
                raise InputError(f"{name}:{number}: more than {MAX_RECORDS} reports; split the "
                                 "file")
            yield line if isinstance(line, InputError) else _parse(line, name, number)


@dataclass(frozen=True)
class Pairs:
    """References and drafts of the same ids, in the order of the references file."""

    ids: list[str]
    references: list[str]
    drafts: list[str]


def paired(references: Path, drafts: Path) -> Pairs:
    """The reports of two files paired by id. A bad line, an id twice in one file, or an id in
    one file only is an InputError naming the line."""
    ref_records, draft_records = _read_all(references), _read_all(drafts)
    for these, this, other, other_name in ((ref_records, references, draft_records, drafts),
                                           (draft_records, drafts, ref_records, references)):
        missing = [r for r in these.values() if r.id not in other]
        if missing:
            more = f" ({len(missing) - 1} more ids are missing too)" if len(missing) > 1 else ""
            raise InputError(f"{this}:{missing[0].line}: id {missing[0].id!a} is not in "
                             f"{other_name}{more}")
    ids = list(ref_records)
    return Pairs(ids, [ref_records[i].text for i in ids], [draft_records[i].text for i in ids])


def _read_all(path: Path) -> dict[str, Record]:
    found: dict[str, Record] = {}
    try:
        with path.open("rb") as stream:
            for record in records(stream, str(path)):
                if isinstance(record, InputError):
                    raise record
                if record.id in found:
                    raise InputError(f"{path}:{record.line}: id {record.id!a} again (first "
                                     f"on line {found[record.id].line})")
                found[record.id] = record
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return found


def _lines(stream: BinaryIO, name: str) -> Iterator[tuple[int, bytes | InputError]]:
    number = 0
    while line := stream.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(line) > MAX_LINE_BYTES:
            while line and not line.endswith(b"\n"):  # the rest of the line, a piece at a time
                line = stream.readline(MAX_LINE_BYTES)
            yield number, InputError(f"{name}:{number}: longer than {MAX_LINE_BYTES} bytes")
        else:
            yield number, line


def _parse(line: bytes, name: str, number: int) -> Record | InputError:
    where = f"{name}:{number}"
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return InputError(f"{where}: not UTF-8")
    except (ValueError, RecursionError) as exc:
        return InputError(f"{where}: not JSON ({str(exc)[:80]})")
    if not isinstance(value, dict):
        return InputError(f'{where}: expected an object {{"id": ..., "text": ...}}, got '
                          f"{type(value).__name__}")
    key, text = value.get("id"), value.get("text")
    if isinstance(key, bool) or not isinstance(key, str | int):
        return InputError(f'{where}: "id" must be a string or an integer')
    key = str(key)
    if not key or len(key) > MAX_ID_CHARS or not key.isprintable():
        return InputError(f'{where}: "id" must be 1 to {MAX_ID_CHARS} printable characters')
    if not isinstance(text, str):
        return InputError(f'{where}: "text" must be a string')
    return Record(number, key, text)
