"""SPECX_LLM_KWARGS: engine arguments for every engine the harness starts (benchmarks, calibrate, demo),
e.g. a GPU's compiled PIECEWISE graphs and synchronous scheduling (benchmarks/run_pct_smollm2_gpu.sh)."""

import pytest

from vllm_specx import testing


def test_unset_means_no_override(monkeypatch):
    monkeypatch.delenv("SPECX_LLM_KWARGS", raising=False)
    assert testing.llm_kwargs_from_env() == {}


def test_bad_values_name_the_variable_and_the_fix(monkeypatch):
    monkeypatch.setenv("SPECX_LLM_KWARGS", "{enforce_eager: false")
    with pytest.raises(ValueError, match="SPECX_LLM_KWARGS is not valid JSON.*JSON object"):
        testing.llm_kwargs_from_env()
    monkeypatch.setenv("SPECX_LLM_KWARGS", "[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        testing.llm_kwargs_from_env()


def test_make_llm_lets_the_environment_override_defaults_and_arguments(monkeypatch):
    import vllm

    seen = {}
    monkeypatch.setattr(vllm, "LLM", lambda model, **kwargs: seen.update(kwargs, model=model))
    monkeypatch.setenv("SPECX_LLM_KWARGS", '{"enforce_eager": false, "dtype": "bfloat16", '
                                           '"compilation_config": {"cudagraph_mode": "PIECEWISE"}}')
    testing.make_llm("target", {"method": "eagle3"}, dtype="float32", max_num_seqs=8)
    assert seen["enforce_eager"] is False and seen["dtype"] == "bfloat16" and seen["max_num_seqs"] == 8
    assert seen["compilation_config"] == {"cudagraph_mode": "PIECEWISE"}
    assert seen["speculative_config"] == {"method": "eagle3"} and seen["model"] == "target"
