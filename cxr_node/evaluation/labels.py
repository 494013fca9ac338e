"""A rule-based CheXpert-style labeler: the 14 CheXpert observations of a report's text.

Each observation gets 1 (positive), 0 (negative), -1 (uncertain) or None (not mentioned), as the
CheXpert labeler (Irvin et al. 2019) and its NegBio rules do; the phrases and cues here are this
project's own, written after theirs, with regular expressions over sentences instead of a
dependency parse, so that the node can label every draft and signed report in milliseconds.

1. Mentions. The report is split into sentences, and each sentence into clauses at words that
   end the reach of a cue ("but", "however", "otherwise", "other than", ...). Each observation has
   phrases that name it ("effusion", "consolidat..."), phrases that contain those but name
   something else ("pericardial effusion", "calcified nodule"), and for the heart and the
   mediastinum "weak" phrases that name the organ, not a finding ("heart size", "mediastinal
   contours"): these count only with a qualifier near them (enlarged, normal, stable, ...).
2. Each mention is classified, in CheXpert's order: uncertain if a cue such as "cannot exclude"
   or "no new" reaches it; else negative if a negation cue reaches it ("no", "without", "free of"
   before it; "has resolved", "is not seen" after it; for weak phrases also "normal",
   "within normal limits", "not enlarged"); else uncertain if an uncertainty cue reaches it
   ("may", "possible", "suspicious for", "versus", ...; "is suspected" after it; "stable" or
   "borderline" for a weak phrase); else positive. Cues before a mention reach it within its
   clause (some only a few words), cues after it only a few words.
3. Aggregation as CheXpert's: any positive mention makes the observation positive, else any
   uncertain one uncertain, else negative; a positive or uncertain "heart failure"/"CHF" adds an
   uncertain Cardiomegaly. "No Finding" is 1 when no observation other than Support Devices, and
   none of a list of other abnormalities (emphysema, scoliosis, granuloma, ...), is positive or
   uncertain, else None (CheXpert never sets it to 0). A text without a word has no labels.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

OBSERVATIONS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)
COMMON: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                           "Pleural Effusion")
SIGNIFICANT: tuple[str, ...] = ("Pneumothorax", "Pleural Effusion", "Consolidation", "Edema",
                                "Cardiomegaly")

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
Labels = dict[str, int | None]

OTHER_FINDINGS = "other findings"  # not an observation: it only decides "No Finding"


def _words(*phrases: str) -> re.Pattern[str]:
    """One pattern for the phrases (regular expressions), each matched as whole words."""
    return re.compile(r"\b(?:" + "|".join(phrases) + r")\b")


@dataclass(frozen=True)
class _Phrases:
    """How an observation is named in a report."""

    name: str
    mentions: re.Pattern[str]
    unmentions: re.Pattern[str] | None = None  # contain a mention but name something else
    weak: re.Pattern[str] | None = None  # name the organ: count only with a qualifier
    uncertain: re.Pattern[str] | None = None  # mentions that are uncertain in themselves


_SIDE = r"(?:(?:right|left|bilateral|small|large|moderate|mild|minimal|trace|tiny)\s+)*"
_DEVICES = _words(
    r"pace ?makers?", r"pacers?", r"a?icds?", r"defibrillators?", r"(?:pacer|pacemaker|icd) "
    r"(?:leads?|wires?|generators?)", r"catheters?", r"piccs?", r"pic lines?",
    r"(?:central|venous|ij|jugular|subclavian|arterial|swan[- ]ganz|dialysis|picc) (?:venous )?"
    r"(?:lines?|catheters?|ports?)", r"lines and tubes", r"tubes and lines",
    r"port[- ]?a[- ]?caths?", r"portacaths?", r"mediports?",
    r"(?:chest wall|power|infusion|venous|right|left) ports?",
    r"(?:endotracheal|et|nasogastric|ng|og|orogastric|feeding|chest|tracheostomy|enteric|"
    r"gastric|dobhoff|drainage|thoracostomy|gastrostomy) tubes?", r"tracheostomy", r"drains?",
    r"stents?", r"(?:surgical|vascular|metallic|cholecystectomy|hemostatic|clip) clips?",
    r"clips", r"(?:sternotomy|sternal|cerclage|surgical) (?:wires?|sutures?)", r"wires",
    r"hardware", r"(?:spinal )?fusion (?:hardware|rods?)", r"rods?", r"screws?", r"plates?",
    r"prosthe\w*", r"arthroplast\w*", r"(?:valve|aortic valve|mitral valve) replacements?",
    r"(?:prosthetic|mechanical|replaced) (?:aortic |mitral )?valves?", r"coils?",
    r"electrodes?", r"leads", r"devices?", r"implants?", r"implanted", r"generators?",
    r"filters?", r"(?:balloon )?pumps?", r"sutures?", r"suture material", r"staples?",
    r"cement", r"kyphoplasty", r"vertebroplasty", r"anchors?", r"loop recorders?",
    r"stimulators?", r"occluders?", r"tips?", r"surgical xxxx",
)
_PHRASES = (
    _Phrases(
        "Enlarged Cardiomediastinum",
        mentions=_words(r"(?:widen\w*|enlarg\w*) (?:of )?(?:the )?(?:superior )?mediastin\w*",
                        r"(?:cardio)?mediastinal (?:widening|enlargement)",
                        r"wide(?:ned)? (?:superior )?mediastinum"),
        weak=_words(r"cardiomediastin\w*(?: (?:silhouette|contours?|shadow|width|structures?))?",
                    r"mediastinum", r"mediastinal (?:silhouette|contours?|shadow|width|"
                    r"configuration|structures|borders?)"),
    ),
    _Phrases(
        "Cardiomegaly",
        mentions=_words(r"cardiomegaly", r"cardiac enlargement", r"enlarged heart",
                        r"enlargement of the heart"),
        unmentions=_words(r"(?:over(?:lying|lie|lies)?|behind|through|projecting over) the "
                          r"(?:heart|cardiac \w+)", r"heart (?:failure|valves?|disease)"),
        weak=_words(r"heart(?: size)?", r"cardiac (?:silhouette|size|shadow|contours?|diameter|"
                    r"borders?)"),
    ),
    _Phrases(
        "Lung Lesion",
        mentions=_words(r"nodul\w*", r"mass(?:es)?", r"tumou?rs?", r"neoplasms?", r"carcinoma",
                        r"malignan\w*", r"cavitary lesions?", r"(?:lung|pulmonary) lesions?"),
        unmentions=_words(r"calcified (?:\w+ )?nodul\w*", r"nodular calcifications?"),
    ),
    _Phrases(
        "Lung Opacity",
        mentions=_words(r"opaci\w*", r"infiltrat\w*", r"air ?-?space (?:disease|opacit\w*|"
                        r"process|filling)", r"increased densit\w*",
                        r"(?:interstitial|reticular|reticulonodular) (?:markings?|pattern|"
                        r"opacit\w*|prominence|changes?|thickening|disease)", r"reticulation",
                        r"peribronchial (?:thickening|cuffing)", r"bronchial wall thickening"),
    ),
    _Phrases(
        "Edema",
        mentions=_words(r"o?edema", r"congestive heart failure", r"heart failure", r"chf",
                        r"fluid overload"),
        unmentions=_words(r"(?:soft tissue|subcutaneous|extremity|scrotal) o?edema"),
        uncertain=_words(r"(?:pulmonary |vascular |venous )+congestion"),
    ),
    _Phrases("Consolidation", mentions=_words(r"consolidat\w*")),
    _Phrases(
        "Pneumonia",
        mentions=_words(r"pneumoni\w*", r"bronchopneumoni\w*", r"infect\w*"),
        unmentions=_words(r"(?:old |prior |previous |remote |healed )?granulomatous infection",
                          r"(?:old|prior|previous|remote|healed) infect\w*"),
    ),
    _Phrases(
        "Atelectasis",
        mentions=_words(r"atelecta\w*", r"collapsed?"),
        unmentions=_words(r"(?:vertebral|vertebra|body|bodies|compression) collapse",
                          r"collapse of (?:the )?(?:\w+ )?(?:vertebra\w*|bod(?:y|ies))"),
    ),
    _Phrases("Pneumothorax", mentions=_words(r"(?:hydro|hemo|haemo)?pneumothora(?:x|ces)")),
    _Phrases(
        "Pleural Effusion",
        mentions=_words(r"effusions?", r"pleural fluid", r"hydrothorax",
                        r"(?:hydro|hemo|haemo)pneumothora(?:x|ces)"),
        unmentions=_words(r"pericardial " + _SIDE + r"effusions?", r"joint effusions?"),
    ),
    _Phrases(
        "Pleural Other",
        mentions=_words(r"pleural (?:thickening|plaques?|calcifications?|scar\w*|reaction)",
                        r"thickening of the pleura", r"pleuro-?parenchymal (?:scar\w*|thickening|"
                        r"changes?)", r"pleural-parenchymal \w+", r"fibrothorax",
                        r"apical (?:pleural )?(?:capping|caps?|thickening)"),
    ),
    _Phrases("Fracture", mentions=_words(r"fractur\w*")),
    _Phrases("Support Devices", mentions=_DEVICES),
    # Abnormalities outside the 14: they only keep "No Finding" from being 1.
    _Phrases(
        OTHER_FINDINGS,
        mentions=_words(
            r"emphysema\w*", r"copd", r"chronic obstructive", r"hyperinflat\w*",
            r"hyperexpan\w*", r"hyperaerat\w*", r"overinflat\w*", r"low (?:lung )?volumes?",
            r"hypoinflat\w*", r"hypoventilat\w*", r"granulomas?", r"granulomatous",
            r"calcifi\w*", r"scoliosis", r"kyphosis", r"kyphotic", r"degenerat\w*",
            r"spondyl\w*", r"osteophyt\w*", r"arthriti\w*", r"arthropath\w*", r"osteopeni\w*",
            r"osteoporo\w*", r"hernias?", r"eventration", r"elevat\w* (?:of the )?(?:right |left )?"
            r"(?:hemi)?diaphragm\w*", r"(?:hemi)?diaphragm\w* (?:is |are )?elevat\w*",
            r"tortuous\w*", r"tortuosity", r"ectatic", r"ectasia", r"unfold\w*",
            r"atheroscl\w*", r"aneurysm\w*", r"blunt\w*", r"scar\w*", r"cicatri\w*",
            r"fibros\w*", r"fibrotic", r"thickening", r"bronchiectasis", r"cysts?", r"cystic",
            r"bullae?", r"bullous", r"blebs?", r"cavit\w*", r"lucenc\w*", r"deformit\w*",
            r"pectus", r"mastectomy", r"pneumoperitoneum", r"free air", r"pneumomediastinum",
            r"sarcoid\w*", r"tuberculosis", r"adenopathy", r"lymphadenopathy",
            r"hilar (?:prominence|enlargement|fullness)", r"(?:enlarged|prominent) hil\w*",
            r"azygos lobe", r"prominen\w*", r"cephalization", r"hypertension",
            r"(?:enlarged|prominent|dilated) pulmonary arter\w*", r"aspiration",
            r"bronchitis", r"bronchiolitis", r"airways? disease", r"lobectomy",
            r"pneumonectomy", r"foreign bod\w*", r"metasta\w*",
            r"lesions?", r"volume loss", r"shift", r"hyperlucen\w*", r"chronic",
            r"densit(?:y|ies)", r"markings", r"abnormalit\w*",
        ),
        unmentions=_words(r"no acute (?:cardiopulmonary |pulmonary |osseous |bony )?"
                          r"abnormalit\w*"),
    ),
)

# -- cues ---------------------------------------------------------------------------------------

# A cue and how far it reaches: the most words between it and the mention (None: the clause).
_Cue = tuple[re.Pattern[str], int | None]

_PRE_NEGATION_UNCERTAINTY: tuple[_Cue, ...] = (
    (_words(r"(?:can ?not|could not|can't|difficult to|unable to) (?:be )?(?:entirely |"
            r"completely |definitely )?(?:exclude|rule out)"), None),
    (_words(r"no (?:\w+ )?new", r"(?:to )?rule out", r"r/o"), None),
)
_POST_NEGATION_UNCERTAINTY: tuple[_Cue, ...] = (
    (_words(r"(?:can ?not|could not|can't) (?:be )?(?:entirely |completely |definitely )?"
            r"(?:excluded|ruled out)", r"(?:is|are)? ?not (?:entirely |completely )?"
            r"(?:excluded|ruled out)", r"not (?:well|clearly)[- ](?:seen|visualized|evaluated)",
            r"poorly (?:seen|visualized|evaluated)", r"incompletely (?:seen|evaluated)"), 6),
)
_PRE_NEGATION: tuple[_Cue, ...] = (
    (_words(r"no(?! (?:significant |appreciable |definite |interval |substantial )?"
            r"(?:change|increase|decrease|difference)\b)", r"without", r"negative for",
            r"free of", r"clear of", r"absen(?:ce|t) of", r"lack of", r"resolution of",
            r"removal of", r"rather than", r"instead of", r"neither", r"nor",
            r"(?:does|do|did) not (?:show|demonstrate|reveal|identify|see)"), None),
    (_words(r"resolved", r"resolving", r"cleared", r"removed", r"interval removal"), 3),
)
_POST_NEGATION: tuple[_Cue, ...] = (
    (_words(r"(?:is|are|was|were|has been|have been)? ?(?:not|no longer) (?:seen|identified|"
            r"visualized|visible|present|appreciated|evident|demonstrated|detected|noted|"
            r"apparent)", r"(?:has|have)? ?(?:resolved|cleared)", r"(?:is|are|has been|have "
            r"been)? ?removed", r"(?:is|are)? ?(?:absent|excluded)"), 6),
)
_PRE_UNCERTAINTY: tuple[_Cue, ...] = (
    (_words(r"may", r"might", r"could", r"possibl[ey]", r"probabl[ey]", r"presum\w*",
            r"perhaps", r"maybe", r"questionabl[ey]", r"question(?:ed)? of", r"suspect\w*",
            r"suspicio\w*", r"concern\w*", r"worrisome", r"worry", r"suggest\w*",
            r"consider(?:ed)?", r"differential", r"versus", r"vs", r"equivocal", r"indeterminate",
            r"uncertain", r"unclear", r"cannot be characterized", r"less likely", r"unlikely",
            r"and/or", r"correlat\w*", r"atypical", r"early"), None),
    (_words(r"borderline"), 3),
)
_POST_UNCERTAINTY: tuple[_Cue, ...] = (
    (_words(r"(?:is|are)? ?(?:possible|possibly|suspected|questioned|likely|unlikely|"
            r"questionable|uncertain|not certain|favored|considered)", r"versus", r"vs",
            r"and/or", r"(?:may|might|could) (?:be|represent|reflect|indicate)",
            r"borderline"), 4),
)
# Qualifiers of the weak (organ) phrases: the organ is abnormal, normal, or the same as before.
_WEAK_ABNORMAL = _words(r"enlarg\w*", r"widen\w*", r"wide", r"large", r"increased", r"prominen\w*",
                        r"cardiomegaly", r"hypertroph\w*", r"dilat\w*")
_WEAK_NORMAL = _words(r"normal\w*", r"unremarkable", r"not (?:significantly )?(?:enlarged|"
                      r"widened|increased)", r"upper limits? of normal", r"top[- ]normal",
                      r"upper normal", r"high normal",
                      r"no (?:significant )?(?:enlargement|widening|cardiomegaly)")
_WEAK_STABLE = _words(r"stable", r"unchanged", r"similar", r"no (?:significant |interval )?"
                      r"change", r"not (?:significantly )?changed", r"borderline")
_WEAK_BEFORE, _WEAK_AFTER = 3, 8  # words between a qualifier and the organ it qualifies
_QUALIFIER_BLOCKED = _words(r"with", r"without", r"and (?:a|an|the|there)", r"which")

# Where a cue's reach ends: sentences, and in them these words and marks.
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n\s*\n|(?<=[a-z)])\.(?=[A-Z])")
_CLAUSE_END = re.compile(
    r";|:|\b(?:but|however|although|though|except|whereas|yet|otherwise|apart from|aside from|"
    r"other than|nevertheless)\b")
_WORD = re.compile(r"\w+")
MAX_CLAUSE_CHARS = 1000  # a report's longest sentences have about 300 characters


def label(text: str) -> Labels:
    """The 14 observations of a report: 1 positive, 0 negative, -1 uncertain, None not mentioned."""
    labels: Labels = dict.fromkeys(OBSERVATIONS)
    if not _WORD.search(text):
        return labels
    found: dict[str, list[int]] = {}
    for clause in _clauses(text):
        for phrases in _PHRASES:
            for value in _classify_mentions(clause, phrases):
                found.setdefault(phrases.name, []).append(value)
    for name, values in found.items():
        if name in labels:
            labels[name] = _aggregate(values)
    if labels["Cardiomegaly"] != POSITIVE and _mentions_heart_failure(text):
        labels["Cardiomegaly"] = UNCERTAIN
    findings = [v for name, v in labels.items() if name not in ("No Finding", "Support Devices")]
    findings.append(_aggregate(found.get(OTHER_FINDINGS, [])))
    if not any(v in (POSITIVE, UNCERTAIN) for v in findings):
        labels["No Finding"] = POSITIVE
    return labels


def significant_misses(reference: Labels, draft: Labels) -> list[str]:
    """Observations of SIGNIFICANT positive in the reference where the draft is negative or
    silent (an uncertain draft does not count as a miss)."""
    return [name for name in SIGNIFICANT
            if reference.get(name) == POSITIVE and draft.get(name) in (NEGATIVE, None)]


def _aggregate(values: list[int]) -> int | None:
    """CheXpert's: positive over uncertain over negative."""
    for value in (POSITIVE, UNCERTAIN, NEGATIVE):
        if value in values:
            return value
    return None


_HEART_FAILURE = _Phrases("Edema", mentions=_words(r"heart failure", r"chf"))


def _mentions_heart_failure(text: str) -> bool:
    return any(v != NEGATIVE for clause in _clauses(text)
               for v in _classify_mentions(clause, _HEART_FAILURE))


def _clauses(text: str) -> Iterator[str]:
    """The clauses of a text, each at most MAX_CLAUSE_CHARS long (cut at a space): each mention
    looks for cues in its clause only, so that labeling time grows with the text, not with its
    square, however long a sentence a hostile text has."""
    for sentence in _SENTENCE.split(text):
        for clause in _CLAUSE_END.split(sentence.lower()):
            while len(clause) > MAX_CLAUSE_CHARS:
                cut = clause.rfind(" ", 0, MAX_CLAUSE_CHARS)
                cut = cut if cut > 0 else MAX_CLAUSE_CHARS
                yield clause[:cut]
                clause = clause[cut:]
            if clause.strip():
                yield clause


def _classify_mentions(clause: str, phrases: _Phrases) -> Iterator[int]:
    blocked = [m.span() for m in phrases.unmentions.finditer(clause)] if phrases.unmentions else []
    taken: list[tuple[int, int]] = []
    for kind, pattern in (("uncertain", phrases.uncertain), ("strong", phrases.mentions),
                          ("weak", phrases.weak)):
        if pattern is None:
            continue
        for match in pattern.finditer(clause):
            span = match.span()
            if _overlaps(span, blocked) or _overlaps(span, taken):
                continue
            taken.append(span)
            value = _classify(clause, span, weak=kind == "weak")
            if value is None:
                continue
            yield UNCERTAIN if kind == "uncertain" and value == POSITIVE else value


def _overlaps(span: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    return any(span[0] < end and start < span[1] for start, end in spans)


def _classify(clause: str, span: tuple[int, int], weak: bool) -> int | None:
    """CheXpert's order: uncertainty that looks like negation, negation, uncertainty, positive.
    A weak (organ) mention without a qualifier is no mention (None)."""
    if _reaches(clause, span, _PRE_NEGATION_UNCERTAINTY, _POST_NEGATION_UNCERTAINTY):
        return UNCERTAIN
    if weak:
        qualifiers = _weak_qualifiers(clause, span)
        if _WEAK_NORMAL in qualifiers:
            return NEGATIVE
        if _WEAK_ABNORMAL not in qualifiers:
            return UNCERTAIN if _WEAK_STABLE in qualifiers else None
    if _reaches(clause, span, _PRE_NEGATION, _POST_NEGATION):
        return NEGATIVE
    if _reaches(clause, span, _PRE_UNCERTAINTY, _POST_UNCERTAINTY):
        return UNCERTAIN
    return POSITIVE


def _reaches(clause: str, span: tuple[int, int], before: tuple[_Cue, ...],
             after: tuple[_Cue, ...]) -> bool:
    start, end = span
    for pattern, reach in before:
        for cue in pattern.finditer(clause, 0, start):
            if reach is None or _distance(clause, cue.end(), start) <= reach:
                return True
    for pattern, reach in after:
        for cue in pattern.finditer(clause, end):
            if reach is None or _distance(clause, end, cue.start()) <= reach:
                return True
            break  # the nearest is the one that could reach
    return False


def _distance(clause: str, start: int, end: int) -> int:
    return len(_WORD.findall(clause, start, end))


def _weak_qualifiers(clause: str, span: tuple[int, int]) -> set[re.Pattern[str]]:
    """Which qualifier kinds stand near an organ phrase: up to _WEAK_BEFORE words before it, or
    up to _WEAK_AFTER words after it with no "with"/"which"/"and a" between."""
    start, end = span
    found = set()
    for kind in (_WEAK_NORMAL, _WEAK_ABNORMAL, _WEAK_STABLE):
        for match in kind.finditer(clause, 0, start):
            if _distance(clause, match.end(), start) <= _WEAK_BEFORE:
                found.add(kind)
        for match in kind.finditer(clause, end):
            gap = clause[end:match.start()]
            if _distance(clause, end, match.start()) <= _WEAK_AFTER \
                    and not _QUALIFIER_BLOCKED.search(gap):
                found.add(kind)
            break
    return found
