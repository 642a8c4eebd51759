"""`python -m headvis.serve`: a bad command line is one clear line and exit 2; a real start and a clean stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from headvis.io import read_json, write_json


def _serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "headvis.serve", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _one_error_line(result: subprocess.CompletedProcess, needle: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("headvis: error:") and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("args, needle", [
    ([], "--data"),
    (["--data", "{tmp}/none"], "no such folder"),
    (["--data", "{tmp}"], "not a headvis data tree"),
    (["--data", "{data}", "--port", "x"], "--port must be an integer"),
    (["--data", "{data}", "--port", "70000"], "--port must be in 0..65535"),
    (["--data", "{data}", "--allow-origin", "*"], "--allow-origin wants one origin"),
    (["--data", "{data}", "--allow-origin", "http://a.example/path"], "--allow-origin wants one origin"),
    (["--data", "{data}", "--frontend", "{tmp}"], "no index.html"),
    (["--data", "{data}", "--device", "tpu"], "--device must be cpu or cuda"),
    (["--data", "{data}", "--dictionary", "{tmp}/none"], "no such folder"),
    (["--data", "{data}", "--dictionary", "{tmp}"], "cfg.json is missing"),
    (["--data", "{data}", "--dictionary"], "expected one argument"),
])
def test_a_bad_command_line_is_one_line_and_exit_2(args, needle, tmp_path, data):
    (tmp_path / "empty").mkdir()
    args = [a.format(tmp=tmp_path / "empty", data=data) for a in args]
    _one_error_line(_serve(*args), needle)


@pytest.mark.parametrize("version", [None, 1])
def test_a_format_1_tree_is_one_line_saying_to_re_scan(data, version):
    config = read_json(data / "config.json")
    config.pop("format_version")
    if version is not None:
        config["format_version"] = version
    write_json(data / "config.json", config)
    _one_error_line(_serve("--data", str(data)), "re-scan it: python -m headvis.scan --out")
    assert read_json(data / "server_config.json") == {}  # the scan's; no server started


def test_a_dictionary_that_does_not_fit_the_model_is_refused_before_serving(data, tmp_path, lm, dictionaries):
    from server_helpers import random_dictionary

    narrow = random_dictionary(tmp_path / "narrow", "blocks.1.hook_resid_pre", 100)
    _one_error_line(_serve("--data", str(data), "--port", "0", "--dictionary", str(narrow)), "is for d_model 100")
    twice = ["--dictionary", str(dictionaries["L1"]), "--dictionary", str(dictionaries["L1"])]
    _one_error_line(_serve("--data", str(data), "--port", "0", *twice), "both read the input of layer 1")
    assert read_json(data / "server_config.json") == {}  # refused before serving


def test_a_busy_port_is_one_line_and_exit_2(data):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _one_error_line(_serve("--data", str(data), "--port", str(port)), f"cannot listen on 127.0.0.1:{port}")
    assert read_json(data / "server_config.json") == {}  # the scan's, untouched


def test_serve_starts_answers_and_puts_static_mode_back_on_ctrl_c(data):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "headvis.serve", "--data", str(data), "--port", "0"],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        log = []
        while not any("ready" in line for line in log):
            assert time.monotonic() < deadline and process.poll() is None, log
            log.append(process.stderr.readline())
        config = read_json(data / "server_config.json")
        url = config["server_url"]
        assert url.startswith("http://127.0.0.1:") and url in log[-1]
        with urllib.request.urlopen(f"{url}/data/config.json") as response:
            assert json.load(response)["layers"] == [1, 3]
        body = {"context": config["context"], "layer": 1, "head": 0, "text": "hi there"}
        request = urllib.request.Request(f"{url}/api/head_vis/public/add_custom_sequence/v0", method="POST",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            assert json.load(response)["sequence_id"].startswith("c")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert read_json(data / "server_config.json") == {}
    assert "Traceback" not in process.stderr.read()
