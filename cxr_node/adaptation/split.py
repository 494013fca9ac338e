"""The held-out studies of a training run, chosen by patient.

A patient's studies look alike (same anatomy, same devices, often the same words): with one study
in training and another held out, the held-out score measures memory, not reporting. So whole
patients are held out, chosen by a hash of their id and the run's seed: the same data and seed
give the same split on any machine, and adding studies does not move the patients already placed.
A study without a patient id counts as its own patient.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cxr_node.evaluation.datasets import Study


class SplitError(ValueError):
    """Too few patients to hold any out."""


@dataclass(frozen=True)
class Split:
    train: tuple[Study, ...]
    heldout: tuple[Study, ...]

    @staticmethod
    def patients(studies: Sequence[Study]) -> set[str]:
        return {patient_of(s) for s in studies}


def patient_of(study: Study) -> str:
    return study.patient_id or f"study:{study.id}"


def split_by_patient(studies: Sequence[Study], fraction: float, seed: int) -> Split:
    """At least one patient held out and one trained on; `fraction` of the patients held out."""
    if not 0 < fraction < 1:
        raise SplitError(f"the held-out fraction must be between 0 and 1, got {fraction}")
    patients = sorted({patient_of(s) for s in studies},
                      key=lambda p: hashlib.sha256(f"{seed}\0{p}".encode()).hexdigest())
    if len(patients) < 2:
        raise SplitError(f"{len(patients)} patient(s) in the data: at least 2 are needed, one to "
                         "train on and one to hold out")
    count = min(len(patients) - 1, max(1, round(fraction * len(patients))))
    held = set(patients[:count])
    return Split(tuple(s for s in studies if patient_of(s) not in held),
                 tuple(s for s in studies if patient_of(s) in held))
