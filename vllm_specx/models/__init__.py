"""Offline model materialisation: the real SmolLM2-135M-Instruct target (from a PyPI wheel) and
tiny random-weight Llama targets for fast tests. Nothing here downloads from a model hub."""

from vllm_specx.models.cache import cache_dir
from vllm_specx.models.smollm2 import SmolLM2Unavailable, smollm2_path
from vllm_specx.models.tiny import tiny_llama_path

__all__ = ["cache_dir", "smollm2_path", "SmolLM2Unavailable", "tiny_llama_path"]
