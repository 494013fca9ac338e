"""Measuring drafts against reference reports: text scores, a CheXpert-style labeler, label F1.

Torch-free and light on purpose: the node imports it to score each draft against the signed
report as it arrives, and `cxr-node eval` uses it offline. The reference implementations
(pycocoevalcap, and its METEOR jar) are only needed for METEOR and for the tests that check this
package against them (the `eval` extra).
"""

from cxr_node.evaluation.labels import (
    COMMON,
    OBSERVATIONS,
    SIGNIFICANT,
    label,
    significant_misses,
)
from cxr_node.evaluation.scores import (
    Agreement,
    Score,
    agreement,
    clean,
    label_scores,
    report_scores,
    text_scores,
)

__all__ = [
    "COMMON", "OBSERVATIONS", "SIGNIFICANT", "Agreement", "Score", "agreement", "clean",
    "label", "label_scores", "report_scores", "significant_misses", "text_scores",
]
