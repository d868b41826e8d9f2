"""Opt-in drafting-time counters (SPECX_PROFILE_DRAFT=1), read by benchmarks in the engine's process.

  propose_s / propose_calls  the whole drafter per target step (all depths, any drafter on vLLM's
                             EAGLE-style proposer: EDD, EAGLE-3, ...)
  head_s / head_calls        the EDD drafter's LM head (`compute_logits`) per draft depth, i.e. the
                             part the vocabulary modes change
On a GPU every timed region synchronises the device, which perturbs the timings it measures; use it
to compare modes, not to report end-to-end speed.
"""

from __future__ import annotations

import functools
import os
import time
from contextlib import contextmanager

import torch

STATS = {"propose_calls": 0, "propose_s": 0.0, "head_calls": 0, "head_s": 0.0}


def enabled() -> bool:
    return os.environ.get("SPECX_PROFILE_DRAFT", "0") == "1"


def reset() -> None:
    STATS.update(propose_calls=0, propose_s=0.0, head_calls=0, head_s=0.0)


def summary() -> dict:
    s = dict(STATS)
    s["propose_ms_per_call"] = 1e3 * s["propose_s"] / s["propose_calls"] if s["propose_calls"] else None
    s["head_ms_per_call"] = 1e3 * s["head_s"] / s["head_calls"] if s["head_calls"] else None
    return s


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(kind: str, device: torch.device | None = None):
    if not enabled():
        yield
        return
    _sync(device)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _sync(device)
        STATS[f"{kind}_s"] += time.perf_counter() - t0
        STATS[f"{kind}_calls"] += 1


def install() -> None:
    """Time SpecDecodeBaseProposer.propose (idempotent; a no-op unless SPECX_PROFILE_DRAFT=1)."""
    if not enabled():
        return
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    orig = SpecDecodeBaseProposer.propose
    if getattr(orig, "__specx_profiled__", False):
        return

    @functools.wraps(orig)
    def propose(self, *args, **kwargs):
        with timed("propose", getattr(self, "device", None)):
            return orig(self, *args, **kwargs)

    propose.__specx_profiled__ = True
    SpecDecodeBaseProposer.propose = propose
