"""PCT trees through vLLM's GPU attention backends (FlashAttention, Triton attention), checked on CPU.

No GPU here: tests/vllm/gpu_backend_glue.py runs vLLM's own Triton attention backend and cache writer in
Triton's interpreter (see there for how) and compares specx's wrapped forward with vLLM's own, branch by
branch. What stays unchecked without a GPU: the compiled kernels, FlashAttention's own kernel (its forward
is wrapped the same way; its cache views are the Triton backend's), and a whole engine on a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vllm_specx.vllm_adapter import tree_backends, tree_step

ROOT = Path(__file__).resolve().parents[2]


def test_tree_steps_through_vllms_triton_backend_match_vllms_own_attention_per_branch(tmp_path):
    out = tmp_path / "glue.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "tests.vllm.gpu_backend_glue", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["vllm_has_triton"], "the stubs did not make vLLM keep Triton: vLLM's kernels did not run"
    assert result["wrapped"] == [True, True]  # FlashAttentionImpl.forward, TritonAttentionImpl.forward
    for case in ("HND/torch", "HND/triton", "NHD/torch", "NHD/triton"):
        r = result[case]
        assert r["nodes_checked"] == 15
        assert r["max_error"] < 1e-5, (case, r)  # every tree node = vLLM's attention over its branch
        assert r["plain_row_error"] < 1e-5, (case, r)  # a row without a tree = vLLM's own output
        assert r["tree_rows_differ_from_causal"] > 1e-2, (case, r)  # the masks mattered
        assert r["moved"], (case, r)  # accepted path's K/V at base + depth in vLLM's own views
        assert r["kernel_calls"] == (1 if case.endswith("triton") else 0), (case, r)


def _impl(cls, **attrs):
    impl = object.__new__(cls)  # no CUDA here: only the attributes tree_attention_problem reads
    defaults = dict(head_size=32, kv_cache_dtype="auto", alibi_slopes=None, sliding_window=(-1, -1),
                    logits_soft_cap=0, sinks=None, dcp_world_size=1)
    for key, value in {**defaults, **attrs}.items():
        setattr(impl, key, value)
    return impl


def _vllm_config(impls: dict, cudagraph: str = "PIECEWISE"):
    from vllm.config.compilation import CUDAGraphMode

    layers = {name: SimpleNamespace(impl=impl, kv_cache=torch.zeros(0)) for name, impl in impls.items()}
    layers["model.layers.0.mlp"] = SimpleNamespace()  # not an attention layer: ignored
    return SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode[cudagraph],
                                                              static_forward_context=layers))


@pytest.fixture
def on_cuda(monkeypatch):
    monkeypatch.setattr(tree_backends, "_platform", lambda: "cuda")


def test_tree_attention_problem_names_the_layer_and_the_fix_on_gpus(on_cuda):
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    fa, triton_impl = _impl(FlashAttentionImpl), _impl(TritonAttentionImpl)
    assert tree_backends.tree_attention_problem(_vllm_config({"a": fa, "b": triton_impl})) is None
    assert tree_backends.tree_attention_problem(_vllm_config({"a": fa}, cudagraph="NONE")) is None
    assert "no attention layer" in tree_backends.tree_attention_problem(_vllm_config({}))  # nothing seen: no pass
    problem = tree_backends.tree_attention_problem(_vllm_config({"a": fa}, cudagraph="FULL_AND_PIECEWISE"))
    assert "FULL CUDA graphs" in problem and "PIECEWISE" in problem

    class FlashInferImpl:  # a backend specx does not wrap
        pass

    problem = tree_backends.tree_attention_problem(_vllm_config({"a": fa, "model.layers.1.attn": FlashInferImpl()}))
    assert "model.layers.1.attn" in problem and "FlashInferImpl" in problem and "FLASH_ATTN" in problem

    class DiffKVImpl(FlashAttentionImpl):  # a subclass may override forward or keep another cache layout
        pass

    assert "DiffKVImpl" in tree_backends.tree_attention_problem(_vllm_config({"a": _impl(DiffKVImpl)}))
    cfg = _vllm_config({"a": fa})
    cfg.compilation_config.static_forward_context["a"].attn_backend = SimpleNamespace(
        forward_includes_kv_cache_update=True)  # K/V written inside forward: not there when specx attends
    assert "writes its KV cache inside forward" in tree_backends.tree_attention_problem(cfg)
    for attrs, words in (({"sliding_window": (127, 0)}, "sliding-window"), ({"kv_cache_dtype": "fp8_e4m3"}, "quantized"),
                         ({"sinks": torch.zeros(4)}, "sinks"), ({"logits_soft_cap": 30.0}, "soft-capping"),
                         ({"dcp_world_size": 2}, "context parallelism")):
        problem = tree_backends.tree_attention_problem(_vllm_config({"a": fa, "b": _impl(TritonAttentionImpl, **attrs)}))
        assert problem.startswith("layer b:") and words in problem, (attrs, problem)


def test_cpu_platform_accepts_only_vllm_cpus_backend():
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    problem = tree_backends.tree_attention_problem(_vllm_config({"a": _impl(FlashAttentionImpl)}))
    assert "CPUAttentionBackendImpl" in problem  # this machine is the CPU platform


def test_kv_views_of_a_gpu_backend_layer_are_its_own_cache_views():
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    cache = torch.randn(5, 2, 16, 2 * 32)  # logical [num_blocks, Hkv, block_size, 2*D]
    layer = SimpleNamespace(impl=_impl(TritonAttentionImpl), kv_cache=cache)
    k, v = tree_backends.kv_views(layer)
    assert k.shape == v.shape == (5, 16, 2, 32)
    assert torch.equal(k[3, 7, 1], cache[3, 1, 7, :32]) and torch.equal(v[3, 7, 1], cache[3, 1, 7, 32:])
    v[0, 0, 0] = 1.5  # writable views of the cache itself
    assert torch.equal(cache[0, 0, 0, 32:], torch.full((32,), 1.5))
    with pytest.raises(NotImplementedError, match="no KV layout"):
        tree_backends.kv_views(SimpleNamespace(impl=object(), kv_cache=cache))


def test_installing_gpu_tree_hooks_checks_the_gpu_backends_internals(monkeypatch):
    from vllm_specx.vllm_adapter import compat

    moved = compat.Internal("vllm.v1.attention.backends.flash_attn:FlashAttentionImpl.no_such_method", "test",
                            runner="trees")
    monkeypatch.setattr(compat, "INTERNALS", (*compat.INTERNALS, moved))
    with pytest.raises(compat.VllmCompatError, match="no_such_method"):
        tree_step.install_tree_hooks("v1", platform="cuda")
    tree_step.install_tree_hooks("v1", platform="cpu")  # the CPU backend's entries only: not refused

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend,dtype,oracle", [("TRITON_ATTN", "float32", True), ("TRITON_ATTN", "float32", False),
                                                  ("FLASH_ATTN", "bfloat16", True)])
def test_trees_on_a_gpu_are_lossless_through_the_tree_kernel(tiny_target, edd_tree_drafter, backend, dtype, oracle):
    """The whole engine on a GPU (its default runner, V2 on vLLM 0.32+; eager, as make_llm sets): trees
    verified through the wrapped backend with specx's compiled Triton kernel. oracle: trees whose correct
    continuation sits on side branches only (tests/vllm/trees.py), else the random tree drafter's trees."""
    from tests.conftest import many_prompts
    from tests.vllm.trees import K, install_v2_oracle
    from vllm_specx.testing import assert_same_tokens, generate, make_llm, shutdown
    from vllm_specx.vllm_adapter import tree_step

    prompts = many_prompts(32)
    kwargs = dict(dtype=dtype, attention_config={"backend": backend}, async_scheduling=False)
    llm = make_llm(tiny_target, **kwargs)
    try:
        plain = generate(llm, prompts, max_tokens=24).token_ids
    finally:
        shutdown(llm)
    spec = {"method": "eagle3", "model": edd_tree_drafter, "num_speculative_tokens": K}
    llm = make_llm(tiny_target, spec, **kwargs)
    undo = None
    try:
        if oracle:
            runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
            undo = install_v2_oracle(runner, tiny_target, prompts, plain)
        before = dict(tree_step.STATS)
        res = generate(llm, prompts, max_tokens=24)
    finally:
        if undo is not None:
            undo()
        shutdown(llm)
    assert_same_tokens(plain, res.token_ids)
    assert tree_step.STATS["tree_requests"] > before["tree_requests"]
    assert tree_step.STATS["triton_attention_calls"] > before["triton_attention_calls"]
    if oracle:
        assert res.metrics.num_accepted_tokens >= 2.5 * res.metrics.num_drafts, res.metrics
