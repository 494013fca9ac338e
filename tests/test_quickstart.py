"""The README's quick start, run as written: its code blocks are read from README.md, so the README
cannot drift from what works.

The blocks run in a copy of what a clone holds for them (config/, examples/ and the virtualenv this
suite runs in, as .venv) inside a private network namespace, so the configuration keeps its ports
(11112, 9464) whatever else runs on the machine, and the node writes its state into the copy as it
would into a checkout. The serve command's leading `bash scripts/setup.sh &&` is not run again: it
is what set up this suite.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nodeproc import wait_for
from pacs import NetworkNamespace

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- quickstart:(\w+) -->\s*```sh\n(.*?)```", re.S)
# From starting serve to the draft shown: the promise for a new user's first try.
FIRST_DRAFT_SECONDS = 120


def quickstart() -> dict[str, list[str]]:
    """{block name: its command lines} of the README's quick start."""
    text = (REPO / "README.md").read_text()
    return {name: [line for line in body.splitlines() if line.strip()]
            for name, body in BLOCK.findall(text)}


def run(ns: NetworkNamespace, checkout: Path, line: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(ns.command(["bash", "-c", line]), cwd=checkout, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    return done


SETUP = "bash scripts/setup.sh && "


def serve_line() -> str:
    """The quick start's one command after the set-up it begins with (which set up this suite)."""
    [line] = quickstart()["serve"]
    assert line.startswith(SETUP), line
    return line.removeprefix(SETUP)


def test_the_readme_names_its_quick_start_blocks():
    blocks = quickstart()
    assert list(blocks) == ["serve", "send", "look"], blocks
    assert serve_line().startswith(".venv/bin/cxr-node serve ")


@pytest.mark.slow
def test_quick_start_drafts_the_example_study(tmp_path: Path):
    blocks = quickstart()
    checkout = tmp_path / "cxr-node"
    for part in ("config", "examples"):
        shutil.copytree(REPO / part, checkout / part)
    (checkout / ".venv").symlink_to(Path(sys.prefix))
    log_path = tmp_path / "serve.log"
    with NetworkNamespace() as ns:
        started = time.monotonic()
        with log_path.open("wb") as log:
            serve = subprocess.Popen(ns.command(["bash", "-c", serve_line()]), cwd=checkout,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def left() -> float:
                return FIRST_DRAFT_SECONDS - (time.monotonic() - started)

            assert wait_for(lambda: "node.ready" in log_path.read_text()
                            or serve.poll() is not None, left()), log_path.read_text()[-3000:]
            assert serve.poll() is None, log_path.read_text()[-3000:]
            [send] = blocks["send"]
            sent = run(ns, checkout, send)
            assert sent.stdout.splitlines() == [
                "examples/chest-xray/RG1_J2KI.dcm: stored (0x0000 Success; as stored, "
                "JPEG 2000 Image Compression)",
                "1 of 1 file(s) stored",
            ]
            # as a person would, the result is looked at once the draft is there
            assert wait_for(lambda: list((checkout / "var" / "sr-out").glob("*.dcm")),
                            max(left(), 0)), log_path.read_text()[-3000:]
            status, show = (run(ns, checkout, line).stdout for line in blocks["look"])
            assert time.monotonic() - started < FIRST_DRAFT_SECONDS
        finally:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(timeout=60)
    assert serve.returncode == 0, log_path.read_text()[-3000:]
    # the SR is in the folder a moment before the study's state says so
    assert re.match(r"studies: (reported|sent) 1\n", status), status
    assert "completion PARTIAL, verification UNVERIFIED, preliminary PRELIMINARY" in show
    assert "Series:          #9901 DEMO MODEL — AI PRELIMINARY DRAFT — NOT VERIFIED" in show
    assert "Study UID:       1.3.6.1.4.1.5962.1.2.9.20040826185059.5457" in show  # the example's
    assert 'contains CONTAINER "Findings"' in show
    assert "AI-generated preliminary draft — not reviewed by a radiologist" in show
