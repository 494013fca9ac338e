"""The status page in a real browser (headless Chromium) against the real node.

Set CXR_NODE_SCREENSHOT=docs/status-page.png to keep the screenshot the test takes (the copy in
docs/ is made this way); otherwise it goes to the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pydicom
import pytest
from dicomgen import write_study
from nodeproc import NodeProcess, free_port, storescu, wait_for, write_config
from PIL import Image

from cxr_node.audit import study_history
from cxr_node.logs import study_key
from workers.demo import build_demo_model

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# Names that are markup if a page pastes them in as HTML; both valid in the configuration.
HOSTILE_DESTINATION = "archive <R&D>"
HOSTILE_AE = "R&D<PACS>"  # reasons quote the AE title


class Tables(HTMLParser):
    """The text of every cell of every table, by table id; and every element seen."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self._table = dict(attrs).get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag == "td" and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def chromium(tmp_path: Path, url: str, *args: str) -> str:
    profile = tmp_path / "chromium-profile"
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=8000",
         *args, url],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("models") / "demo")


def node_config(tmp_path: Path, demo_model: Path, destinations: list[dict], **sections: object) -> Path:
    return write_config(
        tmp_path, http={"enabled": True, "port": free_port()}, queue={"local_worker": True},
        model={"path": str(demo_model), "device": "cpu", "quantization": "none",
               "image_size": 256, "generation": {"max_new_tokens": 16}},
        destinations=destinations, **sections)


def test_status_page_shows_sent_studies_and_a_dead_letter(tmp_path: Path, cxr_dir: Path,
                                                          demo_model: Path):
    source = tmp_path / "send"
    source.mkdir()
    chests = [write_study(source, ["PA", "LL"], seed=i, rows=256, columns=256) for i in range(2)]
    folder = {"name": "folder", "folder": str(tmp_path / "sr-out")}

    # first run: two chest studies drafted and sent, a leg study skipped by the routing rules
    with NodeProcess(node_config(tmp_path, demo_model, [folder])) as node:
        for files in chests:
            assert set(storescu(node.port, files).values()) == {"Success"}
        assert set(storescu(node.port, [cxr_dir / "RG3_MONO2_JPLL.dcm"]).values()) == {"Success"}
        assert wait_for(lambda: sorted(node.states()) == ["sent", "sent", "skipped"], 120), \
            node.log()[-3000:]

    # second run, same state: a PACS that refuses connections, given up after one attempt
    pacs = {"name": HOSTILE_DESTINATION, "ae_title": HOSTILE_AE, "host": "127.0.0.1",
            "port": free_port(), "timeout_seconds": 2}
    config = node_config(tmp_path, demo_model, [folder, pacs], dispatch={"max_attempts": 1})
    late = write_study(source, ["PA", "LL"], seed=7, rows=256, columns=256)
    with NodeProcess(config) as node:
        url = f"http://127.0.0.1:{node.config['http']['port']}/"
        assert set(storescu(node.port, late).values()) == {"Success"}
        assert wait_for(lambda: node.db("SELECT 1 FROM outbox WHERE state = 'dead'")
                        and "failed" in node.states(), 120), node.log()[-3000:]
        assert wait_for(lambda: _api(url)["health"]["ok"], 30), _api(url)["health"]

        dom = chromium(tmp_path, url, "--dump-dom")
        page = Tables()
        page.feed(dom)
        studies = {row[0]: row for row in page.tables["studies"][1:]}
        for files in chests:
            key = study_key(pydicom.dcmread(files[0]).StudyInstanceUID)
            state, revision, images = studies[key][1:4]
            assert (state, revision, images) == ("sent", "1", "2")
            assert studies[key][8].endswith("s")  # total time, received -> sent
        late_key = study_key(pydicom.dcmread(late[0]).StudyInstanceUID)
        assert studies[late_key][1] == "failed"
        assert HOSTILE_AE in studies[late_key][9]
        [dead] = page.tables["outbox"][1:]
        assert dead[1:4] == [late_key, HOSTILE_DESTINATION, "dead letter"]
        assert "gave up after 1 attempts" in dead[7] and HOSTILE_AE in dead[7]
        # shown as text, never parsed as markup
        assert not any(tag in ("pacs", "r&d") for tag, _ in page.tags)
        assert HOSTILE_AE not in dom and "R&amp;D&lt;PACS&gt;" in dom
        assert re.search(r'id="health"[^>]*>Healthy<', dom)
        assert "<dt>Dead letters</dt><dd>1</dd>" in dom
        assert "SYNTHETIC" not in dom and "TEST-0001" not in dom  # no patient name or ID

        shot = Path(os.environ.get("CXR_NODE_SCREENSHOT") or tmp_path / "status-page.png")
        chromium(tmp_path, url, f"--screenshot={shot.resolve()}", "--window-size=1280,800",
                 "--hide-scrollbars")
        assert shot.stat().st_size < 300_000
        with Image.open(shot) as image:
            assert image.size == (1280, 800)

        # an admin sends the dead letter again: it is in the study's audit trail, with who did it
        row_id = node.db("SELECT id FROM outbox WHERE state = 'dead'")[0]["id"]
        done = subprocess.run([sys.executable, "-m", "cxr_node", "requeue", str(row_id),
                               "--config", str(config)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert wait_for(lambda: node.db("SELECT 1 FROM outbox WHERE id = ? AND state = 'dead' "
                                        "AND attempts = 1", row_id), 30)
    events = [(r["event"], r) for r in study_history(node.state_dir / "audit.jsonl", late_key).records]
    [requeued] = [r for event, r in events if event == "outbox.requeued"]
    assert requeued["by"] and requeued["was"] == "dead" and requeued["destination"] == HOSTILE_DESTINATION
    names = [event for event, _ in events]
    assert names.count("outbox.dead") == 2 and names.count("study.failed") == 2
    assert "study.reported" in names[names.index("outbox.dead") + 1:]  # reopened by the requeue


def _api(url: str) -> dict:
    with urllib.request.urlopen(url + "api/status", timeout=10) as answer:
        return json.loads(answer.read())
