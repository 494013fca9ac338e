"""The settings of an adapter's training (no torch here: the command line shows the defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TrainSettings:
    """Everything that changes the adapter: a resumed run must keep each of them."""

    quantization: Literal["nf4", "int8", "none"] = "nf4"
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    learning_rate: float = 2e-4
    epochs: int = 3
    accumulate: int = 8
    warmup_steps: int = 10
    projector_steps: int = 0
    projector_learning_rate: float = 1e-4
    heldout_fraction: float = 0.1
    seed: int = 0
    max_target_tokens: int = 512
