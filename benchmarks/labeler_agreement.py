"""Agreement of the labeler (cxr_node.evaluation.labels) with the manual MeSH indexing of the
Indiana University chest X-ray reports, per observation.

Each indexed report with a Findings or Impression section is labeled (Findings and Impression
together), and each observation's positive label (1) is compared with the observation its MeSH
major terms map to (cxr_node.evaluation.mesh.MAPPING): precision, recall, F1 and support (reports
MeSH says are positive). A second F1 counts the labeler's uncertain (-1) as positive too. The
last line is the macro F1 over the observations MeSH covers (mesh.COVERED), which the tests hold
at 0.8 or more.

    .venv/bin/python benchmarks/labeler_agreement.py
    .venv/bin/python benchmarks/labeler_agreement.py --reports NLMCXR_reports.tgz --errors Edema

The reports (CC BY-NC-ND 4.0) are not kept in this repository: by default they are read from the
torchxrayvision wheel that scripts/setup.sh downloads, which carries the archive unchanged.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from statistics import fmean

from cxr_node.evaluation.labels import OBSERVATIONS, Labels, label
from cxr_node.evaluation.mesh import (
    APPROXIMATE,
    COVERED,
    MAPPING,
    IUReport,
    iu_reports,
    mesh_labels,
)
from cxr_node.evaluation.scores import agreement

WHEEL = (Path(sys.prefix) / "share" / "cxr-node-test-data"
         / "torchxrayvision-1.5.7-py3-none-any.whl")
WHEEL_MEMBER = "torchxrayvision/data/NLMCXR_reports.tgz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reports", type=Path, default=WHEEL,
                        help="NLMCXR_reports.tgz, or the torchxrayvision 1.5.7 wheel that holds "
                             f"it (default {WHEEL})")
    parser.add_argument("--errors", metavar="OBSERVATION", choices=OBSERVATIONS,
                        help="also print the reports where the labeler and MeSH disagree on it")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        archive = args.reports
        if archive.suffix == ".whl":
            archive = Path(scratch) / "NLMCXR_reports.tgz"
            with zipfile.ZipFile(args.reports) as wheel:
                archive.write_bytes(wheel.read(WHEEL_MEMBER))
        reports = [r for r in iu_reports(archive) if r.indexed and r.text]
    started = time.perf_counter()
    drafts = [label(r.text) for r in reports]
    seconds = time.perf_counter() - started
    references = [mesh_labels(r.major) for r in reports]

    headings = {o: sorted(h + (f" ({', '.join(sorted(q))})" if q else "")
                          for h, rules in MAPPING.items() for name, q in rules if name == o)
                for o in OBSERVATIONS}
    strict = agreement(references, drafts)
    lenient = agreement(references, drafts, positive=(1, -1))
    print(f"{len(reports)} indexed IU X-ray reports with text; labeled in {seconds:.2f} s "
          f"({len(reports) / seconds:.0f} reports/s)\n")
    print("| observation | MeSH headings | support | precision | recall | F1 | F1, uncertain "
          "as positive |")
    print("|---|---|---|---|---|---|---|")
    for row, loose in zip(strict, lenient, strict=True):
        mark = "" if row.observation in COVERED else " (approximate)"
        print(f"| {row.observation}{mark} | {', '.join(headings[row.observation])} | "
              f"{row.support} | {_show(row.precision)} | {_show(row.recall)} | "
              f"{_show(row.f1)} | {_show(loose.f1)} |")
    covered = [r.f1 or 0.0 for r in strict if r.observation in COVERED]
    print(f"\nmacro F1 over the {len(covered)} observations MeSH covers: {fmean(covered):.3f} "
          f"(not counted: {', '.join(APPROXIMATE)})")
    if args.errors:
        _print_errors(args.errors, reports, references, drafts)
    return 0


def _show(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_errors(observation: str, reports: list[IUReport], references: list[Labels],
                  drafts: list[Labels]) -> None:
    for report, reference, draft in zip(reports, references, drafts, strict=True):
        if (reference[observation] == 1) != (draft[observation] == 1):
            print(f"\n{report.number}: MeSH {reference[observation]}, labeler "
                  f"{draft[observation]}; {'; '.join(report.major)}\n  {report.text}")


if __name__ == "__main__":
    sys.exit(main())
