"""The worker side: reading model text, model folders, the demo model, batching, and Celery for real."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from modelzoo import xray_image
from PIL import Image
from redisserver import REDIS_ENV, redis_queue

from cxr_node.config import CONFIG_ENV, Config, ModelConfig, load_config
from cxr_node.identity import IdentityError, fingerprint, model_identity
from cxr_node.report import sign_off_cue
from workers.app import make_celery, prune_embedded, redis_url
from workers.demo import DEMO_MANIFEST, build_demo_model
from workers.model import (
    MANIFEST_NAME,
    ModelLoadError,
    ReportModel,
    check_adapter_dir,
    check_model_dir,
    letterbox,
    load_model,
    views_phrase,
)
from workers.payload import TASK_NAME, DraftResult, parse_report

REPO = Path(__file__).resolve().parents[1]
NIH = ["00000129_000.png", "00000284_000.png", "00000353_000.png"]
QUICK = {"max_new_tokens": 24}
HEADING_IN_TEXT = re.compile(r"(?i)\b(findings|impressions?)\s*:")


# --- reading the model's text ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "findings", "impression"),
    [
        ("FINDINGS: Lungs are clear.\nIMPRESSION: Normal chest.", "Lungs are clear.", "Normal chest."),
        ("**Findings:** Heart size normal.\n\n**Impression:** No acute disease.", "Heart size normal.", "No acute disease."),
        ("**Findings**: Small left effusion.\n**Impressions**: Effusion.", "Small left effusion.", "Effusion."),
        ("## Findings\nNo pneumothorax.\n\n## Impression\nNormal.", "No pneumothorax.", "Normal."),
        ("findings : lungs clear . impression : normal .", "lungs clear .", "normal ."),
        ("Here is the report.\nFINDINGS: Clear lungs.\nIMPRESSION: Normal.", "Clear lungs.", "Normal."),
        ("The lungs are clear.\nIMPRESSION: No acute findings.", "The lungs are clear.", "No acute findings."),
        ("FINDINGS:\n- Clear lungs\n- Normal heart\nIMPRESSION:\nNormal.", "- Clear lungs\n- Normal heart", "Normal."),
    ],
)
def test_headings_in_any_common_form(text: str, findings: str, impression: str) -> None:
    parsed = parse_report(text)
    assert parsed.ok, parsed.reason
    assert (parsed.findings, parsed.impression) == (findings, impression)


def test_text_before_the_findings_heading_is_dropped_with_a_note() -> None:
    parsed = parse_report("Sure! Here it is.\nFINDINGS: Clear.\nIMPRESSION: Normal.")
    assert parsed.findings == "Clear."
    assert any("before the first heading" in n for n in parsed.notes)


def test_a_repeated_report_is_kept_once() -> None:
    once = "FINDINGS: Clear lungs.\nIMPRESSION: Normal.\n"
    parsed = parse_report(once * 3)
    assert (parsed.findings, parsed.impression) == ("Clear lungs.", "Normal.")
    assert "findings section repeated: the repeat was dropped" in parsed.notes


def test_missing_impression_keeps_findings_with_a_note() -> None:
    parsed = parse_report("FINDINGS: Mild cardiomegaly. No effusion.")
    assert parsed.ok
    assert (parsed.findings, parsed.impression) == ("Mild cardiomegaly. No effusion.", "")
    assert "no impression section" in parsed.notes


def test_no_headings_means_all_text_is_findings() -> None:
    parsed = parse_report("Mild cardiomegaly without pulmonary edema.")
    assert parsed.ok
    assert parsed.findings == "Mild cardiomegaly without pulmonary edema."
    assert parsed.impression == ""
    assert any("no FINDINGS/IMPRESSION headings" in n for n in parsed.notes)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "wrote nothing"),
        ("  \n\t ", "wrote nothing"),
        (". . , ; 123 -- ...", "no letters"),
        ("effusion " * 20, "'effusion' repeated 20 times"),
        ("the heart " * 10 + "is normal", "'the heart' repeated 10 times"),
        ("FINDINGS: " + "no no no no no no no no no no", "'no' repeated"),
        ("a" * 60, "repeated"),
        ("FINDINGS:\nIMPRESSION:\n", "no text under them"),
    ],
)
def test_empty_or_degenerate_text_is_a_failure_with_a_reason(text: str, reason: str) -> None:
    parsed = parse_report(text)
    assert not parsed.ok
    assert reason in (parsed.reason or "")


def _iu_reports(reports: Path) -> Iterator[tuple[str, str]]:
    """(findings, impression) of every Indiana University report that has both, read unmodified."""
    with tarfile.open(reports) as archive:
        for member in archive:
            if member.name.endswith(".xml"):
                root = ET.parse(archive.extractfile(member)).getroot()  # type: ignore[arg-type]
                parts = {a.get("Label"): (a.text or "").strip() for a in root.iter("AbstractText")}
                findings, impression = parts.get("FINDINGS"), parts.get("IMPRESSION")
                # A few reports carry a whole second report, headings and all, inside a section.
                if findings and impression and not HEADING_IN_TEXT.search(findings + impression):
                    yield findings, impression


def test_real_radiology_reports_parse_back_and_are_never_called_degenerate(iu_reports: Path) -> None:
    """3,400 real reports: the repetition check must not fire on radiologists' terse style, and
    the node's sign-off check (report.SIGN_OFF_CUES) must not take their prose for a signature."""
    normalise = " ".join
    count = 0
    for i, (findings, impression) in enumerate(_iu_reports(iu_reports)):
        text = (
            f"FINDINGS: {findings}\n\nIMPRESSION: {impression}"
            if i % 2
            else f"**Findings:**\n{findings}\n\n**Impression:**\n{impression}"
        )
        parsed = parse_report(text)
        assert parsed.ok, (parsed.reason, text)
        assert normalise(parsed.findings.split()) == normalise(findings.split())
        assert normalise(parsed.impression.split()) == normalise(impression.split())
        assert sign_off_cue(findings) is None and sign_off_cue(impression) is None, text
        count += 1
    assert count > 3000


# --- model folders -------------------------------------------------------------------------------


def test_missing_model_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=f"{tmp_path / 'absent'} does not exist"):
        load_model(ModelConfig(device="cpu"), tmp_path / "absent")


def test_incomplete_model_folder_names_every_missing_part(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gemma3"}')
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelConfig(device="cpu"), tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    for part in ("weights", "processor_config.json", "tokenizer"):
        assert part in message


def test_missing_tokenizer_and_shard_are_named(demo_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(demo_dir, broken)
    (broken / "tokenizer.json").unlink()
    (broken / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelConfig(device="cpu"), broken)
    assert "tokenizer files" in str(err.value)
    assert "model-00002-of-00002.safetensors (listed in model.safetensors.index.json)" in str(err.value)


def test_unsupported_architecture_is_refused(demo_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "bert"
    shutil.copytree(demo_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="'bert' is not supported; supported: gemma3, llava"):
        load_model(ModelConfig(device="cpu"), other)


def test_bad_manifest_and_incomplete_adapter_are_refused(demo_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "model"
    shutil.copytree(demo_dir, other)
    (other / MANIFEST_NAME).write_text('{"name": "x", "demo": "yes"}')
    with pytest.raises(ModelLoadError, match="'demo' must be a bool"):
        load_model(ModelConfig(device="cpu", quantization="none"), other)
    (tmp_path / "adapter").mkdir()
    with pytest.raises(ModelLoadError, match="adapter_config.json, adapter_model.safetensors"):
        check_adapter_dir(tmp_path / "adapter")


def test_pickled_weights_and_adapters_are_refused(demo_dir: Path, tmp_path: Path) -> None:
    """torch.load of a pickle runs code: a folder whose weights are only pickles is not loaded."""
    pickled = tmp_path / "pickled"
    shutil.copytree(demo_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"weights only as pickles \(pytorch_model\.bin\): "
                                             "loading a pickle runs code"):
        load_model(ModelConfig(device="cpu", quantization="none"), pickled)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelLoadError, match="adapter_model.bin, a pickle: loading it runs code"):
        check_adapter_dir(adapter)
    # a folder with both: the safetensors are what is loaded, the pickle is never opened
    both = tmp_path / "both"
    shutil.copytree(demo_dir, both)
    (both / "pytorch_model.bin").write_bytes(b"\x80\x04not a checkpoint: opening it would fail")
    check_model_dir(both)
    assert load_model(ModelConfig(device="cpu", quantization="none", generation=QUICK), both)


# --- the demo model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="module")
def demo(demo_dir: Path) -> ReportModel:
    return load_model(ModelConfig(device="cpu", quantization="none", generation=QUICK), demo_dir)


def test_demo_model_is_small_private_deterministic_and_says_demo(demo_dir: Path, tmp_path: Path) -> None:
    started = time.perf_counter()
    again = build_demo_model(tmp_path / "again")
    assert time.perf_counter() - started < 10
    files = [p for p in again.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 5_000_000
    assert stat.S_IMODE(again.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    config = ModelConfig(device="cpu", quantization="none")
    first = load_model(config, demo_dir).identity
    second = load_model(config, again).identity
    assert first == second
    assert (first.name, first.version, first.demo) == (DEMO_MANIFEST["name"], "demo-1", True)
    assert first.architecture == "gemma3"
    assert len(first.fingerprint) == 64
    with pytest.raises(FileExistsError):
        build_demo_model(again)


def test_the_node_computes_the_identity_the_worker_reports(demo_dir: Path) -> None:
    """Same folder, same settings: the node's torch-free identity is the loaded model's."""
    config = ModelConfig(device="cpu", quantization="none", generation=QUICK)
    assert model_identity(config, demo_dir) == load_model(config, demo_dir).identity


def test_a_worker_with_another_model_than_the_pinned_one_does_not_start(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.tasks

    monkeypatch.setattr(workers.tasks, "_config", None)
    pinned = {**model_identity(ModelConfig(), demo_dir).model_dump(), "fingerprint": "0" * 64}
    config = load_config(_write_config(tmp_path, model={"path": str(demo_dir), "identity": pinned}))
    with pytest.raises(IdentityError, match=r"is not the one model\.identity pins \(0000"):
        workers.tasks.run_worker(config)


def test_fingerprint_follows_prompt_generation_and_quantization(demo_dir: Path) -> None:
    base = ModelConfig(device="cpu", quantization="none")
    variants = [
        base,
        base.model_copy(update={"prompt": base.prompt + " Be brief."}),
        base.model_copy(update={"generation": base.generation.model_copy(update={"max_new_tokens": 9})}),
        base.model_copy(update={"quantization": "nf4"}),
    ]
    assert len({fingerprint(v, demo_dir) for v in variants}) == len(variants)


def test_demo_draft_with_two_images_is_fast_on_cpu(demo_dir: Path, nih_images: Path) -> None:
    model = load_model(ModelConfig(device="cpu", generation={"max_new_tokens": 64, "min_new_tokens": 64}), demo_dir)
    request = {"request_id": "r", "images": [xray_image(nih_images, NIH[0], "PA"), xray_image(nih_images, NIH[1], "LATERAL")]}
    model.draft([request])  # first call pays one-off set-up
    started = time.perf_counter()
    [result] = model.draft([request])
    assert time.perf_counter() - started < 2.0
    assert result["timings"]["new_tokens"] == 64
    assert result["model"]["demo"] is True and result["model"]["quantization"] == "nf4"


# --- batching ------------------------------------------------------------------------------------


def _requests(nih_images: Path) -> list[dict[str, Any]]:
    return [
        {"request_id": "j1-r1", "images": [xray_image(nih_images, NIH[0], "PA")], "indication": None},
        {
            "request_id": "j2-r1",
            "images": [xray_image(nih_images, NIH[1], "PA"), xray_image(nih_images, NIH[2], "LATERAL")],
            "indication": "Cough for two weeks.",
        },
        {"request_id": "j3-r1", "images": [xray_image(nih_images, NIH[2], "AP")], "indication": None},
    ]


@pytest.fixture
def generate_calls(demo: ReportModel, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes of the model's generate calls (the real generate still runs)."""
    calls: list[int] = []
    real = demo.model.generate

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["input_ids"].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(demo.model, "generate", counted)
    return calls


def test_three_requests_one_generate_results_in_order(
    demo: ReportModel, nih_images: Path, generate_calls: list[int]
) -> None:
    requests = _requests(nih_images)
    results = demo.draft(requests)
    assert generate_calls == [3]
    assert [r["request_id"] for r in results] == ["j1-r1", "j2-r1", "j3-r1"]
    for r in results:
        assert r["timings"]["batch_size"] == 3
        assert r["timings"]["device"] == "cpu" and r["timings"]["worker"] == socket.gethostname()
        assert r["ok"] or r["reason"]
        assert DraftResult.model_validate(r).model == demo.identity  # the contract the node reads
    # Left padding done right: each request drafts the same alone as in the batch.
    alone = [demo.draft([request])[0]["text"] for request in requests]
    assert [r["text"] for r in results] == alone


def test_a_bad_png_fails_only_its_own_request(demo: ReportModel, nih_images: Path, generate_calls: list[int]) -> None:
    requests = _requests(nih_images)
    requests[1]["images"][1] = {**requests[1]["images"][1], "png_b64": "bm90IGEgUE5H"}  # "not a PNG"
    results = demo.draft(requests)
    assert generate_calls == [2]
    assert [r["request_id"] for r in results] == ["j1-r1", "j2-r1", "j3-r1"]
    assert results[1]["ok"] is False
    assert "LATERAL image is not a readable PNG" in results[1]["reason"]
    assert results[1]["model"]["name"] == DEMO_MANIFEST["name"]
    assert [r["timings"]["new_tokens"] > 0 for r in (results[0], results[2])] == [True, True]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"view": "OBLIQUE"}, "view 'OBLIQUE' is not one of PA, AP, LATERAL, UNKNOWN"),
        ({"rows": 10}, "but the request says"),
        ({"png_b64": "%%%"}, "not valid base64"),
    ],
)
def test_request_problems_are_reasons_not_exceptions(
    demo: ReportModel, nih_images: Path, change: dict[str, Any], reason: str
) -> None:
    image = {**xray_image(nih_images, NIH[0], "PA", image_size=256), **change}
    [result] = demo.draft([{"request_id": "x", "images": [image]}])
    assert result["ok"] is False and reason in result["reason"]


def test_images_above_the_size_limit_are_scaled_with_a_note(demo_dir: Path, nih_images: Path) -> None:
    small = load_model(ModelConfig(device="cpu", quantization="none", image_size=256, generation=QUICK), demo_dir)
    [result] = small.draft([{"request_id": "x", "images": [xray_image(nih_images, NIH[0], "PA", 1024)]}])
    assert "PA image scaled down to 256 px" in result["notes"]


def test_indication_reaches_the_prompt_only_when_the_worker_allows_it(demo_dir: Path, nih_images: Path) -> None:
    request = {"request_id": "x", "images": [xray_image(nih_images, NIH[0], "PA", 256)], "indication": "Cough."}
    for allowed in (True, False):
        model = load_model(ModelConfig(device="cpu", quantization="none", send_indication=allowed), demo_dir)
        [ids] = model.model_inputs([request])["input_ids"].tolist()
        assert ("indication" in model.processor.tokenizer.decode(ids).split()) is allowed
    [result] = model.draft([request])
    assert "indication ignored: model.send_indication is off on the worker" in result["notes"]


def test_letterbox_keeps_aspect_ratio_on_black() -> None:
    portrait = Image.new("L", (60, 100), 200)
    square = letterbox(portrait)
    assert square.size == (100, 100)
    assert square.getpixel((0, 50)) == 0 and square.getpixel((50, 50)) == 200
    assert square.getbbox() == (20, 0, 80, 100)


def test_views_phrase() -> None:
    assert views_phrase(["PA", "LATERAL"]) == "PA and lateral"
    assert views_phrase(["AP"]) == "AP"
    assert views_phrase(["PA", "AP", "UNKNOWN"]) == "PA, AP and unspecified"


# --- Celery, for real ----------------------------------------------------------------------------


def test_the_node_side_imports_no_torch() -> None:
    code = (
        "import sys, workers.app, workers.tasks, cxr_node.queue, cxr_node.identity; "
        "print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_task_settings_leave_retries_to_the_node(tmp_path: Path) -> None:
    import workers.tasks  # noqa: F401 - registers the task with every app

    config = load_config(_write_config(tmp_path, queue={"max_attempts": 5, "task_time_limit_seconds": 600}))
    app = make_celery(config)
    task = app.tasks[TASK_NAME]
    assert not getattr(task, "autoretry_for", ()) and task.max_retries == 0
    assert task.acks_late and task.reject_on_worker_lost
    assert (app.conf.task_time_limit, app.conf.task_soft_time_limit) == (600, 540)
    assert app.conf.worker_prefetch_multiplier == 1 and app.conf.accept_content == ["json"]


def test_embedded_broker_writes_whole_private_messages_and_prunes(tmp_path: Path) -> None:
    config = load_config(_write_config(tmp_path))
    app = make_celery(config)
    app.send_task(TASK_NAME, args=[[{"request_id": "r", "images": []}]])
    messages = config.queue_dir / "messages"
    [message] = list(messages.iterdir())
    assert message.name.endswith(".cxr.draft.msg")  # routed to queue.name
    assert stat.S_IMODE(message.stat().st_mode) == 0o600
    assert json.loads(message.read_text())["headers"]["task"] == TASK_NAME
    leftovers = [config.queue_dir / "processed" / "old.msg", messages / ".tmp-crashed"]
    for path in leftovers:
        path.write_text("{}")
    assert prune_embedded(app, config, older_than_seconds=0) == 2
    assert list(messages.iterdir()) == [message] and not any(p.exists() for p in leftovers)



def _write_config(tmp_path: Path, **sections: Any) -> Path:
    data = {
        "node": {"state_dir": str(tmp_path / "state")},
        "model": {"device": "cpu", "generation": {"max_new_tokens": 16}},
        "queue": {"poll_interval_seconds": 0.05},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    path = tmp_path / "cxr-node.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


WORKER = (
    "import os; from cxr_node.config import load_config; from workers.tasks import run_worker; "
    "run_worker(load_config(os.environ['CXR_NODE_CONFIG']))"
)


def _start_worker(config_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = open(config_path.parent / "worker.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-c", WORKER],
        cwd=REPO,
        env={**os.environ, **env, CONFIG_ENV: str(config_path)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (Celery's warm shutdown), then SIGKILL to the process group if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(timeout=10)


def _draft_through_celery(config: Config, nih_images: Path, worker: subprocess.Popen[bytes]) -> None:
    app = make_celery(config)
    requests = _requests(nih_images)[:2] + [{"request_id": "bad", "images": []}]
    result = app.send_task(TASK_NAME, args=[requests])
    try:
        results = result.get(timeout=120, interval=0.05)
    finally:
        assert worker.poll() is None, (config.state_dir.parent / "worker.log").read_text()[-3000:]
    assert [r["request_id"] for r in results] == ["j1-r1", "j2-r1", "bad"]
    assert results[2] == {**results[2], "ok": False, "reason": "a request needs at least one image"}
    assert all(r["model"]["demo"] for r in results)
    assert results[0]["timings"]["batch_size"] == 2
    with pytest.raises(ValueError, match="takes a non-empty list"):
        app.send_task(TASK_NAME, args=[[]]).get(timeout=60, interval=0.05)


@pytest.mark.slow
def test_embedded_broker_worker_builds_the_demo_and_drafts(tmp_path: Path, nih_images: Path) -> None:
    config_path = _write_config(tmp_path)
    config = load_config(config_path)
    worker = _start_worker(config_path, {})
    try:
        _draft_through_celery(config, nih_images, worker)
    finally:
        _stop(worker)
    assert (config.model_path / MANIFEST_NAME).is_file()  # built on first start, no download
    queue = config.queue_dir
    assert stat.S_IMODE(queue.stat().st_mode) == 0o700
    assert not list((queue / "messages").iterdir())  # every message taken
    assert {stat.S_IMODE(p.stat().st_mode) for p in (queue / "results").iterdir()} == {0o600}


@pytest.mark.slow
def test_redis_broker_worker_drafts(
    tmp_path: Path, nih_images: Path, redis_port: int, demo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in REDIS_ENV.items():
        monkeypatch.setenv(name, value)
    config_path = _write_config(tmp_path, queue=redis_queue(redis_port),
                                model={"path": str(demo_dir)})
    config = load_config(config_path)
    assert redis_url(config, "node") == (
        f"redis://cxr-node:s3cret%3A%2F%40x@127.0.0.1:{redis_port}/0")
    assert redis_url(config, "worker") == (
        f"redis://cxr-worker:w0rker%23%3F%25y@127.0.0.1:{redis_port}/0")
    worker = _start_worker(config_path, REDIS_ENV)
    try:
        _draft_through_celery(config, nih_images, worker)
    finally:
        _stop(worker)
    assert not config.queue_dir.exists()  # nothing of the embedded broker was made
