"""Configuration: a bad file stops the node with a message naming file, line, key and expectation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cxr_node.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("example", sorted((REPO / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_are_valid(example: Path):
    load_config(example)


def test_every_problem_is_named_with_file_line_key_and_expectation(tmp_path: Path):
    path = write(tmp_path, """\
node:
  port: 99999
  colour: blue
accept:
  - {ae_title: MODALITY1, network: 10.0.0.0/24}
  - {ae_title: "BAD\\\\AE", network: 10.0.0/33}
study: {settle_seconds: soon}
""")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    problems = err.value.problems
    assert f"{path}:2: 'node.port' = 99999: expected less than or equal to 65535" in problems
    assert any(p.startswith(f"{path}:3: unknown key 'node.colour'") for p in problems)
    assert any(f"{path}:6: 'accept[1].ae_title'" in p and "AE title" in p for p in problems)
    assert any(f"{path}:6: 'accept[1].network' = '10.0.0/33'" in p for p in problems)
    assert any(f"{path}:7: 'study.settle_seconds' = 'soon': expected a valid number" in p
               for p in problems)


def test_a_secret_in_yaml_is_refused_and_never_echoed(tmp_path: Path):
    path = write(tmp_path, "queue: {broker: 'redis://:hunter2@127.0.0.1:6379/0'}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "hunter2" not in str(err.value)
    assert "CXR_NODE_BROKER_PASSWORD" in str(err.value)


def test_cross_field_rules(tmp_path: Path):
    for text, expected in [
        ("study: {settle_seconds: 60, max_wait_seconds: 30}", "max_wait_seconds must be at least"),
        ("queue: {broker: 'redis://127.0.0.1/0', username: n, worker_username: w,"
         " task_time_limit_seconds: 900, visibility_timeout_seconds: 600}",
         "visibility_timeout_seconds must be longer"),
        ("destinations: [{name: a, folder: /x}, {name: a, folder: /y}]", "repeated: a"),
        ("destinations: [{name: a}]", "a destination with type: dicom / (.+ / )?folder"),
        ("destinations: [{type: pigeon, name: a}]", "a destination with type: dicom / (.+ / )?folder"),
        ("destinations: [{type: folder, name: a, folder: /x, port: 4}]", "unknown key .destinations\\[0\\].port."),
        ("node: {tls: {certificate: c.pem, private_key: k.pem, require_client_certificate: true}}",
         "ca_certificates"),
        ("model: {prompt: 'Describe {patient}'}", "placeholders are {views} and {indication}"),
        ("model: {quantization: fp4}", "'model.quantization' = 'fp4'"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            load_config(write(tmp_path, text))


def test_relative_paths_are_relative_to_the_file_and_env_overrides(tmp_path: Path):
    path = write(tmp_path, "node: {state_dir: state}\nmodel: {adapter: lora}\n")
    config = load_config(path, environ={})
    assert config.state_dir == tmp_path / "state"
    assert config.model.adapter == tmp_path / "lora"
    assert config.database_path.parent == tmp_path / "state"
    config = load_config(path, environ={"CXR_NODE_STATE_DIR": "/srv/cxr"})
    assert config.state_dir == Path("/srv/cxr")


def test_config_check_command(tmp_path: Path):
    good = write(tmp_path, "node: {ae_title: CXR1, state_dir: state}\n")
    done = subprocess.run([sys.executable, "-m", "cxr_node", "config", "check", str(good)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ae_title: CXR1" in done.stdout and "OK" in done.stderr
    bad = write(tmp_path, "node: {ae_titel: CXR1}\n")
    done = subprocess.run([sys.executable, "-m", "cxr_node", "config", "check", str(bad)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert f"{bad}:1: unknown key 'node.ae_titel'" in done.stderr
    missing = tmp_path / "nope.yaml"
    done = subprocess.run([sys.executable, "-m", "cxr_node", "status", "--config", str(missing)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and f"{missing}: cannot read the configuration file" in done.stderr


def test_readme_reference_matches_the_code():
    """The README's key table is generated from the models; regenerate it when a key changes."""
    from cxr_node.config import reference

    readme = (REPO / "README.md").read_text()
    start, end = "<!-- reference:start -->\n", "<!-- reference:end -->"
    table = readme[readme.index(start) + len(start):readme.index(end)]
    assert table == reference(), "run: cxr-node config reference, and paste it into README.md"
