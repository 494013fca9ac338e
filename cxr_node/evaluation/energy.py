"""Energy of drafting: joules from the GPU's own counter (NVML) or the CPU's (RAPL), and CO2.

Both are counters of the whole device, not of this process: other work on the same GPU or CPU
package in the meantime is counted too, and `Meter.method` says so. Where no counter can be read
the meter says why ("not measured: ..."), and a report's energy is None, never a guess.

* GPU: NVML's total energy counter (`nvmlDeviceGetTotalEnergyConsumption`, millijoules since the
  driver loaded; Volta and later) of the GPU the model runs on, through the optional `pynvml`
  module (the `eval` extra: nvidia-ml-py).
* CPU: Linux powercap RAPL zones (`/sys/class/powercap/intel-rapl:N`, also used for AMD CPUs):
  every package zone and its DRAM subzone, microjoules, each counter wrapping at its
  `max_energy_range_uj`. Since Linux 5.10 the counters are readable by root only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

POWERCAP = Path("/sys/class/powercap")
JOULES_PER_KWH = 3.6e6
_ZONE = re.compile(r"intel-rapl:\d+(?::\d+)?")
_COUNTER_BYTES = 32  # a decimal 64-bit counter and its newline


class Meter(Protocol):
    """A device energy counter: `mark()` before some work, `joules_since(mark)` after it."""

    method: str
    """How energy is measured, or "not measured: <why>"."""

    def mark(self) -> Any: ...

    def joules_since(self, mark: Any) -> float | None: ...


@dataclass(frozen=True)
class NotMeasured:
    """No counter: every reading is None, and `method` says why."""

    reason: str

    @property
    def method(self) -> str:
        return f"not measured: {self.reason}"

    def mark(self) -> None:
        return None

    def joules_since(self, mark: Any) -> None:
        return None


class NvmlMeter:
    """One GPU's NVML total-energy counter."""

    def __init__(self, nvml: Any, handle: Any, name: str):
        self._nvml, self._handle = nvml, handle
        self.method = (f"NVML total energy counter of the GPU ({name}), whole device: other "
                       "processes on it count too")

    def mark(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def joules_since(self, mark: int) -> float:
        return (self.mark() - mark) / 1000.0


@dataclass(frozen=True)
class RaplZone:
    name: str
    counter: Path
    max_range_uj: int


class RaplMeter:
    """The CPU packages' (and their DRAM's) RAPL counters, summed."""

    def __init__(self, zones: Sequence[RaplZone]):
        self.zones = tuple(zones)
        self.method = ("RAPL (Linux powercap) counters of " + ", ".join(z.name for z in zones)
                       + ", whole package: other processes on the CPU count too")

    def mark(self) -> tuple[int, ...]:
        return tuple(_read_counter(zone.counter) for zone in self.zones)

    def joules_since(self, mark: tuple[int, ...]) -> float:
        now = self.mark()
        return sum(counter_delta(before, after, zone.max_range_uj)
                   for zone, before, after in zip(self.zones, mark, now, strict=True)) / 1e6


def counter_delta(before: int, after: int, max_range: int) -> int:
    """What a counter that wraps to 0 past `max_range` advanced by, assuming at most one wrap
    (a RAPL package counter takes tens of minutes to wrap; one batch takes seconds)."""
    return after - before if after >= before else max_range - before + after


def meter_for(device: str, powercap: Path = POWERCAP) -> Meter:
    """The meter of the device a model runs on ("cuda:0", "cpu")."""
    if device.startswith("cuda"):
        return nvml_meter()
    return rapl_meter(powercap)


def nvml_meter() -> Meter:
    try:
        import pynvml
    except ImportError:
        return NotMeasured("pynvml is not installed (the 'eval' extra: pip install "
                           "'cxr-node[eval]' installs nvidia-ml-py)")
    try:
        pynvml.nvmlInit()
        handle = _nvml_handle(pynvml)
        meter = NvmlMeter(pynvml, handle, str(pynvml.nvmlDeviceGetName(handle)))
        meter.mark()  # NVMLError_NotSupported before Volta
    except pynvml.NVMLError as exc:
        return NotMeasured(f"NVML cannot give the GPU's energy counter ({exc})")
    return meter


def _nvml_handle(pynvml: Any) -> Any:
    """The GPU the model runs on (cuda:0, the first of CUDA_VISIBLE_DEVICES), by its UUID:
    NVML numbers GPUs regardless of CUDA_VISIBLE_DEVICES."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(0), "uuid", None)
    if uuid is not None:
        return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return pynvml.nvmlDeviceGetHandleByIndex(int(first) if first.isdigit() else 0)


def rapl_meter(powercap: Path = POWERCAP) -> Meter:
    """The package and DRAM zones under `powercap`, or NotMeasured with the reason."""
    try:
        names = sorted(p.name for p in powercap.iterdir() if _ZONE.fullmatch(p.name))
    except OSError:
        names = []
    zones = []
    for entry in names:
        folder = powercap / entry
        try:
            name = (folder / "name").read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            continue
        top = entry.count(":") == 1
        if not ((top and name.startswith("package")) or (not top and name == "dram")):
            continue  # psys spans the packages; core and uncore are inside them
        try:
            zone = RaplZone(f"{name} ({entry})", folder / "energy_uj",
                            _read_counter(folder / "max_energy_range_uj"))
            _read_counter(zone.counter)
        except PermissionError:
            return NotMeasured(f"{folder / 'energy_uj'} is readable by root only (Linux 5.10 "
                               "and later): run as root, or let this user read it")
        except (OSError, ValueError) as exc:
            return NotMeasured(f"{folder} cannot be read ({exc})")
        zones.append(zone)
    if not zones:
        return NotMeasured(f"no RAPL package zone under {powercap} (not a Linux machine with "
                           "the powercap driver and an Intel or AMD CPU, or a virtual machine)")
    return RaplMeter(zones)


def _read_counter(path: Path) -> int:
    with path.open("rb") as file:
        text = file.read(_COUNTER_BYTES).strip()
    if not text.isdigit():
        raise ValueError(f"{path.name} holds no counter value")
    return int(text)


def co2_grams(joules: float | None, grams_per_kwh: float | None) -> float | None:
    """CO2 of `joules` at a grid intensity in g/kWh; None when either is unknown."""
    if joules is None or grams_per_kwh is None:
        return None
    return joules / JOULES_PER_KWH * grams_per_kwh
