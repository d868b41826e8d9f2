"""The EDD drafter under vLLM's V2 model runner (the GPU build's default), run on CPU (tests/vllm/v2_cpu.py).

V2 drives the drafter through its own EAGLE speculator (`vllm/v1/worker/gpu/spec_decode/`), not V1's
proposer: these tests check that it is really that code path, that greedy output equals plain decoding,
and that V2 drafts exactly what V1 drafts with the same drafter (the same tokens accepted at every draft
position over the batch), i.e. V2 hands the drafter the same hidden states, positions, tokens and shared
embedding / LM head. Under V2 specx's early stop, trees and lookup chains are off (their hooks are V1's):
a drafter that ships them drafts a fixed K there, still losslessly.
"""

import multiprocessing

import pytest
import torch

from tests.conftest import PROMPTS
from tests.vllm.test_vocab_modes import _drafter_with_vocab
from tests.vllm.trees import K as TREE_K
from vllm_specx.testing import assert_same_tokens, recording_drafts, run_generate

# On a CUDA machine vLLM's default runner is V2 already, and this CPU stand-in does not apply.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the V2 runner on CPU; a GPU's default")

K = 3
MAX_TOKENS = 48  # tiny_plain_outputs["base"]: PROMPTS, 48 tokens


def _spec(drafter: str, k: int = K) -> dict:
    return {"method": "eagle3", "model": drafter, "num_speculative_tokens": k}


@pytest.fixture(scope="module")
def drafters(tiny_edd_drafter, edd_tree_drafter, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v2")
    vocab = _drafter_with_vocab(tiny_edd_drafter, tmp, "speculative", num_candidates=64, rank=4)
    return {"edd": (_spec(tiny_edd_drafter), {}),
            "edd_speculative_vocab": (_spec(vocab), {}),
            # ships early stop + PCT trees; V1 reference with them switched off (what V2 falls back to)
            "edd_early_stop_trees": (_spec(edd_tree_drafter, TREE_K), {"SPECX_EARLY_STOP": "0"})}


@pytest.fixture(scope="module")
def v2_runs(tiny_target, drafters):
    from tests.vllm.v2_cpu import generate_under_v2

    runs = [(tiny_target, PROMPTS, spec, MAX_TOKENS) for spec, _ in drafters.values()]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        results = pool.apply(generate_under_v2, (runs,))
    return dict(zip(drafters, results))


def assert_same_draft_steps(v2_drafts: list[list[int]], v1_drafts: list[list[int]], k: int) -> None:
    """Every drafter call under V2 proposed the same tokens for the same requests as the V1 runner's call
    in the same place (rows compared as sets: the runners may order a batch differently). vLLM 0.33's V2
    runner skips drafting in a step after which no scheduled request can use drafts (every request of the
    step finishes; `SchedulerOutput.skip_drafts`), where V1 drafts anyway: V2 may leave out such whole
    steps (k calls each), which are never verified; nothing else may differ."""
    v2 = [sorted(d) for d in v2_drafts]
    v1 = [sorted(d) for d in v1_drafts]
    assert v2, "no drafter call under V2"
    skipped = len(v1) - len(v2)
    assert skipped in (0, k, 2 * k), f"V2 made {len(v2)} drafter calls, V1 {len(v1)} (K = {k})"
    if skipped == 0:
        assert v2 == v1
    else:
        rest = iter(v1)
        assert all(any(call == later for later in rest) for call in v2), "V2's drafts are not V1's"


def _v1_run(tiny_target, spec, env, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with recording_drafts() as drafts:
        res = run_generate(tiny_target, PROMPTS, spec, max_tokens=MAX_TOKENS)
    return res, drafts


@pytest.mark.parametrize("name", ["edd", "edd_speculative_vocab", "edd_early_stop_trees"])
def test_v2_runner_drafts_like_v1_and_equals_plain(name, tiny_target, tiny_plain_outputs, drafters, v2_runs,
                                                    monkeypatch):
    res, drafts, runner_mro, speculator, drafter = v2_runs[name]
    # really the V2 runner and its EAGLE speculator, driving specx's drafter class
    assert "vllm.v1.worker.gpu.model_runner.GPUModelRunner" in runner_mro
    assert "vllm.v1.worker.gpu_model_runner.GPUModelRunner" not in runner_mro  # V1's
    assert speculator.startswith("vllm.v1.worker.gpu.spec_decode.")
    assert drafter == "vllm_specx.vllm_adapter.edd_model.SpecxEddForCausalLM"

    assert_same_tokens(tiny_plain_outputs["base"].token_ids, res.token_ids)
    spec, env = drafters[name]
    k = spec["num_speculative_tokens"]
    assert res.metrics.num_drafts > 0 and res.metrics.num_draft_tokens == k * res.metrics.num_drafts  # fixed K
    v1, v1_drafts = _v1_run(tiny_target, spec, env, monkeypatch)
    # The drafts depend on the target's hidden states: feeding V2's drafter its hidden states one row off
    # changes 9 of 138 draft steps here.
    assert_same_draft_steps(drafts, v1_drafts, k)
    assert (res.metrics.num_drafts, res.metrics.accepted_per_pos) == (v1.metrics.num_drafts,
                                                                      v1.metrics.accepted_per_pos)
