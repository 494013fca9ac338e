"""Text and label scores of drafts against reference reports, each named with its definition.

Published numbers differ as much by the scorer as by the model (pycocoevalcap's ROUGE-L weighs
recall with beta 1.2, rouge-score with 1; pycocoevalcap's METEOR is one corpus score, not a mean of
per-report scores; ReXrank's BLEU-2 is a mean of per-report BLEU on raw text), so every `Score`
carries the exact definition it uses, and the definitions are those of the reference packages:

* BLEU-1..4, ROUGE-L, CIDEr-D: pycocoevalcap 1.2 (as R2Gen and its successors call it), on text
  cleaned as R2Gen cleans IU X-ray reports (`clean`). Implemented here, so that the node can score
  drafts live without pycocoevalcap, numpy or Java; the tests check each against pycocoevalcap on
  the same inputs.
* METEOR 1.5: pycocoevalcap's meteor-1.5.jar, run the way pycocoevalcap runs it, when pycocoevalcap
  (the `eval` extra) and `java` are installed; otherwise "not measured" and why.
* BLEU-2 per report: ReXrank's (rajpurkarlab/CXR-Report-Metric `add_bleu_col`: fast-bleu, which
  is NLTK's sentence BLEU with smoothing method 1); the tests check it against fast-bleu.
* Label F1: the rule-based labeler of `labels.py` on both texts, CheXpert-style counting.
"""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from cxr_node.evaluation.labels import COMMON, OBSERVATIONS, SIGNIFICANT, significant_misses


@dataclass(frozen=True)
class Score:
    """One number and exactly how it was computed; `value` None means not measured (`note`
    says why)."""

    name: str
    value: float | None
    implementation: str
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- R2Gen's cleaning ---------------------------------------------------------------------------

# R2Gen's clean_report_iu_xray (cuhksz-nlp/R2Gen modules/tokenizers.py), in its order: these
# replacements, lower case, split into sentences at ". ", drop quotes, slashes and backslashes,
# strip, drop the characters of _R2GEN_DROPPED, join with " . " and end with " .".
_R2GEN_REPLACEMENTS = (
    ("..", "."), ("..", "."), ("..", "."), ("1. ", ""), (". 2. ", ". "), (". 3. ", ". "),
    (". 4. ", ". "), (". 5. ", ". "), (" 2. ", ". "), (" 3. ", ". "), (" 4. ", ". "),
    (" 5. ", ". "),
)
# R2Gen's character class as written: ":-\[" is the range ':' to '[' (so also ;<=>?@ and A-Z);
# "-" itself is kept.
_R2GEN_DROPPED = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")
_R2GEN_REMOVED = str.maketrans("", "", "\"/\\'")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """R2Gen's cleaning of IU X-ray reports, as the published IU X-ray scores use it.

    One addition: control characters and runs of white space (newlines included) first become one
    space. R2Gen's reports are single lines with single spaces, so their cleaning is unchanged; a
    draft's line breaks would otherwise reach ROUGE-L's split at " " and METEOR's line protocol.
    R2Gen's quirks are kept on purpose, so that scores stay comparable: "1. " is removed anywhere,
    and empty sentences stay (as " . ").
    """
    text = " ".join(_CONTROL.sub(" ", text).split())
    for old, new in _R2GEN_REPLACEMENTS:
        text = text.replace(old, new)
    sentences = text.strip().lower().split(". ")
    return " . ".join(_R2GEN_DROPPED.sub("", s.translate(_R2GEN_REMOVED).strip().lower())
                      for s in sentences) + " ."


# -- pycocoevalcap's BLEU, ROUGE-L and CIDEr-D --------------------------------------------------

BLEU_DEFINITION = ("pycocoevalcap 1.2 Bleu(4): corpus BLEU over all reports (clipped n-gram "
                   "counts and lengths summed first), closest reference length, its 1e-15/1e-9 "
                   "guards; R2Gen-cleaned text split at white space. Own implementation, checked "
                   "against pycocoevalcap")
ROUGE_DEFINITION = ("pycocoevalcap 1.2 Rouge: LCS F-measure with beta 1.2 per report, mean over "
                    "reports; R2Gen-cleaned text split at single spaces. Own implementation, "
                    "checked against pycocoevalcap")
CIDER_DEFINITION = ("pycocoevalcap 1.2 Cider (CIDEr-D): TF-IDF of 1- to 4-grams with the IDF over "
                    "the references given, clipping, Gaussian length penalty sigma 6, x10, mean "
                    "over reports; R2Gen-cleaned text. Own implementation, checked against "
                    "pycocoevalcap")
METEOR_DEFINITION = ("METEOR 1.5: pycocoevalcap 1.2's meteor-1.5.jar run as pycocoevalcap runs it "
                     "(-l en -norm), one corpus score from the statistics of all reports; "
                     "R2Gen-cleaned text")
REXRANK_BLEU2_DEFINITION = (
    "ReXrank's BLEU-2 (rajpurkarlab/CXR-Report-Metric add_bleu_col): per report, fast-bleu 0.0.90 "
    "sentence BLEU with weights 1/2 1/2 and NLTK smoothing method 1 (epsilon 0.1), 0 without a "
    "unigram match; raw text lower-cased, '.' split off, split at spaces (not R2Gen-cleaned). "
    "Own implementation, checked against fast-bleu")
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's guards in BLEU
_ROUGE_BETA = 1.2
_CIDER_N, _CIDER_SIGMA = 4, 6.0


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _bleu(references: Sequence[str], drafts: Sequence[str], n: int = 4) -> list[float]:
    """pycocoevalcap's BleuScorer.compute_score(option='closest') with one reference each."""
    testlen = reflen = 0
    guess, correct = [0] * n, [0] * n
    for reference, draft in zip(references, drafts, strict=True):
        ref, hyp = reference.split(), draft.split()
        testlen += len(hyp)
        reflen += len(ref)
        for k in range(1, n + 1):
            ref_counts = _ngrams(ref, k)
            guess[k - 1] += max(0, len(hyp) - k + 1)
            correct[k - 1] += sum(min(c, ref_counts[g]) for g, c in _ngrams(hyp, k).items())
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyrö 2004): O(len(a) x
    len(b) / word size), so that a long hostile text costs milliseconds, not seconds."""
    masks: dict[str, int] = {}
    for i, token in enumerate(b):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(b)) - 1
    v = full
    for token in a:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(b) - v.bit_count()


def _rouge_l(reference: str, draft: str) -> float:
    """pycocoevalcap's Rouge.calc_score with one reference."""
    hyp, ref = draft.split(" "), reference.split(" ")
    lcs = _lcs(ref, hyp)
    precision, recall = lcs / len(hyp), lcs / len(ref)
    if precision == 0 or recall == 0:
        return 0.0
    beta2 = _ROUGE_BETA ** 2
    return ((1 + beta2) * precision * recall) / (recall + beta2 * precision)


def _cider_d(references: Sequence[str], drafts: Sequence[str]) -> list[float]:
    """pycocoevalcap's CiderScorer (CIDEr-D) with one reference each; the score of each report."""
    ref_counts = [_all_ngrams(r.split()) for r in references]
    document_frequency: Counter[tuple[str, ...]] = Counter()
    for counts in ref_counts:
        document_frequency.update(counts.keys())
    log_documents = math.log(len(references))

    def vector(counts: Counter[tuple[str, ...]]) -> tuple[list[dict], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(_CIDER_N)]
        norm = [0.0] * _CIDER_N
        length = 0
        for ngram, tf in counts.items():
            k = len(ngram) - 1
            weight = tf * (log_documents - math.log(max(1.0, document_frequency[ngram])))
            vec[k][ngram] = weight
            norm[k] += weight * weight
            if k == 1:  # pycocoevalcap counts bigrams as the "length": kept, for equal scores
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for ref, draft in zip(ref_counts, drafts, strict=True):
        vec_hyp, norm_hyp, len_hyp = vector(_all_ngrams(draft.split()))
        vec_ref, norm_ref, len_ref = vector(ref)
        penalty = math.exp(-((len_hyp - len_ref) ** 2) / (2 * _CIDER_SIGMA ** 2))
        total = 0.0
        for k in range(_CIDER_N):
            value = sum(min(w, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0)
                        for g, w in vec_hyp[k].items())
            if norm_hyp[k] != 0 and norm_ref[k] != 0:
                value /= norm_hyp[k] * norm_ref[k]
            total += value * penalty
        scores.append(total / _CIDER_N * 10.0)
    return scores


def _all_ngrams(tokens: Sequence[str]) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, _CIDER_N + 1):
        counts.update(_ngrams(tokens, k))
    return counts


# -- ReXrank's per-report BLEU-2 ----------------------------------------------------------------

def _rexrank_tokens(text: str) -> list[str]:
    return [t for t in text.lower().replace(".", " .").split(" ") if t]


def rexrank_bleu2(reference: str, draft: str) -> float:
    """ReXrank's BLEU-2 of one report (see REXRANK_BLEU2_DEFINITION)."""
    ref, hyp = _rexrank_tokens(reference), _rexrank_tokens(draft)
    log_sum = 0.0
    for k in (1, 2):
        ref_counts, counts = _ngrams(ref, k), _ngrams(hyp, k)
        matches = sum(min(c, ref_counts[g]) for g, c in counts.items())
        total = max(1, sum(counts.values()))
        if k == 1 and matches == 0:
            return 0.0
        log_sum += 0.5 * math.log((matches or 0.1) / total)
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(log_sum)


# -- METEOR through pycocoevalcap's jar ---------------------------------------------------------

METEOR_BASE_TIMEOUT_SECONDS = 120.0
METEOR_TIMEOUT_PER_REPORT_SECONDS = 0.5


class MeteorError(RuntimeError):
    """The METEOR jar could not give a score; the message says why."""


def meteor_jar() -> Path | None:
    """pycocoevalcap's meteor-1.5.jar (with its paraphrase table), found without importing
    pycocoevalcap; None when the `eval` extra is not installed."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    jar = Path(next(iter(spec.submodule_search_locations))) / "meteor" / "meteor-1.5.jar"
    return jar if jar.is_file() and (jar.parent / "data" / "paraphrase-en.gz").is_file() else None


def meteor(references: Sequence[str], drafts: Sequence[str],
           timeout: float | None = None) -> Score:
    """Corpus METEOR 1.5 of cleaned texts, or value None with the reason in the note."""
    jar, java = meteor_jar(), shutil.which("java")
    if jar is None:
        return Score("METEOR", None, METEOR_DEFINITION, "not measured: pycocoevalcap (the "
                     "'eval' extra: pip install 'cxr-node[eval]') is not installed")
    if java is None:
        return Score("METEOR", None, METEOR_DEFINITION, "not measured: no java on PATH "
                     "(Debian: apt install default-jre-headless)")
    if timeout is None:
        timeout = METEOR_BASE_TIMEOUT_SECONDS + METEOR_TIMEOUT_PER_REPORT_SECONDS * len(drafts)
    try:
        value = _run_meteor(java, jar, references, drafts, timeout)
    except MeteorError as exc:
        return Score("METEOR", None, METEOR_DEFINITION, f"not measured: {exc}")
    return Score("METEOR", value, METEOR_DEFINITION)


def _run_meteor(java: str, jar: Path, references: Sequence[str], drafts: Sequence[str],
                timeout: float) -> float:
    """pycocoevalcap's Meteor.compute_score, with a time limit and a clear failure. The texts are
    single lines (`clean`); "|||" separates fields in the jar's protocol, so it is removed from
    references too (pycocoevalcap removes it from drafts only)."""
    command = [java, "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"]
    expired = threading.Event()
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, cwd=jar.parent, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=errors)
        assert process.stdin is not None and process.stdout is not None

        def expire() -> None:
            expired.set()
            process.kill()

        timer = threading.Timer(timeout, expire)
        timer.start()
        try:
            stats = []
            for reference, draft in zip(references, drafts, strict=True):
                hyp = draft.replace("|||", "").replace("  ", " ")
                _send(process.stdin, f"SCORE ||| {reference.replace('|||', '')} ||| {hyp}")
                stats.append(_receive(process.stdout))
            _send(process.stdin, "EVAL ||| " + " ||| ".join(stats))
            for _ in stats:
                _receive(process.stdout)  # the score of each report, then the corpus score
            value = float(_receive(process.stdout))
        except (OSError, ValueError) as exc:
            if expired.is_set():
                raise MeteorError(f"the METEOR jar did not finish within {timeout:.0f} s") from None
            errors.seek(0)
            tail = errors.read()[-300:].decode("utf-8", "replace").strip()
            raise MeteorError(f"the METEOR jar failed ({exc}){': ' + tail if tail else ''}") \
                from None
        finally:
            timer.cancel()
            process.kill()
            process.wait()
    if not 0.0 <= value <= 1.0:
        raise MeteorError(f"the METEOR jar answered {value!r}, not a score in [0, 1]")
    return value


def _send(stream: IO[bytes], line: str) -> None:
    stream.write(line.encode() + b"\n")
    stream.flush()


def _receive(stream: IO[bytes]) -> str:
    line = stream.readline()
    if not line:
        raise OSError("it stopped answering")
    return line.decode().strip()


# -- corpus and per-report text scores ----------------------------------------------------------

TEXT_SCORES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D",
               "BLEU-2 (per report, mean)")


def text_scores(references: Sequence[str], drafts: Sequence[str], *, with_meteor: bool = True,
                meteor_timeout: float | None = None) -> list[Score]:
    """Corpus scores of drafts against their references (paired by position), in TEXT_SCORES
    order. `with_meteor=False` leaves METEOR out (live scoring starts no Java)."""
    if len(references) != len(drafts):
        raise ValueError(f"{len(references)} references but {len(drafts)} drafts")
    definitions = dict(zip(TEXT_SCORES, [BLEU_DEFINITION] * 4 + [
        METEOR_DEFINITION, ROUGE_DEFINITION, CIDER_DEFINITION, REXRANK_BLEU2_DEFINITION],
        strict=True))
    if not references:
        return [Score(name, None, definitions[name], "not measured: no reports")
                for name in TEXT_SCORES]
    refs, hyps = [clean(r) for r in references], [clean(d) for d in drafts]
    scores = [Score(f"BLEU-{k + 1}", value, BLEU_DEFINITION)
              for k, value in enumerate(_bleu(refs, hyps))]
    scores.append(meteor(refs, hyps, meteor_timeout) if with_meteor else Score(
        "METEOR", None, METEOR_DEFINITION, "not measured: left out on request"))
    scores.append(Score("ROUGE-L", _mean(_rouge_l(r, h) for r, h in zip(refs, hyps, strict=True)),
                        ROUGE_DEFINITION))
    scores.append(Score("CIDEr-D", _mean(_cider_d(refs, hyps)), CIDER_DEFINITION,
                        "" if len(refs) > 1 else "one report: its IDF makes every weight 0"))
    scores.append(Score("BLEU-2 (per report, mean)",
                        _mean(rexrank_bleu2(r, d) for r, d in zip(references, drafts, strict=True)),
                        REXRANK_BLEU2_DEFINITION))
    return scores


def report_scores(reference: str, draft: str) -> dict[str, float]:
    """Scores of one draft against its reference, for live scoring: "BLEU-2" (ReXrank's, on the
    raw text) and "ROUGE-L" (pycocoevalcap's, on R2Gen-cleaned text)."""
    return {"BLEU-2": rexrank_bleu2(reference, draft),
            "ROUGE-L": _rouge_l(clean(reference), clean(draft))}


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.fsum(values) / len(values)


# -- label agreement ----------------------------------------------------------------------------

Labels = dict[str, int | None]


@dataclass(frozen=True)
class Agreement:
    """How often one observation's label in the drafts matches the references."""

    observation: str
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def support(self) -> int:
        """Positive references."""
        return self.tp + self.fn

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def f1(self) -> float | None:
        """2TP / (2TP + FP + FN); None when neither side has a positive."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else None


def agreement(references: Sequence[Labels], drafts: Sequence[Labels],
              observations: Sequence[str] = OBSERVATIONS,
              positive: Collection[int | None] = (1,)) -> list[Agreement]:
    """Per observation, the confusion counts of `label in positive` between drafts and
    references (paired by position)."""
    if len(references) != len(drafts):
        raise ValueError(f"{len(references)} references but {len(drafts)} drafts")
    rows = []
    for observation in observations:
        cells = Counter((ref.get(observation) in positive, hyp.get(observation) in positive)
                        for ref, hyp in zip(references, drafts, strict=True))
        rows.append(Agreement(observation, tp=cells[True, True], fp=cells[False, True],
                              fn=cells[True, False], tn=cells[False, False]))
    return rows


LABEL_DEFINITION = (
    "CheXpert-style rule-based labeler (cxr_node.evaluation.labels) on reference and draft; "
    "positive = 1, and negative (0), uncertain (-1) and not mentioned count as not positive; "
    "F1 = 2TP/(2TP+FP+FN); micro over all report x observation cells, macro = mean of the "
    "per-observation F1 over the observations positive in some reference or draft")


def label_scores(references: Sequence[Labels], drafts: Sequence[Labels]) -> list[Score]:
    """Label F1, micro and macro, over the 14 observations and over the 5 COMMON ones, and the
    share of reports with a significant miss."""
    scores = []
    for group, observations in (("14", OBSERVATIONS), ("5 common", COMMON)):
        rows = agreement(references, drafts, observations)
        tp, fp, fn = (sum(getattr(r, k) for r in rows) for k in ("tp", "fp", "fn"))
        micro = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None
        scores.append(Score(f"label F1 micro ({group})", micro, LABEL_DEFINITION,
                            "" if micro is not None else "not measured: no positive label"))
        counted = [r for r in rows if r.f1 is not None]
        left_out = [r.observation for r in rows if r.f1 is None]
        note = f"left out (no positive on either side): {', '.join(left_out)}" if left_out else ""
        scores.append(Score(
            f"label F1 macro ({group})",
            _mean(r.f1 for r in counted if r.f1 is not None) if counted else None,
            LABEL_DEFINITION, note if counted else "not measured: no positive label"))
    missed = sum(bool(significant_misses(r, d)) for r, d in zip(references, drafts, strict=True))
    scores.append(Score(
        "significant misses", missed / len(references) if references else None,
        f"share of reports whose reference is positive (1) for one of {', '.join(SIGNIFICANT)} "
        "where the draft is negative or silent (the labeler on both)",
        f"{missed} of {len(references)} reports" if references else "not measured: no reports"))
    return scores
