"""TRITON_INTERPRET is set in tests/conftest.py (see there): it must be set before *any* test module
imports vllm_specx.kernels, and tests/core imports it too."""
