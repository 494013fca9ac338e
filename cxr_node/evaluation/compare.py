"""`cxr-node eval compare RUN_A RUN_B`: two runs on the studies both have, with the difference of
each score and a paired bootstrap interval of it.

Paired: each resample draws studies (with replacement) and scores both runs' drafts of the same
studies, so what the studies have in common cancels out. Corpus scores (BLEU, CIDEr-D, label F1)
are computed again from each resample's texts, not averaged from per-study values; the interval is
the 2.5th to 97.5th percentile of B - A over the resamples (seeded: the same runs give the same
interval). METEOR is one corpus score from a Java program per call: its difference is shown, not
resampled.

Two runs are compared only if their summaries name the same implementation for every score (and
this version computes them the same way), and if each common study has the same reference in both:
otherwise the difference would be the scorer's or the data's, not the models'.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from cxr_node.evaluation.labels import Labels, label
from cxr_node.evaluation.progress import Progress
from cxr_node.evaluation.run import RESULTS, RunError, read_results
from cxr_node.evaluation.scores import Score
from cxr_node.evaluation.summary import (
    SCORED,
    SUMMARY_JSON,
    draft_text,
    md,
    reference_text,
    study_scores,
)

CONFIDENCE = 0.95
CHUNK = 20
"""Resamples scored per task of a bootstrap process."""
PARALLEL_FROM = 20_000
"""Resamples x studies from which the bootstrap is shared out between processes."""
NOT_RESAMPLED = {"METEOR": "no interval: one corpus score from the METEOR jar per call, not "
                           "resampled"}


class CompareError(Exception):
    """The runs cannot be compared; the message says why."""


@dataclass(frozen=True)
class Run:
    path: Path
    summary: dict[str, Any]
    results: dict[str, dict[str, Any]]

    @property
    def model(self) -> str:
        m = self.summary["model"]
        adapter = f", adapter {m['adapter']}" if m.get("adapter") else ""
        return f"{m['name']} {m['version']} ({m['quantization']}{adapter})"


def load_run(path: Path) -> Run:
    try:
        summary = json.loads((path / SUMMARY_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompareError(f"{path}: no {SUMMARY_JSON}; finish the run first (run the same "
                           "`cxr-node eval run` command again)") from None
    except (OSError, ValueError) as exc:
        raise CompareError(f"{path / SUMMARY_JSON}: not readable ({exc})") from None
    if not _is_summary(summary):
        raise CompareError(f"{path / SUMMARY_JSON}: not a summary of `cxr-node eval run`")
    try:
        results = read_results(path / RESULTS, repair=False)
    except RunError as exc:
        raise CompareError(str(exc)) from None
    return Run(path, summary, {r["id"]: r for r in results if r["status"] in SCORED})


def _is_summary(value: Any) -> bool:
    """The parts of summary.json a comparison reads, with their types."""
    if not isinstance(value, dict) or not isinstance(value.get("demo"), bool):
        return False
    model, scores = value.get("model"), value.get("scores")
    return (isinstance(model, dict)
            and all(isinstance(model.get(k), str)
                    for k in ("name", "version", "quantization", "fingerprint"))
            and isinstance(scores, list)
            and all(isinstance(s, dict) and isinstance(s.get("name"), str)
                    and isinstance(s.get("implementation"), str) for s in scores))


def compare(path_a: Path, path_b: Path, resamples: int = 1000, seed: int = 0,
            progress: IO[str] | None = None, jobs: int | None = None) -> dict[str, Any]:
    """The comparison of two finished runs, as `eval compare --json` prints it. The resamples
    are scored in `jobs` processes (default: one per CPU when the work is large)."""
    if resamples < 1:
        raise CompareError(f"--resamples must be at least 1, got {resamples}")
    a, b = load_run(path_a), load_run(path_b)
    _same_implementations(a, b)
    ids = [i for i in a.results if i in b.results]
    if not ids:
        raise CompareError(f"{a.path} and {b.path} have no scored study in common")
    different = [i for i in ids if reference_text(a.results[i]) != reference_text(b.results[i])]
    if different:
        raise CompareError(f"study {different[0]!a} has another reference in {b.path} than in "
                           f"{a.path} ({len(different)} studies differ): the runs are not of "
                           "the same data")
    references = [reference_text(a.results[i]) for i in ids]
    texts = Texts.labelled(references, {side: [draft_text(run.results[i]) for i in ids]
                               for side, run in (("a", a), ("b", b))})
    point = {side: texts.scores(side, meteor=True) for side in ("a", "b")}
    _current_implementations(a, point["a"])
    differences = _bootstrap(texts, resamples, seed, progress, jobs)
    return {
        "format": 1,
        "a": _side(a), "b": _side(b),
        "studies": len(ids),
        "only_in_a": len(a.results.keys() - b.results.keys()),
        "only_in_b": len(b.results.keys() - a.results.keys()),
        "resamples": resamples, "seed": seed, "confidence": CONFIDENCE,
        "scores": [_row(sa, sb, differences.get(sa.name, []), resamples)
                   for sa, sb in zip(point["a"], point["b"], strict=True)],
    }


def _side(run: Run) -> dict[str, Any]:
    return {"run": str(run.path), "model": run.model, "demo": bool(run.summary["demo"]),
            "fingerprint": run.summary["model"]["fingerprint"]}


def _same_implementations(a: Run, b: Run) -> None:
    of_a, of_b = ({s["name"]: s["implementation"] for s in r.summary["scores"]} for r in (a, b))
    differ = sorted(name for name in of_a.keys() | of_b.keys() if of_a.get(name) != of_b.get(name))
    if differ:
        raise CompareError(f"{a.path} and {b.path} were scored with other implementations of "
                           f"{', '.join(differ)}: their numbers are not comparable")


def _current_implementations(run: Run, current: Sequence[Score]) -> None:
    recorded = {s["name"]: s["implementation"] for s in run.summary["scores"]}
    differ = [s.name for s in current if recorded.get(s.name) != s.implementation]
    if differ:
        raise CompareError(f"the runs were scored with other implementations of "
                           f"{', '.join(differ)} than this version's: run `cxr-node eval run` "
                           "with the same arguments again on each, to score them anew")


@dataclass(frozen=True)
class Texts:
    """The common studies' reference and drafts (A and B), labelled once."""

    references: list[str]
    drafts: dict[str, list[str]]
    labels: dict[str, list[Labels]]

    @classmethod
    def labelled(cls, references: list[str], drafts: dict[str, list[str]]) -> Texts:
        return cls(references, drafts, {
            "ref": [label(t) for t in references],
            **{side: [label(t) for t in texts] for side, texts in drafts.items()}})

    def scores(self, side: str, rows: Sequence[int] | None = None,
               meteor: bool = False) -> list[Score]:
        """Every score of one side's drafts of the studies at `rows` (all by default)."""
        pick = range(len(self.references)) if rows is None else rows
        return study_scores([self.references[i] for i in pick],
                            [self.drafts[side][i] for i in pick],
                            [self.labels["ref"][i] for i in pick],
                            [self.labels[side][i] for i in pick], with_meteor=meteor)

    def differences(self, rows: Sequence[int]) -> dict[str, float]:
        """B - A of each score that both sides have on the studies at `rows`."""
        return {sa.name: sb.value - sa.value
                for sa, sb in zip(self.scores("a", rows), self.scores("b", rows), strict=True)
                if sa.value is not None and sb.value is not None}


def _bootstrap(texts: Texts, resamples: int, seed: int, progress: IO[str] | None,
               jobs: int | None) -> dict[str, list[float]]:
    """B - A of each score over `resamples` paired resamples of the studies. The draws come from
    the seed before any work is shared out, and results are taken in order: the same with any
    number of processes."""
    n = len(texts.references)
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n)).tolist()
    if jobs is None:
        jobs = (os.cpu_count() or 1) if resamples * n >= PARALLEL_FROM else 1
    chunks = [draws[i:i + CHUNK] for i in range(0, resamples, CHUNK)]
    differences: dict[str, list[float]] = {}
    bar = Progress(resamples, "resamples", stream=progress)
    try:
        if jobs > 1:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(jobs, mp_context=context, initializer=_adopt,
                                     initargs=(texts,)) as pool:
                done = pool.map(_chunk_differences, chunks)
                for chunk, found in zip(chunks, done, strict=True):
                    _collect(differences, found)
                    bar.advance(len(chunk))
        else:
            for chunk in chunks:
                _collect(differences, [texts.differences(rows) for rows in chunk])
                bar.advance(len(chunk))
    finally:
        bar.close()
    return differences


def _collect(differences: dict[str, list[float]], found: Sequence[dict[str, float]]) -> None:
    for resample in found:
        for name, value in resample.items():
            differences.setdefault(name, []).append(value)


_adopted: list[Texts] = []


def _adopt(texts: Texts) -> None:
    """A bootstrap process's texts, given once when it starts."""
    _adopted.append(texts)


def _chunk_differences(chunk: Sequence[Sequence[int]]) -> list[dict[str, float]]:
    return [_adopted[0].differences(rows) for rows in chunk]


def _row(a: Score, b: Score, differences: Sequence[float], resamples: int) -> dict[str, Any]:
    difference = None if a.value is None or b.value is None else b.value - a.value
    interval, note = None, NOT_RESAMPLED.get(a.name, "")
    if a.name not in NOT_RESAMPLED:
        if differences:
            tail = (1 - CONFIDENCE) / 2 * 100
            low, high = np.percentile(differences, [tail, 100 - tail])
            interval = [float(low), float(high)]
            if len(differences) < resamples:
                note = f"{len(differences)} of {resamples} resamples had a value"
        else:
            note = "no interval: no resample had a value"
    return {"name": a.name, "a": a.value, "b": b.value, "difference": difference,
            "interval": interval, "note": "; ".join(n for n in (*_notes(a, b), note) if n),
            "implementation": a.implementation}


def _notes(a: Score, b: Score) -> list[str]:
    if a.note == b.note:
        return [a.note]
    return [f"{side}: {score.note}" for side, score in (("A", a), ("B", b)) if score.note]


def markdown(comparison: Mapping[str, Any]) -> str:
    a, b = comparison["a"], comparison["b"]
    lines = []
    if a["demo"] or b["demo"]:
        which = " and ".join(k.upper() for k in ("a", "b") if comparison[k]["demo"])
        lines += [f"# DEMO — run {which} used a DEMO MODEL (random weights): these numbers say "
                  "nothing about any real model", ""]
    percent = f"{comparison['confidence']:.0%}"
    lines += [
        "# Comparison", "",
        f"- A: {md(a['run'])}: {md(a['model'])}",
        f"- B: {md(b['run'])}: {md(b['model'])}",
        f"- {comparison['studies']} studies in both (only in A: {comparison['only_in_a']}, only "
        f"in B: {comparison['only_in_b']}); paired bootstrap, {comparison['resamples']} "
        f"resamples of the studies, seed {comparison['seed']}", "",
        f"| score | A | B | B - A | {percent} interval of B - A | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in comparison["scores"]:
        interval = row["interval"]
        shown = "-" if interval is None else (f"[{_number(interval[0], signed=True)}, "
                                              f"{_number(interval[1], signed=True)}]")
        lines.append(f"| {md(row['name'])} | {_number(row['a'])} | {_number(row['b'])} | "
                     f"{_number(row['difference'], signed=True)} | {shown} | {md(row['note'])} |")
    lines += ["", "Definitions:", ""]
    rows = comparison["scores"]
    for definition in dict.fromkeys(r["implementation"] for r in rows):
        names = ", ".join(r["name"] for r in rows if r["implementation"] == definition)
        lines.append(f"- {md(names)}: {md(definition)}")
    return "\n".join(lines) + "\n"


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    value += 0.0  # no "-0.0000"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
