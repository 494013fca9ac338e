"""The text and label scores: hand-computed cases, agreement with the reference packages
(pycocoevalcap 1.2, fast-bleu 0.0.90) on the same inputs, METEOR through the jar or "not
measured", and `cxr-node eval score` end to end with hostile input files."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from fast_bleu import BLEU
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from cxr_node.cli import main
from cxr_node.evaluation import jsonl, label, label_scores, mesh, report_scores, text_scores
from cxr_node.evaluation import scores as S
from cxr_node.evaluation.scores import clean, rexrank_bleu2

# Pairs that stress the definitions: empty and one-word texts, repeats, punctuation only,
# numbered lists, double spaces R2Gen leaves behind, non-ASCII letters.
EDGE_PAIRS = [
    ("The heart is normal. No effusion.", ""),
    ("No acute disease.", "No"),
    ("1. Cardiomegaly. 2. Small left effusion.", "cardiomegaly cardiomegaly cardiomegaly"),
    ("Heart size normal.. Lungs clear...", "...!!!"),
    ("Mild cardiomegaly. . Lungs clear.", "Mild cardiomegaly.  Lungs clear."),
    ("Opacité in the left base: pneumonia?", "opacité left base, pneumonia (possible)."),
    ("a b c d e f g h i j k l m n o p", "p o n m l k j i h g f e d c b a"),
]


def iu_pairs(archive: Path, count: int) -> tuple[list[str], list[str]]:
    """Real report text: each report's Findings as the reference, and the Impression of the
    report after it (a shifted, partly matching "draft")."""
    reports = [r for r in mesh.iu_reports(archive) if r.findings and r.impression][:count + 1]
    return [r.findings for r in reports[:-1]], [r.impression for r in reports[1:]]


def coco(references: list[str], drafts: list[str]) -> tuple[dict, dict]:
    return ({i: [clean(r)] for i, r in enumerate(references)},
            {i: [clean(d)] for i, d in enumerate(drafts)})


def by_name(scores: list[S.Score]) -> dict[str, float | None]:
    return {s.name: s.value for s in scores}


# -- cleaning -------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "cleaned"), [
    ("The heart is normal. No effusion.", "the heart is normal . no effusion ."),
    ("1. Cardiomegaly. 2. No effusion.", "cardiomegaly . no effusion ."),
    ("(A) x-ray: ok!", "a x-ray ok ."),
    ("Heart normal.\nNo\teffusion.", "heart normal . no effusion ."),
    ("Lungs clear. . Heart normal.", "lungs clear .  . heart normal ."),
    ("", " ."),
])
def test_clean_is_r2gens_cleaning(text: str, cleaned: str) -> None:
    assert clean(text) == cleaned


# -- hand-computed values (of the scorers themselves, on text already cleaned) ---------------


def test_bleu_by_hand() -> None:
    # the cat sat on a mat / the cat sat on the mat: 5/6 unigrams, 3/5 bigrams, 2/4 trigrams,
    # 1/3 four-grams match; equal lengths, so no brevity penalty
    bleu = S._bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert bleu == pytest.approx([5 / 6, math.sqrt(5 / 6 * 3 / 5),
                                  (5 / 6 * 3 / 5 * 2 / 4) ** (1 / 3),
                                  (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** (1 / 4)], rel=1e-6)


def test_bleu_is_one_corpus_score_with_a_brevity_penalty() -> None:
    # counts are summed over the reports before dividing: 3 + 2 words match of 3 + 2, but the
    # drafts have 5 words against 9: exp(1 - 9/5)
    bleu = S._bleu(["a b c d e f", "g h i"], ["a b c", "g h"])
    assert bleu[0] == pytest.approx(math.exp(1 - 9 / 5), rel=1e-6)
    assert bleu[1] == pytest.approx(math.exp(1 - 9 / 5), rel=1e-6)


def test_rouge_l_by_hand() -> None:
    # "a b" in "a b c d": LCS 2, precision 1, recall 1/2; beta 1.2 weighs recall
    assert S._rouge_l("a b c d", "a b") == pytest.approx(
        (1 + 1.44) * 1 * 0.5 / (0.5 + 1.44 * 1), rel=1e-9)
    # the LCS skips a word on each side: "the cat sat on mat"
    assert S._rouge_l("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(
        5 / 6, rel=1e-9)
    assert S._rouge_l("a b", "c d") == 0.0


def test_cider_d_by_hand() -> None:
    # two references with no n-gram in common: every IDF weight is log 2. The first draft
    # repeats its reference (cosine 1 for 1- and 2-grams, none of 3 and 4: (1+1+0+0)/4 x 10);
    # the second shares nothing.
    assert S._cider_d(["a b", "c d"], ["a b", "x y"]) == pytest.approx([5.0, 0.0], rel=1e-9)
    # "a b" against "a b c": unigram cosine 2/sqrt(6), bigram 1/sqrt(2), and the Gaussian
    # penalty of one bigram's difference in length, exp(-1 / (2 x 6^2))
    first = (2 / math.sqrt(6) + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 * 10
    assert S._cider_d(["a b c", "d e"], ["a b", "d e"]) == pytest.approx([first, 5.0], rel=1e-9)
    # an n-gram in every reference weighs nothing: "a" is in both
    assert S._cider_d(["a b", "a c"], ["a", "a"]) == [0.0, 0.0]


def test_text_scores_are_of_cleaned_text() -> None:
    got = by_name(text_scores(["The heart is NORMAL."], ["the heart, is normal"],
                              with_meteor=False))
    assert got["BLEU-4"] == pytest.approx(1.0, rel=1e-6) and got["ROUGE-L"] == 1.0


def test_rexrank_bleu2_by_hand() -> None:
    # "heart normal ." against "heart is normal .": 3/3 unigrams, 1/2 bigrams, 3 words of 4
    assert rexrank_bleu2("Heart is normal.", "heart normal.") == pytest.approx(
        math.exp(1 - 4 / 3) * math.sqrt(1 * 1 / 2), rel=1e-9)
    # no bigram at all: smoothed to 0.1 / 1 (NLTK method 1), 1 word of 3
    assert rexrank_bleu2("heart is normal", "heart") == pytest.approx(
        math.exp(1 - 3) * math.sqrt(1 * 0.1), rel=1e-9)
    assert rexrank_bleu2("heart is normal", "lungs clear") == 0.0
    assert rexrank_bleu2("heart is normal", "") == 0.0


def test_label_scores_by_hand() -> None:
    none = dict.fromkeys(label(""))
    refs = [{**none, "Cardiomegaly": 1, "Edema": 1}, {**none, "Pneumothorax": 1},
            {**none, "Atelectasis": 0}]
    drafts = [{**none, "Cardiomegaly": 1, "Edema": -1}, {**none, "Pneumothorax": 0},
              {**none, "Atelectasis": 1}]
    got = {s.name: s for s in label_scores(refs, drafts)}
    # TP: cardiomegaly; FN: edema (uncertain is not positive), pneumothorax; FP: atelectasis
    assert got["label F1 micro (14)"].value == pytest.approx(2 * 1 / (2 * 1 + 1 + 2))
    # per observation: cardiomegaly 1, edema 0, pneumothorax 0, atelectasis 0; the ten others
    # have no positive on either side and are left out, and the note says which
    assert got["label F1 macro (14)"].value == pytest.approx(1 / 4)
    assert "Fracture" in got["label F1 macro (14)"].note
    assert got["label F1 micro (5 common)"].value == pytest.approx(2 / (2 + 1 + 1))
    assert got["label F1 macro (5 common)"].value == pytest.approx(1 / 3)
    # report 1 (edema uncertain is not a miss, it is said) no; report 2 (pneumothorax) yes
    assert got["significant misses"].value == pytest.approx(1 / 3)
    assert got["significant misses"].note == "1 of 3 reports"


def test_no_reports_is_not_measured() -> None:
    assert all(s.value is None and s.note for s in text_scores([], []))
    assert all(s.value is None for s in label_scores([], []))


# -- the reference packages on the same inputs ----------------------------------------------


def test_bleu_rouge_cider_equal_pycocoevalcap(iu_reports: Path) -> None:
    references, drafts = iu_pairs(iu_reports, 300)
    references += [r for r, _ in EDGE_PAIRS]
    drafts += [d for _, d in EDGE_PAIRS]
    gts, res = coco(references, drafts)
    ours = by_name(text_scores(references, drafts, with_meteor=False))
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        assert ours[f"BLEU-{k + 1}"] == pytest.approx(bleu[k], abs=1e-9)
    assert ours["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-9)
    assert ours["CIDEr-D"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)
    # and per report, as the live scorer gives them
    rouge = Rouge()
    for reference, draft in zip(references, drafts, strict=True):
        assert report_scores(reference, draft)["ROUGE-L"] == pytest.approx(
            rouge.calc_score([clean(draft)], [clean(reference)]), abs=1e-12)


def test_lcs_equals_pycocoevalcaps_on_random_token_lists() -> None:
    from pycocoevalcap.rouge.rouge import my_lcs

    rng = random.Random(7)
    for _ in range(300):
        a = rng.choices("abcde", k=rng.randrange(0, 40))
        b = rng.choices("abcdef", k=rng.randrange(1, 40))
        assert S._lcs(a, b) == my_lcs(a, b)


def test_rexrank_bleu2_equals_fast_bleu(iu_reports: Path) -> None:
    references, drafts = iu_pairs(iu_reports, 300)
    references += [r for r, _ in EDGE_PAIRS]
    drafts += [d for _, d in EDGE_PAIRS]
    for reference, draft in zip(references, drafts, strict=True):
        # ReXrank's own preparation of the text (CXR-Report-Metric prep_reports), then fast-bleu
        ref = [t for t in str(reference).lower().replace(".", " .").split(" ") if t != ""]
        hyp = [t for t in str(draft).lower().replace(".", " .").split(" ") if t != ""]
        expected = BLEU([ref], {"bigram": (1 / 2., 1 / 2.)}).get_score([hyp])["bigram"][0]
        assert rexrank_bleu2(reference, draft) == pytest.approx(expected, abs=1e-12)


@pytest.mark.slow
def test_meteor_equals_pycocoevalcaps(iu_reports: Path) -> None:
    references, drafts = iu_pairs(iu_reports, 60)
    references += [r for r, _ in EDGE_PAIRS]
    drafts += [d for _, d in EDGE_PAIRS]
    ours = by_name(text_scores(references, drafts))["METEOR"]
    expected, _ = Meteor().compute_score(*coco(references, drafts))
    assert ours == pytest.approx(expected, abs=1e-9)


@pytest.mark.slow
def test_meteor_of_text_that_would_break_the_jars_protocol() -> None:
    """Line breaks and "|||" (the jar's field separator) in a reference or a draft score as if
    they were not there, instead of shifting every later answer."""
    references = ["No effusion ||| pneumothorax.\r\nHeart normal.", "Lungs clear.\x00\x1b[2J"]
    drafts = ["No effusion.\rHeart normal |||", "Lungs\u2028clear."]
    cleaned = [clean(t) for t in references + drafts]
    assert not any(c in t for t in cleaned for c in "\r\n\x00\x1b\u2028")
    got = by_name(text_scores(references, drafts))["METEOR"]
    tame = [t.replace("|||", "") for t in cleaned]
    assert got is not None and got == pytest.approx(S.meteor(tame[:2], tame[2:]).value,
                                                    abs=1e-12)


# -- METEOR not measured, and a jar that misbehaves -----------------------------------------


def test_meteor_without_java_is_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    score = S.meteor(["heart normal ."], ["heart normal ."])
    assert score.value is None
    assert score.note.startswith("not measured: no java") and "default-jre-headless" in score.note


def test_meteor_without_pycocoevalcap_is_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S.importlib.util, "find_spec", lambda name: None)
    score = S.meteor(["heart normal ."], ["heart normal ."])
    assert score.value is None and "pycocoevalcap" in score.note and "eval" in score.note


def fake_java(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    java = tmp_path / "bin" / "java"
    java.parent.mkdir()
    java.write_text(f"#!/bin/sh\n{body}\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", str(java.parent))


def test_meteor_jar_that_hangs_is_stopped(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fake_java(tmp_path, monkeypatch, "exec /bin/sleep 60")
    score = S.meteor(["heart normal ."], ["heart normal ."], timeout=1)
    assert score.value is None and "did not finish within 1 s" in score.note


def test_meteor_jar_that_fails_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_java(tmp_path, monkeypatch, "echo 'Error: Unable to access jarfile' >&2; exit 1")
    score = S.meteor(["heart normal ."], ["heart normal ."])
    assert score.value is None and "Unable to access jarfile" in score.note


def test_meteor_answer_out_of_range_is_refused(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fake_java(tmp_path, monkeypatch, "while read line; do echo 7; echo 7; done")
    score = S.meteor(["heart normal ."], ["heart normal ."])
    assert score.value is None and "not a score" in score.note


def test_the_package_imports_no_heavy_module() -> None:
    """The node imports it for live scoring: no torch, numpy or pycocoevalcap at import."""
    code = ("import sys, cxr_node.evaluation, cxr_node.evaluation.jsonl, cxr_node.evaluation.mesh;"
            "print([m for m in ('torch', 'numpy', 'pycocoevalcap') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- cxr-node eval score --------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def refs(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "refs.jsonl", [
        {"id": "a", "text": "Heart size is normal. No pneumothorax. Small left pleural effusion."},
        {"id": 7, "text": "Mild cardiomegaly. Lungs are clear."},
    ])


def eval_score(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["eval", "score", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_score_pairs_by_id_and_prints_every_score(
        refs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(S, "meteor_jar", lambda: None)  # METEOR: test_eval_score_command_...
    hyps = write_jsonl(tmp_path / "hyps.jsonl", [
        {"id": "7", "text": "The heart is enlarged. No effusion."}, "",
        {"id": "a", "text": "Normal heart size. Small left effusion. No pneumothorax.", "x": 1},
    ])
    code, out, _ = eval_score(capsys, "--refs", str(refs), "--hyps", str(hyps), "--json")
    assert code == 0
    result = json.loads(out)
    assert result["reports"] == 2
    got = {s["name"]: s for s in result["scores"]}
    expected = text_scores(
        ["Heart size is normal. No pneumothorax. Small left pleural effusion.",
         "Mild cardiomegaly. Lungs are clear."],
        ["Normal heart size. Small left effusion. No pneumothorax.",
         "The heart is enlarged. No effusion."], with_meteor=False)
    for score in expected:
        if score.name != "METEOR":
            assert got[score.name]["value"] == pytest.approx(score.value)
            assert got[score.name]["implementation"] == score.implementation
    assert got["label F1 micro (5 common)"]["value"] == 1.0
    code, out, _ = eval_score(capsys, "--refs", str(refs), "--hyps", str(hyps))
    assert code == 0 and "2 reports" in out and "CIDEr-D" in out and "definitions:" in out
    assert "pycocoevalcap 1.2 Bleu(4)" in out


@pytest.mark.parametrize(("hyps", "message"), [
    ([{"id": "a", "text": "x"}], "refs.jsonl:2: id '7' is not in"),
    ([{"id": "a", "text": "x"}, {"id": 7, "text": "y"}, {"id": "b", "text": "z"}],
     "hyps.jsonl:3: id 'b' is not in"),
    ([{"id": "a", "text": "x"}, {"id": "7", "text": "y"}, {"id": "a", "text": "z"}],
     "hyps.jsonl:3: id 'a' again (first on line 1)"),
    (['{"id": "a", "text": "x"', {"id": 7, "text": "y"}], "hyps.jsonl:1: not JSON"),
    ([{"id": "a", "text": 5}], 'hyps.jsonl:1: "text" must be a string'),
    ([{"id": True, "text": "x"}], 'hyps.jsonl:1: "id" must be a string or an integer'),
    ([{"id": "a\x1b[2J", "text": "x"}], 'hyps.jsonl:1: "id" must be 1 to 200 printable'),
    (["[" * 60_000], "hyps.jsonl:1: not JSON"),
    ([{"id": "é\u202e", "text": "x"}], "printable"),
])
def test_eval_score_names_the_bad_line(refs: Path, tmp_path: Path, hyps: list[object],
                                       message: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "hyps.jsonl", hyps)
    code, out, err = eval_score(capsys, "--refs", str(refs), "--hyps", str(path))
    assert code == 2 and out == ""
    assert message in err
    assert "\x1b" not in err


def test_eval_score_refuses_bytes_that_are_not_utf8(refs: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "hyps.jsonl"
    path.write_bytes(b'{"id": "a", "text": "\xff"}\n')
    code, _, err = eval_score(capsys, "--refs", str(refs), "--hyps", str(path))
    assert code == 2 and "hyps.jsonl:1: not UTF-8" in err


def test_eval_score_bounds_line_length_and_count(refs: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # one line of 40 MB: refused by its number, read a piece at a time, never held whole
    path = tmp_path / "hyps.jsonl"
    with path.open("w") as f:
        f.write(json.dumps({"id": "a", "text": "x"}) + "\n")
        f.write('{"id": 7, "text": "' + "a" * 40_000_000 + '"}\n')
    code, _, err = eval_score(capsys, "--refs", str(refs), "--hyps", str(path))
    assert code == 2 and f"hyps.jsonl:2: longer than {jsonl.MAX_LINE_BYTES} bytes" in err
    # more reports than the limit: refused at the first one over it
    monkeypatch.setattr(jsonl, "MAX_RECORDS", 3)
    many = write_jsonl(tmp_path / "many.jsonl", [{"id": i, "text": "x"} for i in range(10)])
    code, _, err = eval_score(capsys, "--refs", str(many), "--hyps", str(many))
    assert code == 2 and "many.jsonl:4: more than 3 reports" in err


def test_eval_score_missing_file(refs: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = eval_score(capsys, "--refs", str(refs), "--hyps", str(tmp_path / "none"))
    assert code == 2 and "none: cannot read: No such file or directory" in err


@pytest.mark.slow
def test_eval_score_command_with_meteor(refs: Path, tmp_path: Path) -> None:
    """The installed command, METEOR through the jar included."""
    hyps = write_jsonl(tmp_path / "hyps.jsonl", [
        {"id": "a", "text": "Normal heart size. Small left effusion. No pneumothorax."},
        {"id": 7, "text": "The heart is enlarged. No effusion."}])
    command = Path(sys.executable).parent / "cxr-node"
    done = subprocess.run([str(command), "eval", "score", "--refs", str(refs), "--hyps",
                           str(hyps), "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    meteor = next(s for s in json.loads(done.stdout)["scores"] if s["name"] == "METEOR")
    assert 0 < meteor["value"] < 1 and meteor["note"] == ""
