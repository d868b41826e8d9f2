"""`vllm serve` under a burst of concurrent requests, with and without the specx drafter.

64 requests at once, mixed: completions and chat, streaming and not, lengths 4..60 tokens, some with
stop strings, some cancelled mid-stream. Every request must complete (or be cancelled cleanly), the
greedy outputs must equal those of the same server without speculation, the server must stay up and
end with nothing running, and specx's own Prometheus metrics must be on /metrics beside vLLM's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib.util import find_spec

import pytest
import torch

from tests.conftest import many_prompts
from tests.vllm.test_serve import HOST, _free_port, _metric_total, _stop, _tail, reap_group, wait_healthy

pytestmark = pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed")

NAME = "specx-tiny"
N_REQUESTS = 64


def _request_plan(n: int) -> list[dict]:
    """Deterministic mix: kind (completion/chat), stream, max_tokens, stop, cancel_after (chunks)."""
    plan = []
    for i, prompt in enumerate(many_prompts(n)):
        cancel = i % 8 == 7  # streaming (odd i); long enough and no stop string: still running at chunk 2
        plan.append({"i": i, "prompt": prompt, "chat": i % 3 == 1, "stream": i % 2 == 1,
                     "max_tokens": 48 if cancel else 4 + (i * 13) % 57,
                     "stop": ["e", "\n"] if i % 5 == 2 and not cancel else None,
                     "cancel_after": 2 if cancel else None})
    return plan


def _send(base: str, req: dict) -> dict:
    import requests

    http = requests.Session()
    http.trust_env = False
    body = {"model": NAME, "max_tokens": req["max_tokens"], "temperature": 0, "stream": req["stream"]}
    if req["stop"]:
        body["stop"] = req["stop"]
    if req["chat"]:
        url, body["messages"] = f"{base}/v1/chat/completions", [{"role": "user", "content": req["prompt"]}]
    else:
        url, body["prompt"] = f"{base}/v1/completions", req["prompt"]
    t0 = time.monotonic()
    with http.post(url, json=body, stream=req["stream"], timeout=600) as r:
        if r.status_code != 200:
            return {"i": req["i"], "status": r.status_code, "error": r.text}
        if not req["stream"]:
            choice = r.json()["choices"][0]
            text = choice["message"]["content"] if req["chat"] else choice["text"]
            return {"i": req["i"], "status": 200, "text": text, "finish": choice["finish_reason"]}
        text, finish, chunks = "", None, 0
        for line in r.iter_lines():
            if not line or not line.startswith(b"data: "):
                continue
            data = line[len(b"data: "):]
            if data == b"[DONE]":
                break
            choice = json.loads(data)["choices"][0]
            text += (choice.get("delta", {}).get("content") or "") if req["chat"] else choice.get("text", "")
            finish = choice.get("finish_reason") or finish
            chunks += 1
            if req["cancel_after"] and chunks >= req["cancel_after"]:
                r.close()  # the client goes away mid-stream: the server must abort the request
                return {"i": req["i"], "status": 200, "cancelled": True, "text": text}
        return {"i": req["i"], "status": 200, "text": text, "finish": finish, "seconds": time.monotonic() - t0}


def _burst(base: str, plan: list[dict]) -> dict[int, dict]:
    with ThreadPoolExecutor(max_workers=len(plan)) as pool:
        return {r["i"]: r for r in pool.map(lambda req: _send(base, req), plan)}


@contextmanager
def _server(target: str, spec: dict | None, log_path):
    import requests

    port = _free_port()
    base = f"http://{HOST}:{port}"
    cmd = [sys.executable, "-m", "vllm_specx.cli", "serve", target, "--host", HOST, "--port", str(port),
           "--served-model-name", NAME, "--enforce-eager", "--dtype", "float32", "--max-model-len", "512",
           "--max-num-seqs", str(N_REQUESTS)]
    if spec:
        cmd += ["--speculative-config", json.dumps(spec)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # `vllm-specx serve` makes a fresh one
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    http = requests.Session()
    http.trust_env = False
    try:
        wait_healthy(proc, http, base, log_path, time.monotonic())
        yield base, http, proc
    finally:
        _stop(proc)
        leftovers = reap_group(proc.pid, wait_s=30)  # the engine core exits shortly after the API server
        assert not leftovers, f"server left processes {leftovers} behind (killed now):\n{_tail(log_path)}"


@pytest.fixture(scope="module")
def drafter_with_early_stop(tiny_edd_drafter, tmp_path_factory) -> str:
    """The random tiny EDD drafter plus a confidence-rule decision model, so specx's controller runs."""
    from vllm_specx.core.early_stop import FEATURE_NAMES, train_early_stop
    from vllm_specx.training.early_stop_data import attach_early_stop

    g = torch.Generator().manual_seed(0)
    feats = torch.rand(2000, len(FEATURE_NAMES), generator=g) * torch.tensor([1.0, 1.0, 1.0, 12.0, 3.0, -30.0])
    model, _ = train_early_stop(feats, (feats[:, 0] > 0.3).float(), kind="mlp", epochs=10, seed=0)
    folder = tmp_path_factory.mktemp("edd_serve") / "drafter"
    shutil.copytree(tiny_edd_drafter, folder)
    attach_early_stop(folder, model, {}, threshold=0.2)
    return str(folder)


@pytest.mark.slow  # two servers and 128 requests: about 2 minutes; test_serve.py covers serving in the default suite
@pytest.mark.timeout(900)
def test_burst_of_64_mixed_requests_equals_plain_server(tiny_target, drafter_with_early_stop, tmp_path):
    plan = _request_plan(N_REQUESTS)
    spec = {"method": "eagle3", "model": drafter_with_early_stop, "num_speculative_tokens": 3}
    with _server(tiny_target, spec, tmp_path / "spec.log") as (base, http, proc):
        spec_out = _burst(base, plan)
        assert http.get(f"{base}/health", timeout=10).status_code == 200  # still up after the burst
        for _ in range(60):  # cancelled requests are aborted: nothing left running or waiting
            metrics = http.get(f"{base}/metrics", timeout=10).text
            if _metric_total(metrics, "vllm:num_requests_running") == 0 and \
                    _metric_total(metrics, "vllm:num_requests_waiting") == 0:
                break
            time.sleep(0.5)
        assert _metric_total(metrics, "vllm:num_requests_running") == 0, "requests left running"
        # one more request after the burst is served normally
        after = _send(base, dict(plan[0], i=-1))
        assert after["status"] == 200 and after["text"] == spec_out[0]["text"]
        # specx's metrics beside vLLM's, on the API server's /metrics
        assert _metric_total(metrics, "vllm:spec_decode_num_drafts") > 0
        steps = _metric_total(metrics, "specx:draft_steps")
        kept, most = _metric_total(metrics, "specx:draft_tokens_kept"), _metric_total(metrics, "specx:draft_tokens_max")
        assert steps and steps > 0, "specx:draft_steps missing or zero on /metrics"
        assert 0 < kept <= most
        assert _metric_total(metrics, "specx:accepted_tokens_per_request_step_count") > 0
        assert proc.poll() is None
    with _server(tiny_target, None, tmp_path / "plain.log") as (base, http, _):
        plain_out = _burst(base, plan)

    for req in plan:
        s, p = spec_out[req["i"]], plain_out[req["i"]]
        assert s["status"] == 200 and p["status"] == 200, (req, s, p)
        if req["cancel_after"]:
            assert s.get("cancelled") and p.get("cancelled")
            assert p["text"].startswith(s["text"]) or s["text"].startswith(p["text"])  # chunking may differ
            continue
        assert s["text"] == p["text"], f"request {req['i']} ({req}) differs:\n{s['text']!r}\n{p['text']!r}"
        assert s["finish"] == p["finish"], (req, s, p)
    finishes = {spec_out[r["i"]].get("finish") for r in plan if not r["cancel_after"]}
    assert "length" in finishes and "stop" in finishes  # both endings were exercised
