"""What an evaluation run found, from its per-study results: scores, time, energy, and the files a
person or a program reads (summary.md, summary.json, studies.csv, label-f1.png).

Everything here is computed from the texts kept in the results, with the scorer and labeler of
this version, so that a summary is always consistent with the implementations it names. A study
whose draft failed (the model wrote nothing usable, or a draft the node would refuse) is scored as
an empty draft: it is what the radiologist would have received. A study none of whose images
could be read is not scored: that is the data's fault, not the model's; both are listed.

Texts from the model and the manifest reach a spreadsheet and a Markdown viewer: cells that a
spreadsheet would run as a formula are quoted, and Markdown is escaped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from cxr_node.durable import write_atomic
from cxr_node.evaluation.energy import co2_grams
from cxr_node.evaluation.labels import OBSERVATIONS, Labels, label
from cxr_node.evaluation.scores import Score, agreement, label_scores, text_scores

SUMMARY_JSON, SUMMARY_MD, STUDIES_CSV, PLOT = ("summary.json", "summary.md", "studies.csv",
                                               "label-f1.png")
DRAFTED, DRAFT_FAILED, IMAGE_FAILED = "drafted", "draft_failed", "image_failed"
SCORED = (DRAFTED, DRAFT_FAILED)
TEXT_SCORED = ("findings, then impression, joined by a space, of the reference and of the draft; "
               "a failed draft is scored as an empty text")
DEMO_BANNER = ("DEMO MODEL: random weights, not a clinical model. These numbers only show that "
               "the evaluation runs; they say nothing about any real model.")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


Result = Mapping[str, Any]


def draft_text(result: Result) -> str:
    """The draft as scored: findings then impression; empty for a failed draft."""
    draft = result.get("draft") or {}
    return " ".join(p for p in (draft.get("findings", ""), draft.get("impression", "")) if p)


def reference_text(result: Result) -> str:
    reference = result["reference"]
    return " ".join(p for p in (reference["findings"], reference["impression"]) if p)


def study_scores(references: Sequence[str], drafts: Sequence[str],
                 reference_labels: Sequence[Labels], draft_labels: Sequence[Labels],
                 with_meteor: bool = True) -> list[Score]:
    """Every score of an evaluation, each with its implementation."""
    return (text_scores(references, drafts, with_meteor=with_meteor)
            + label_scores(reference_labels, draft_labels))


def summarize(results: Sequence[Result], run: Mapping[str, Any], planned: int) -> dict[str, Any]:
    """The summary of `results` (one per study done) of the run described by `run` (run.json)."""
    scored = [r for r in results if r["status"] in SCORED]
    references, drafts = [reference_text(r) for r in scored], [draft_text(r) for r in scored]
    ref_labels, draft_labels = [label(t) for t in references], [label(t) for t in drafts]
    scores = study_scores(references, drafts, ref_labels, draft_labels)
    counts = {status: sum(r["status"] == status for r in results)
              for status in (DRAFTED, DRAFT_FAILED, IMAGE_FAILED)}
    identity = run["model"]
    return {
        "format": 1,
        "demo": bool(identity["demo"]),
        "model": identity,
        "settings": run["settings"],
        "data": {**run["data"], "planned": planned},
        "studies": {**counts, "scored": len(scored), "not_done": planned - len(results)},
        "text_scored": TEXT_SCORED,
        "scores": [s.as_dict() for s in scores],
        "per_observation": [
            {"observation": a.observation, "f1": a.f1, "precision": a.precision,
             "recall": a.recall, "support": a.support, "tp": a.tp, "fp": a.fp, "fn": a.fn}
            for a in agreement(ref_labels, draft_labels)],
        "time": _time(results),
        "energy": _energy(results, run["grid_intensity_g_per_kwh"]),
        "not_drafted": [{"id": r["id"], "status": r["status"], "reason": r["reason"]}
                        for r in results if r["status"] != DRAFTED],
    }


def _time(results: Sequence[Result]) -> dict[str, Any]:
    timed = [r["timing"] for r in results if r["status"] in SCORED]
    seconds = math.fsum(t["seconds"] for t in timed)
    tokens = sum(t["new_tokens"] for t in timed)
    # each batch's generate time once: a batch's studies share it
    generate = math.fsum(t["generate_seconds"] / t["batch_size"] for t in timed)
    return {
        "reports": len(timed),
        "devices": sorted({t["device"] for t in timed}),
        "seconds": seconds,
        "seconds_per_report": seconds / len(timed) if timed else None,
        "new_tokens": tokens,
        "tokens_per_report": tokens / len(timed) if timed else None,
        "generate_seconds": generate,
        "tokens_per_second": tokens / generate if generate > 0 else None,
        "definition": "seconds: preparing the study's images, plus its share of the batched "
                      "draft call (the batch's time divided by its studies); tokens per second: "
                      "generated tokens over generate time, batches counted once",
    }


def _energy(results: Sequence[Result], grid: float | None) -> dict[str, Any]:
    timed = [r["timing"] for r in results if r["status"] in SCORED]
    measured = [t["energy_joules"] for t in timed if t["energy_joules"] is not None]
    methods = sorted({t["energy_method"] for t in timed})
    complete = bool(timed) and len(measured) == len(timed)
    joules = math.fsum(measured) if complete else None
    per_report = joules / len(timed) if joules is not None else None
    note = "" if complete else (f"measured for {len(measured)} of {len(timed)} reports"
                                if measured else "not measured")
    co2 = co2_grams(joules, grid)
    return {
        "method": "; ".join(methods) if methods else "not measured: no reports",
        "joules": joules,
        "joules_per_report": per_report,
        "note": note,
        "grid_intensity_g_per_kwh": grid,
        "co2_grams": co2,
        "co2_grams_per_report": co2 / len(timed) if co2 is not None else None,
        "co2_note": "" if co2 is not None else (
            "not computed: no grid intensity given (--grid-intensity G_PER_KWH)"
            if grid is None else "not computed: energy not measured"),
    }


# -- files --------------------------------------------------------------------------------------


def write_outputs(out: Path, summary: Mapping[str, Any], results: Sequence[Result]) -> None:
    write_atomic(out / SUMMARY_JSON, (json.dumps(summary, indent=2) + "\n").encode())
    write_atomic(out / SUMMARY_MD, markdown(summary).encode())
    write_atomic(out / STUDIES_CSV, studies_csv(results).encode())
    write_atomic(out / PLOT, f1_plot(summary))


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def md(text: object) -> str:
    """`text` as one line of Markdown that shows as itself (no markup, no HTML, no table break)."""
    line = re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", str(text))
    return re.sub(r"([\\`*_\[\]<>|~])", r"\\\1", " ".join(line.split()))


def markdown(summary: Mapping[str, Any]) -> str:
    model, studies, time, energy = (summary[k] for k in ("model", "studies", "time", "energy"))
    lines = []
    if summary["demo"]:
        lines += [f"# DEMO — {DEMO_BANNER}", ""]
    adapter = f", adapter {model['adapter']}" if model.get("adapter") else ""
    lines += [
        "# Evaluation summary", "",
        f"- model: {md(model['name'])} {md(model['version'])} ({md(model['architecture'])}, "
        f"{md(model['quantization'])}{md(adapter)}), fingerprint `{model['fingerprint']}`",
        f"- device: {md(', '.join(time['devices']) or '-')} (asked: "
        f"{md(summary['settings']['device'])}, dtype {md(summary['settings']['dtype'])})",
        f"- data: {md(summary['data']['source'])} ({summary['data']['layout']}), "
        f"{summary['data']['planned']} studies planned"
        + (f", {len(summary['data']['skipped'])} of the source skipped (summary.json says why)"
           if summary["data"].get("skipped") else ""),
        f"- studies: {studies['scored']} scored ({studies[DRAFT_FAILED]} of them failed drafts, "
        f"scored as empty), {studies[IMAGE_FAILED]} without a usable image (not scored), "
        f"{studies['not_done']} not done",
        f"- text scored: {TEXT_SCORED}", "",
        "## Scores", "", "| score | value | note |", "| --- | --- | --- |",
    ]
    scores = summary["scores"]
    lines += [f"| {md(s['name'])} | {_number(s['value'])} | {md(s['note'])} |" for s in scores]
    lines += ["", "Definitions:", ""]
    for definition in dict.fromkeys(s["implementation"] for s in scores):
        names = ", ".join(s["name"] for s in scores if s["implementation"] == definition)
        lines.append(f"- {md(names)}: {md(definition)}")
    lines += ["", "## Label F1 per observation", "",
              "| observation | F1 | precision | recall | positive references |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {o['observation']} | {_number(o['f1'], 3)} | {_number(o['precision'], 3)} | "
              f"{_number(o['recall'], 3)} | {o['support']} |" for o in summary["per_observation"]]
    per_second = time["tokens_per_second"]
    lines += [
        "", "## Time and energy", "",
        f"- {time['reports']} reports in {time['seconds']:.1f} s: "
        f"{_number(time['seconds_per_report'], 3)} s per report, "
        f"{_number(time['tokens_per_report'], 1)} generated tokens per report, "
        f"{_number(per_second, 1)} tokens/s",
        f"- energy: {_number(energy['joules'], 1)} J in all, "
        f"{_number(energy['joules_per_report'], 2)} J per report"
        + (f" ({md(energy['note'])})" if energy["note"] else "") + f"; {md(energy['method'])}",
        "- CO2: " + (f"{energy['co2_grams']:.3f} g in all, {energy['co2_grams_per_report']:.4f} "
                      f"g per report at {energy['grid_intensity_g_per_kwh']:g} g/kWh"
                      if energy["co2_grams"] is not None else md(energy["co2_note"])),
        f"- {md(time['definition'])}",
    ]
    if summary["not_drafted"]:
        lines += ["", "## Studies without a draft", "", "| study | status | reason |",
                  "| --- | --- | --- |"]
        lines += [f"| {md(r['id'])} | {r['status']} | {md(r['reason'])} |"
                  for r in summary["not_drafted"]]
    return "\n".join(lines) + "\n"


def _cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: one that starts like a formula gets a quote."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


CSV_COLUMNS = ("id", "patient_id", "status", "reason", "draft_findings", "draft_impression",
               "BLEU-2", "ROUGE-L", "significant_misses", "seconds", "new_tokens",
               "tokens_per_second", "energy_joules")


def studies_csv(results: Sequence[Result]) -> str:
    """One row per study: the draft, its per-report scores, the labels of both texts, timings."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *(f"reference: {o}" for o in OBSERVATIONS),
                     *(f"draft: {o}" for o in OBSERVATIONS)])
    for r in results:
        draft, scores = r.get("draft") or {}, r.get("scores") or {}
        labels, timing = r.get("labels") or {}, r.get("timing") or {}
        row = [r["id"], r.get("patient_id") or "", r["status"], r["reason"] or "",
               draft.get("findings", ""), draft.get("impression", ""),
               scores.get("BLEU-2", ""), scores.get("ROUGE-L", ""),
               "; ".join(r.get("significant_misses") or []), timing.get("seconds", ""),
               timing.get("new_tokens", ""), timing.get("tokens_per_second", ""),
               timing.get("energy_joules", "")]
        for side in ("reference", "draft"):
            values = labels.get(side) or {}
            row += ["" if values.get(o) is None else values[o] for o in OBSERVATIONS]
        writer.writerow([_cell("" if v is None else v) for v in row])
    return buffer.getvalue()


# -- the plot -----------------------------------------------------------------------------------

_LABEL_WIDTH, _BAR_WIDTH, _VALUE_WIDTH, _ROW, _TOP, _MARGIN = 250, 480, 150, 30, 90, 20
_BAR, _GRID, _TEXT, _ALERT = (44, 110, 180), (215, 215, 215), (20, 20, 20), (190, 20, 20)


def f1_plot(summary: Mapping[str, Any]) -> bytes:
    """A PNG bar chart of the label F1 of each observation, with its positive references."""
    rows = summary["per_observation"]
    width = _MARGIN * 2 + _LABEL_WIDTH + _BAR_WIDTH + _VALUE_WIDTH
    height = _TOP + _ROW * len(rows) + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, title = ImageFont.load_default(size=15), ImageFont.load_default(size=18)
    model = summary["model"]
    draw.text((_MARGIN, 12), f"Label F1 per observation: {model['name']} {model['version']}"[:90],
              fill=_TEXT, font=title)
    caption = (f"{summary['studies']['scored']} studies; CheXpert-style labeler on reference "
               "and draft; n = positive references")
    draw.text((_MARGIN, 38), caption, fill=_TEXT, font=font)
    if summary["demo"]:
        draw.text((_MARGIN, 58), "DEMO MODEL: random weights, not a clinical model",
                  fill=_ALERT, font=font)
    left = _MARGIN + _LABEL_WIDTH
    for tick in range(5):
        x = left + _BAR_WIDTH * tick // 4
        draw.line([(x, _TOP - 4), (x, _TOP + _ROW * len(rows))], fill=_GRID)
        draw.text((x - 10, _TOP + _ROW * len(rows) + 6), f"{tick / 4:.2f}", fill=_TEXT,
                  font=font)
    for i, row in enumerate(rows):
        y = _TOP + _ROW * i
        draw.text((_MARGIN, y + 6), row["observation"], fill=_TEXT, font=font)
        f1 = row["f1"]
        if f1 is not None:
            draw.rectangle([(left, y + 5), (left + round(_BAR_WIDTH * f1), y + _ROW - 5)],
                           fill=_BAR)
        value = "n/a" if f1 is None else f"{f1:.2f}"
        draw.text((left + _BAR_WIDTH + 10, y + 6), f"{value}  (n={row['support']})", fill=_TEXT,
                  font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
