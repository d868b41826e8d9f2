"""Which attention backends a PCT tree step can run through, and their paged KV caches' layouts.

A tree step replaces the target's attention forward (`tree_step`): each backend named in
`TREE_BACKENDS` (checked in `compat.INTERNALS`, entries marked runner="trees") has its cache read through
K/V views [num_blocks, block_size, Hkv, D]; `tree_attention_problem` says at load why an engine cannot
verify trees (then they are off and chains are verified).
"""

from __future__ import annotations

import torch

def plain_attention_problem(impl) -> str | None:
    """Why an attention layer's impl cannot attend through tree masks (None: it can): specx's tree
    attention is plain softmax attention over an unquantized paged cache."""
    dtype = str(getattr(impl, "kv_cache_dtype", "auto"))
    if dtype.startswith(("fp8", "int", "nvfp", "turbo", "ultra")) or getattr(impl, "is_fp8_kv_cache", False):
        return f"quantized KV cache ({dtype}) is not supported"
    if getattr(impl, "alibi_slopes", None) is not None:
        return "ALiBi attention is not supported"
    if getattr(impl, "sliding_window", None) not in (None, -1, (-1, -1)):
        return "sliding-window attention is not supported"
    if getattr(impl, "logits_soft_cap", None) not in (None, 0, 0.0):
        return "attention logit soft-capping is not supported"
    if getattr(impl, "sinks", None) is not None:
        return "attention sinks are not supported"
    if getattr(impl, "dcp_world_size", 1) > 1:
        return "decode context parallelism is not supported"
    return None


def cpu_kv_views(kv_cache: torch.Tensor, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of vLLM-CPU's paged cache [num_blocks, Hkv, block_size, 2*D] as [num_blocks, block_size,
    Hkv, D] views (writable). With the `vec`/`vec16` kernels each (block, head) holds K transposed,
    [D, block_size], then V row-major, [block_size, D] (checked against vLLM's own cache writer in
    tests/vllm/test_tree_verify.py)."""
    if isa not in ("vec", "vec16"):
        raise NotImplementedError(f"vllm-specx tree verification knows vLLM-CPU's KV layout for the vec/vec16 "
                                  f"attention kernels, not {isa!r}; disable trees (SPECX_TREE=0)")
    nb, kvh, bs, two_d = kv_cache.shape
    d = two_d // 2
    kv = kv_cache.view(nb, kvh, 2 * bs, d)
    k = kv.as_strided((nb, kvh, d, bs), (kv.stride(0), kv.stride(1), bs, 1), kv.storage_offset())
    return k.permute(0, 3, 1, 2), kv[:, :, bs:].permute(0, 2, 1, 3)


def gpu_kv_views(impl, layer, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the GPU backends' paged cache (FlashAttention, Triton attention: logical [num_blocks,
    Hkv, block_size, 2*D], K then V along the last dim, any physical stride order) as [num_blocks,
    block_size, Hkv, D] views: the views their own forward and cache writer take."""
    key_cache, value_cache = kv_cache.transpose(1, 2).split(impl.head_size, dim=-1)
    return key_cache, value_cache


def _cpu_backend_views(impl, layer, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return cpu_kv_views(kv_cache, layer.isa)


# Attention backends whose forward a tree step runs through specx's tree attention, per platform:
# (module, impl class, its cache's K/V views). Checked in compat.py (entries marked runner="trees").
TREE_BACKENDS = {
    "cpu": (("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl", _cpu_backend_views),),
    "cuda": (("vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl", gpu_kv_views),
             ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl", gpu_kv_views)),
}


def _platform() -> str:
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda() else "other"


def _backend_entry(impl):
    """impl's entry in TREE_BACKENDS (any platform), or None. By exact class: a subclass may override
    forward (unwrapped) or keep another cache layout (e.g. FlashAttention's different-K/V-size variant)."""
    key = (type(impl).__module__, type(impl).__name__)
    return next((e for entries in TREE_BACKENDS.values() for e in entries if e[:2] == key), None)


def kv_views(attn_layer) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention layer's own paged cache (attn_layer.kv_cache, bound by vLLM) as K and V views
    [num_blocks, block_size, Hkv, D], for a backend in TREE_BACKENDS."""
    entry = _backend_entry(attn_layer.impl)
    if entry is None:
        raise NotImplementedError(f"vllm-specx trees: no KV layout known for {type(attn_layer.impl).__name__}")
    return entry[2](attn_layer.impl, attn_layer, attn_layer.kv_cache)


def tree_attention_problem(vllm_config) -> str | None:
    """Why this engine's target cannot verify trees (None: it can): every attention layer must use a
    backend in TREE_BACKENDS for this platform with plain attention (`plain_attention_problem`), and
    no CUDA graph may replay a tree step's attention (FULL decode graphs; PIECEWISE runs attention eagerly)."""
    import importlib

    platform = _platform()
    if platform not in TREE_BACKENDS:
        return f"no tree attention backend for this platform ({platform})"
    if platform == "cuda":
        mode = vllm_config.compilation_config.cudagraph_mode
        if mode is not None and mode.decode_mode().name == "FULL":
            return ("FULL CUDA graphs replay decode steps' attention; pass compilation_config="
                    "{'cudagraph_mode': 'PIECEWISE'} (or enforce_eager=True) for trees")
    classes = tuple(getattr(importlib.import_module(m), n) for m, n, _ in TREE_BACKENDS[platform])
    layers = vllm_config.compilation_config.static_forward_context
    checked = 0
    for name, layer in layers.items():
        impl = getattr(layer, "impl", None)
        if impl is None or not hasattr(layer, "kv_cache"):
            continue  # not an attention layer with a paged cache (e.g. Mamba state)
        checked += 1
        if type(impl) not in classes:  # exact class: see _backend_entry
            return (f"layer {name} uses {type(impl).__name__}; trees need {' or '.join(c.__name__ for c in classes)} "
                    f"(attention_config={{'backend': 'FLASH_ATTN'}} or 'TRITON_ATTN' on GPUs)")
        if getattr(getattr(layer, "attn_backend", None), "forward_includes_kv_cache_update", False):
            return f"layer {name}'s backend writes its KV cache inside forward (specx expects it written before)"
        problem = plain_attention_problem(impl)
        if problem is not None:
            return f"layer {name}: {problem}"
    if not checked:  # never pass a check that saw nothing
        return "no attention layer of the target is registered yet (vLLM's static_forward_context is empty)"
    return None
