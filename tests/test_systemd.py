"""The systemd units: systemd-analyze accepts them, their hardening holds, and they agree with
config/production.yaml. The node itself is run under the units' MemoryDenyWriteExecute.

systemd is not PID 1 here: ``systemd-analyze verify`` and ``security --offline`` read unit files
on their own. The ExecStart binary must exist for ``verify``, so the units are checked as copies
whose ExecStart names this virtualenv's ``cxr-node``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from nodeproc import NodeProcess, storescu, wait_for, write_config

from cxr_node.config import DEFAULT_CONFIG_PATH, load_config

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "systemd"
INSTALLED_BINARY = "/opt/cxr-node/.venv/bin/cxr-node"  # systemd/README.md
CXR_NODE = Path(sys.executable).with_name("cxr-node")
# unit file -> the name systemd-analyze is given (a template is checked as one instance)
CHECKED = {"cxr-node.service": "cxr-node.service",
           "cxr-node-worker@.service": "cxr-node-worker@0.service",
           "cxr-node.target": "cxr-node.target"}
MAX_EXPOSURE = 2.0
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1

systemd_analyze = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(systemd_analyze is None,
                                           reason="systemd-analyze is not installed")


def unit(name: str) -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (a key may repeat, as LoadCredential= does)."""
    keys: dict[str, list[str]] = defaultdict(list)
    section = ""
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        keys[f"{section}.{key}"].append(value)
    return keys


def runnable_copies(directory: Path, edit: str = "") -> list[Path]:
    """The units with ExecStart on this machine's cxr-node; ``edit`` is added to each [Service]."""
    for name in CHECKED:
        text = (UNITS / name).read_text().replace(INSTALLED_BINARY, str(CXR_NODE))
        if edit:
            text = text.replace("[Service]\n", f"[Service]\n{edit}\n")
        (directory / name).write_text(text)
    return [directory / checked for checked in CHECKED.values()]


def verify_complaints(paths: list[Path]) -> list[str]:
    """What ``systemd-analyze verify`` says about our units (other units' noise is left out)."""
    done = subprocess.run([systemd_analyze, "verify", "--man=no", "--generators=no",
                           *map(str, paths)],
                          capture_output=True, text=True, timeout=60, cwd=paths[0].parent)
    ours = ("cxr-node",)
    lines = [line for line in (done.stdout + done.stderr).splitlines()
             if any(name in line for name in ours)]
    if done.returncode != 0 and not lines:
        lines = [f"exit {done.returncode}: {done.stderr.strip()}"]
    return lines


@needs_systemd_analyze
def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path: Path):
    assert CXR_NODE.is_file(), CXR_NODE
    assert verify_complaints(runnable_copies(tmp_path)) == []


@needs_systemd_analyze
def test_verify_would_catch_a_broken_unit(tmp_path: Path):
    """The check above can fail: a misspelt key and a bad value are reported for each unit."""
    complaints = verify_complaints(runnable_copies(tmp_path, "KillMod=mixed\nRestart=sometimes"))
    assert sum("Unknown key" in c and "KillMod" in c for c in complaints) == 2, complaints
    assert sum("restart specifier" in c and "sometimes" in c for c in complaints) == 2, complaints


@needs_systemd_analyze
@pytest.mark.parametrize("name", ["cxr-node.service", "cxr-node-worker@.service"])
def test_security_exposure_is_low(name: str, tmp_path: Path):
    runnable_copies(tmp_path)
    done = subprocess.run([systemd_analyze, "security", "--offline=yes", "--man=no",
                           str(tmp_path / CHECKED[name])],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert match, done.stdout[-2000:] + done.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, done.stdout


def test_units_match_the_production_configuration():
    node, worker = unit("cxr-node.service"), unit("cxr-node-worker@.service")
    production = load_config(REPO / "config" / "production.yaml")
    config_arg = f"--config {DEFAULT_CONFIG_PATH}"
    assert node["Service.ExecStart"] == [f"{INSTALLED_BINARY} serve {config_arg}"]
    assert worker["Service.ExecStart"][0].startswith(f"{INSTALLED_BINARY} worker {config_arg} ")
    assert node["Service.User"] == ["cxr-node"] and worker["Service.User"] == ["cxr-worker"]
    assert node["Service.StateDirectory"] == [production.state_dir.name]
    assert Path("/var/lib", node["Service.StateDirectory"][0]) == production.state_dir
    # a worker runs as another user, cannot reach the node's state, and has its own Redis login
    assert worker["Service.StateDirectory"] == ["cxr-worker"]
    assert worker["Service.InaccessiblePaths"] == [f"-{production.state_dir}"]
    assert node["Service.LoadCredential"][0] == (
        "broker-password:/etc/cxr-node/credentials/broker-password")
    assert worker["Service.LoadCredential"] == [
        "worker-broker-password:/etc/cxr-node/credentials/worker-broker-password"]
    assert production.queue.username and production.queue.worker_username
    # the model is outside both state directories, readable by both users
    assert production.model.path is not None
    assert production.state_dir not in production.model.path.parents
    assert worker["Service.IPAddressDeny"] == ["any"] and worker["Service.IPAddressAllow"]
    for u in (node, worker):
        assert "Service.DynamicUser" not in u
        assert u["Service.StateDirectoryMode"] == ["0700"]
        assert u["Service.MemoryMax"] and u["Service.TasksMax"]
        assert u["Service.KillMode"] == ["mixed"] and u["Service.KillSignal"] == ["SIGTERM"]
        assert u["Service.Restart"] == ["on-failure"]
        assert "redis-server.service" in " ".join(u["Unit.After"] + u["Unit.Wants"])
        assert u["Service.CapabilityBoundingSet"] == [""]
    # the node's TLS key arrives as the credential production.yaml names, from its private_key
    tls = production.node.tls
    assert f"{tls.private_key_credential}:{tls.private_key}" in node["Service.LoadCredential"]
    # the stop grace: associations in flight get network_timeout, then the receivers' join slack
    assert int(node["Service.TimeoutStopSec"][0]) >= production.node.network_timeout_seconds + 30
    assert "cxr-node.service" not in " ".join(node.get("Unit.Requires", []) + node.get("Unit.After", []))


def test_worker_unit_runs_one_worker_per_gpu_offline():
    worker, node = unit("cxr-node-worker@.service"), unit("cxr-node.service")
    env = " ".join(worker["Service.Environment"])
    assert "CUDA_VISIBLE_DEVICES=%i" in env and "HF_HUB_OFFLINE=1" in env
    assert "--hostname cxr-draft-gpu%i@%H" in worker["Service.ExecStart"][0]
    # GPU device nodes and JIT code: no PrivateDevices, no MemoryDenyWriteExecute for the worker
    assert "Service.PrivateDevices" not in worker and "Service.MemoryDenyWriteExecute" not in worker
    assert "char-nvidia-frontend rw" in worker["Service.DeviceAllow"]
    assert node["Service.PrivateDevices"] == ["yes"]
    assert node["Service.MemoryDenyWriteExecute"] == ["yes"]


def test_sysusers_and_tmpfiles_declare_the_user_and_private_folders():
    sysusers = (UNITS / "cxr-node.sysusers").read_text()
    assert re.search(r"^u cxr-node - .* /var/lib/cxr-node /usr/sbin/nologin$", sysusers, re.M)
    assert re.search(r"^u cxr-worker - .* /var/lib/cxr-worker /usr/sbin/nologin$", sysusers, re.M)
    tmpfiles = (UNITS / "cxr-node.tmpfiles").read_text()
    assert re.search(r"^d /etc/cxr-node/credentials\s+0700 root root", tmpfiles, re.M)
    assert re.search(r"^d /etc/cxr-node/tls\s+0750 root cxr-node", tmpfiles, re.M)


def _mdwe_available() -> bool:
    """PR_SET_MDWE (Linux 6.3+), tried in a child so this test process keeps its W+X rights."""
    probe = (f"import ctypes,sys; sys.exit(ctypes.CDLL(None).prctl({PR_SET_MDWE}, "
             f"{PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0)")
    return subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 0


@pytest.mark.skipif(not _mdwe_available(), reason="kernel without PR_SET_MDWE (Linux < 6.3)")
def test_node_runs_under_memory_deny_write_execute(tmp_path: Path, cxr_dir: Path):
    """MemoryDenyWriteExecute=yes in cxr-node.service must not break the node.

    The kernel's per-process form of the same rule (PR_SET_MDWE, inherited by every receiver)
    is set before the node starts; it then receives, assembles and queues a real chest X-ray.
    """
    site = tmp_path / "mdwe"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import ctypes, sys\n"
        f"if ctypes.CDLL(None).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:\n"
        "    sys.exit('PR_SET_MDWE failed')\n")
    env = {"PYTHONPATH": str(site)}
    wx = ("import mmap; mmap.mmap(-1, 4096, "
          "prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)")
    refused = subprocess.run([sys.executable, "-c", wx], env={**os.environ, **env},
                             capture_output=True, text=True, timeout=30)
    assert "Permission denied" in refused.stderr  # the rule is really in force for the node
    config = write_config(tmp_path, study={"settle_seconds": 1})
    with NodeProcess(config, env=env) as node:
        assert set(storescu(node.port, [cxr_dir / "CR-MONO1-10-chest.dcm"]).values()) == {"Success"}
        assert wait_for(lambda: node.events("draft.submitted"), 30), node.log()[-3000:]
    assert node.proc is not None and node.proc.returncode == 0, node.log()[-3000:]
    assert "Traceback" not in node.log()
