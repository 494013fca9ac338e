"""`cxr-node eval run`: draft every study of a dataset as the node would, and measure the drafts.

The images go through the node's imaging code (`datasets.StudyImages`), the text through the
worker's (`workers.model.load_model`, `ReportModel.draft` in batches of `queue.batch_size`, the
prompt and generation settings of the configuration), and each draft through the node's own
check (`report.DraftReport`: a draft the node would refuse is a failed draft here too).

Each study's result is appended to results.jsonl as soon as its batch is drafted (one line,
flushed and fsynced), so a run stopped at any point resumes with the first study that has no
complete line: a torn last line is cut off, and nothing is drafted twice. run.json records what the
run is (the data's fingerprint, the model's identity, the settings that change a draft); resuming
with other data, another model or other settings is refused, since the results would not be one
run's. The summary files are written at the end, from all the results.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cxr_node.config import Config
from cxr_node.durable import private_dir, private_opener, write_atomic
from cxr_node.evaluation.datasets import Dataset, Study, StudyImages, load_dataset
from cxr_node.evaluation.energy import Meter, co2_grams, meter_for
from cxr_node.evaluation.labels import label, significant_misses
from cxr_node.evaluation.progress import Progress
from cxr_node.evaluation.scores import report_scores
from cxr_node.evaluation.summary import (
    DRAFT_FAILED,
    DRAFTED,
    IMAGE_FAILED,
    summarize,
    write_outputs,
)
from cxr_node.identity import IdentityError, ModelIdentity, model_identity
from cxr_node.imaging import ImagingError, Selection
from workers.payload import DraftRequest, encode_image, parse_result

RESULTS, RUN = "results.jsonl", "run.json"
FORMAT = 1
MAX_RESULT_LINE_BYTES = 4 * 2**20
"""A result line holds the reference and the draft (each bounded) and labels: far less."""
STATUSES = (DRAFTED, DRAFT_FAILED, IMAGE_FAILED)
# run.json keys whose change makes other drafts: a resume must keep them
_SAME_RUN = ("data.fingerprint", "model", "settings.device", "settings.dtype",
             "settings.image_size", "settings.max_images", "settings.max_draft_characters")


class RunError(Exception):
    """The run cannot start or go on; the message says why and what to do."""


@dataclass(frozen=True)
class RunRequest:
    """What to evaluate: `config` is the node's configuration with the model settings of the
    command line applied (model.path is the model folder)."""

    config: Config
    data: Path
    out: Path
    limit: int | None = None
    grid_intensity: float | None = None
    allow_outside: bool = False

    @property
    def model_dir(self) -> Path:
        return self.config.model_path


def evaluate(request: RunRequest, progress: IO[str] | None = None) -> dict[str, Any]:
    """Draft what the run in `request.out` has not drafted yet, then write its summary files."""
    dataset = load_dataset(request.data, request.allow_outside)
    studies = dataset.studies[: request.limit]
    if not request.model_dir.is_dir():
        raise RunError(f"model folder {request.model_dir} does not exist or is not a folder")
    try:
        identity = model_identity(request.config.model, request.model_dir)
    except (IdentityError, OSError) as exc:
        raise RunError(f"{request.model_dir}: cannot identify the model ({exc})") from None
    run = _run_record(request, dataset, identity)
    out = private_dir(Path(request.out))
    _keep_same_run(out / RUN, run)
    write_atomic(out / RUN, (json.dumps(run, indent=2) + "\n").encode())
    done = {r["id"] for r in read_results(out / RESULTS, repair=True)}
    todo = [(n, s) for n, s in enumerate(studies) if s.id not in done]
    if todo:
        bar = Progress(len(studies), "studies", done=len(studies) - len(todo), stream=progress)
        try:
            _draft(request, todo, out / RESULTS, bar)
        finally:
            bar.close()
    by_id = {r["id"]: r for r in read_results(out / RESULTS, repair=False)}
    results = [by_id[s.id] for s in studies if s.id in by_id]
    summary = summarize(results, run, planned=len(studies))
    write_outputs(out, summary, results)
    return summary


def _run_record(request: RunRequest, dataset: Dataset, identity: ModelIdentity) -> dict[str, Any]:
    model = request.config.model
    return {
        "format": FORMAT,
        "data": {"source": str(dataset.source), "layout": dataset.layout,
                 "fingerprint": dataset.fingerprint, "studies": len(dataset.studies),
                 "skipped": [{"id": i, "reason": why} for i, why in dataset.skipped]},
        "model": identity.model_dump(mode="json"),
        "settings": {
            "model_path": str(request.model_dir.resolve()), "device": model.device,
            "dtype": model.dtype, "quantization": model.quantization,
            "adapter": str(model.adapter) if model.adapter else None,
            "image_size": model.image_size, "max_images": model.max_images,
            "prompt": model.prompt, "generation": model.generation.model_dump(mode="json"),
            "batch_size": request.config.queue.batch_size,
            "max_draft_characters": request.config.limits.max_draft_characters,
            "config": str(request.config.source) if request.config.source else None,
        },
        "grid_intensity_g_per_kwh": request.grid_intensity,
    }


def _keep_same_run(path: Path, run: Mapping[str, Any]) -> None:
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: not readable ({exc}); give a new --out") from None
    changed = [key for key in _SAME_RUN if _at(before, key) != _at(run, key)]
    if changed:
        raise RunError(
            f"{path.parent} holds a run with other {', '.join(changed)}: resume it with the data, "
            "model and settings it was started with, or give a new --out")


def _at(record: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        record = record.get(key) if isinstance(record, dict) else None
    return record


# -- drafting -----------------------------------------------------------------------------------


def _draft(request: RunRequest, todo: Sequence[tuple[int, Study]], path: Path,
           bar: Progress) -> None:
    from workers.model import ModelLoadError, load_model
    from workers.payload import TransientDraftError

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # ours is on the same stream
    config = request.config
    try:
        model = load_model(config.model, request.model_dir)
    except ModelLoadError as exc:
        raise RunError(str(exc)) from None
    meter = meter_for(model.device)
    images = StudyImages(config.limits)
    size = config.queue.batch_size
    try:
        with open(path, "ab", opener=private_opener) as results:
            for start in range(0, len(todo), size):
                batch = todo[start:start + size]
                try:
                    lines = _draft_batch(request, batch, images, model, meter)
                except TransientDraftError as exc:
                    raise RunError(f"{exc}: lower queue.batch_size ({size}) in --config, then "
                                   "run the same command again to resume") from None
                for line in lines:
                    results.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
                results.flush()
                os.fsync(results.fileno())
                bar.advance(len(batch))
    finally:
        images.close()


@dataclass
class _Prepared:
    study: Study
    selection: Selection
    request: dict[str, Any]
    seconds: float


def _draft_batch(request: RunRequest, batch: Sequence[tuple[int, Study]], images: StudyImages,
                 model: Any, meter: Meter) -> list[dict[str, Any]]:
    """One line per study of the batch, in order: its images prepared, then one draft call."""
    settings = request.config.model
    lines: dict[str, dict[str, Any]] = {}
    prepared = []
    for number, study in batch:
        started = time.perf_counter()
        try:
            selection = images.select(study, settings.image_size, settings.max_images)
        except ImagingError as exc:
            seconds = time.perf_counter() - started
            lines[study.id] = _line(study, IMAGE_FAILED, f"no usable image: {exc}", None, None,
                                    {"prepare_seconds": seconds, "seconds": seconds})
            continue
        draft_images = tuple(encode_image(i.pixels, i.view.value, settings.image_size)
                             for i in selection.images)
        prepared.append(_Prepared(study, selection, DraftRequest(
            f"study-{number}", draft_images).to_dict(), time.perf_counter() - started))
    if prepared:
        mark, started = meter.mark(), time.perf_counter()
        answers = model.draft([p.request for p in prepared])
        seconds, joules = time.perf_counter() - started, meter.joules_since(mark)
        for item, answer in zip(prepared, answers, strict=True):
            lines[item.study.id] = _drafted(request, item, answer, seconds / len(prepared),
                                            None if joules is None else joules / len(prepared),
                                            meter.method)
    return [lines[study.id] for _, study in batch]


def _drafted(request: RunRequest, item: _Prepared, answer: dict[str, Any], share: float,
             joules: float | None, method: str) -> dict[str, Any]:
    """A study's line from the worker's answer, checked as the node checks it before filing."""
    from cxr_node.report import DraftReport, ReportError

    result = parse_result(answer)
    report, reason = None, result.reason
    if result.ok:
        try:
            report = DraftReport.from_result(result,
                                             request.config.limits.max_draft_characters)
        except ReportError as exc:
            reason = f"draft refused: {exc}"
    timings = result.timings
    timing = {
        "prepare_seconds": item.seconds, "draft_seconds": share, "seconds": item.seconds + share,
        "batch_size": timings.batch_size, "generate_seconds": timings.generate_seconds,
        "new_tokens": timings.new_tokens,
        "tokens_per_second": (timings.new_tokens / timings.generate_seconds
                              if timings.generate_seconds > 0 else None),
        "device": timings.device, "energy_joules": joules, "energy_method": method,
        "co2_grams": co2_grams(joules, request.grid_intensity),
    }
    draft = {"findings": report.findings if report else "",
             "impression": report.impression if report else "",
             "text": result.text, "notes": result.notes}
    return _line(item.study, DRAFTED if report else DRAFT_FAILED, None if report else reason,
                 item.selection, draft, timing)


def _line(study: Study, status: str, reason: str | None, selection: Selection | None,
          draft: dict[str, Any] | None, timing: dict[str, Any]) -> dict[str, Any]:
    line: dict[str, Any] = {
        "id": study.id, "patient_id": study.patient_id, "status": status, "reason": reason,
        "images": None if selection is None else {
            "used": [{"image": i.sop_instance_uid, "view": i.view.value}
                     for i in selection.images],
            "dropped": [{"image": image, "reason": why} for image, why in selection.dropped]},
        "reference": {"findings": study.findings, "impression": study.impression},
        "draft": draft, "timing": timing,
    }
    if draft is not None:
        text = " ".join(p for p in (draft["findings"], draft["impression"]) if p)
        labels = {"reference": label(study.reference), "draft": label(text)}
        line.update(labels=labels, scores=report_scores(study.reference, text),
                    significant_misses=significant_misses(labels["reference"], labels["draft"]))
    return line


# -- reading results ----------------------------------------------------------------------------


def read_results(path: Path, repair: bool) -> list[dict[str, Any]]:
    """The complete result lines of a run. A last line without its newline was torn by a kill:
    with `repair` it is cut off the file (the study is drafted again), else it is left out. Any
    other unreadable line, or an id twice, is a RunError naming the line."""
    try:
        file = path.open("r+b" if repair else "rb")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RunError(f"{path}: cannot read ({exc.strerror})") from None
    results: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    with file:
        for number, offset, line in _lines(file):
            if not line.endswith(b"\n"):
                if repair:
                    file.truncate(offset)
                break
            result = _result(line, f"{path}:{number}")
            if result["id"] in seen:
                raise RunError(f"{path}:{number}: study {result['id']!a} again (first on line "
                               f"{seen[result['id']]})")
            seen[result["id"]] = number
            results.append(result)
    return results


def _lines(file: IO[bytes]) -> Iterator[tuple[int, int, bytes]]:
    number = 0
    while True:
        offset = file.tell()
        line = file.readline(MAX_RESULT_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_RESULT_LINE_BYTES:
            raise RunError(f"{getattr(file, 'name', 'results')}:{number}: longer than "
                           f"{MAX_RESULT_LINE_BYTES} bytes: not a result line")
        yield number, offset, line


def _result(line: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        value = None
    problem = _problem(value)
    if problem:
        raise RunError(f"{where}: not a result line of this version ({problem}); remove the "
                       "line to draft that study again, or give a new --out")
    return value  # type: ignore[return-value]  # checked by _problem


def _problem(value: Any) -> str | None:
    """What makes `value` not a result line, or None. Checked so that a results file from
    elsewhere (eval compare reads two) cannot make the summary fail half-way."""
    if not isinstance(value, dict):
        return "not a JSON object"
    if not isinstance(value.get("id"), str) or value.get("status") not in STATUSES:
        return "no id or status"
    reference = value.get("reference")
    if not (isinstance(reference, dict) and all(isinstance(reference.get(k), str)
                                                for k in ("findings", "impression"))):
        return "no reference findings and impression"
    if value["status"] == IMAGE_FAILED:
        return None
    draft, timing = value.get("draft"), value.get("timing")
    if not (isinstance(draft, dict) and all(isinstance(draft.get(k), str)
                                            for k in ("findings", "impression"))):
        return "no draft findings and impression"
    if not isinstance(timing, dict) or not all(
            isinstance(timing.get(k), int | float) and not isinstance(timing.get(k), bool)
            and timing[k] >= 0 for k in ("seconds", "generate_seconds", "new_tokens")) \
            or not isinstance(timing.get("batch_size"), int) or timing["batch_size"] < 1:
        return "no timing"
    energy = timing.get("energy_joules")
    if energy is not None and not isinstance(energy, int | float) \
            or not isinstance(timing.get("energy_method"), str):
        return "no energy"
    return None
