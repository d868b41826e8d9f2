"""Triton kernels of vllm-specx. Importable without vLLM; Triton itself is optional
(each kernel has a plain-torch reference that is used when Triton is unavailable)."""
