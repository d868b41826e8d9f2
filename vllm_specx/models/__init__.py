"""Offline model materialisation: the real SmolLM2-135M-Instruct and Gemma-3-270M targets (from PyPI
packages) and tiny random-weight Llama and Gemma-3 targets for fast tests. Nothing here downloads from a
model hub."""

from __future__ import annotations

from vllm_specx.models.cache import cache_dir
from vllm_specx.models.gemma3 import Gemma3Unavailable, eagle3_target_kwargs, gemma3_path
from vllm_specx.models.smollm2 import SmolLM2Unavailable, smollm2_path
from vllm_specx.models.tiny import tiny_gemma3_path, tiny_llama_path

# Names accepted wherever a target folder is (`--target smollm2`, `vllm-specx serve gemma3`, ...).
NAMED_TARGETS = {"smollm2": smollm2_path, "gemma3": gemma3_path}


def user_prompt_ids(tok, text: str) -> list[int]:
    """A user turn as the target's prompt: its chat template with the generation prompt, or, for a base
    model without one (Gemma-3-270M), the text itself with the tokenizer's special tokens (<bos>)."""
    if not getattr(tok, "chat_template", None):
        return list(tok(text)["input_ids"])
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)


def user_prompt_text(tok, text: str) -> str:
    """As user_prompt_ids, as text for an engine that tokenizes it (which adds <bos> where the tokenizer does)."""
    if not getattr(tok, "chat_template", None):
        return text
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)


def end_of_turn_id(tok) -> int | None:
    """The token that ends an answer: ChatML's <|im_end|> where the vocabulary has it, else <eos>."""
    return tok.get_vocab().get("<|im_end|>", tok.eos_token_id)


def resolve_target(target: str) -> str:
    """A named target ('smollm2', 'gemma3') materialised on first use, or `target` itself (a folder or a
    model name) unchanged."""
    build = NAMED_TARGETS.get(target)
    return str(build()) if build is not None else target


__all__ = ["cache_dir", "smollm2_path", "SmolLM2Unavailable", "gemma3_path", "Gemma3Unavailable",
           "tiny_llama_path", "tiny_gemma3_path", "eagle3_target_kwargs", "NAMED_TARGETS", "resolve_target",
           "user_prompt_ids", "user_prompt_text", "end_of_turn_id"]
