"""vllm-specx: lossless speculative decoding for vLLM (EDD drafter, PCT trees, SpecVocab, early stop).

Layout:
  core/         engine-free algorithms (tensors in, tensors out; no vLLM imports)
  kernels/      Triton kernels, each with a plain-torch reference beside it
  vllm_adapter/ the only code that touches vLLM internals (see vllm_adapter/compat.py)
  models/       offline model materialisation (SmolLM2 from PyPI, tiny random targets)
  training/     the drafter training pipeline (`vllm-specx train`)
"""

__version__ = "0.1.0"
