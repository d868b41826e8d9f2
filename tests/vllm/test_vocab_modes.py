"""The EDD drafter's three vocabulary modes in real vLLM: lossless, and each mode really drafts from its subset."""

import shutil

import pytest
import torch

from tests.conftest import PROMPTS, many_prompts
from vllm_specx.testing import assert_same_tokens, run_generate, specx_counter

K = 3


def _target_head(tiny_target) -> torch.Tensor:
    from pathlib import Path

    from safetensors import safe_open

    with safe_open(str(Path(tiny_target) / "model.safetensors"), "pt") as f:
        name = "lm_head.weight" if "lm_head.weight" in f.keys() else "model.embed_tokens.weight"
        return f.get_tensor(name).float()


def _drafter_with_vocab(tiny_edd_drafter, tmp_path, mode, *, num_candidates=2048, fixed_ids=None, rank=16,
                        max_batch=64):
    from vllm_specx.core.spec_vocab import svd_projection
    from vllm_specx.training.vocab_fit import save_vocab

    folder = tmp_path / f"edd_{mode}"
    shutil.copytree(tiny_edd_drafter, folder)
    from vllm_specx.models import tiny_llama_path

    head = _target_head(str(tiny_llama_path()))
    proj_a, proj_b = svd_projection(head, rank)
    ids = torch.arange(head.shape[0]) if fixed_ids is None else fixed_ids
    save_vocab(folder, proj_a, proj_b, ids, {"rank": rank, "num_candidates": num_candidates, "return_topk": 8,
                                                  "max_batch": max_batch}, mode)
    return str(folder)


def _spec(drafter):
    return {"method": "eagle3", "model": drafter, "num_speculative_tokens": K}


@pytest.fixture(scope="module")
def full_mode_run(tiny_target, tiny_edd_drafter):
    return run_generate(tiny_target, PROMPTS, _spec(tiny_edd_drafter), max_tokens=48)


def test_speculative_vocab_with_every_token_a_candidate_drafts_what_the_full_head_drafts(
        tiny_target, tiny_edd_drafter, tiny_plain_outputs, full_mode_run, tmp_path):
    drafter = _drafter_with_vocab(tiny_edd_drafter, tmp_path, "speculative", num_candidates=49152)
    res = run_generate(tiny_target, PROMPTS, _spec(drafter), max_tokens=48)
    assert_same_tokens(tiny_plain_outputs["base"].token_ids, res.token_ids)
    # same drafts => the same tokens accepted at every position
    assert res.metrics.accepted_per_pos == full_mode_run.metrics.accepted_per_pos
    assert res.metrics.num_drafts == full_mode_run.metrics.num_drafts > 0


def test_speculative_vocab_with_few_candidates_is_lossless_on_64_prompts(tiny_target, tiny_edd_drafter,
                                                                         tiny_plain_outputs, tmp_path):
    drafter = _drafter_with_vocab(tiny_edd_drafter, tmp_path, "speculative", num_candidates=64, rank=4)
    res = run_generate(tiny_target, many_prompts(64), _spec(drafter), max_tokens=32)
    assert_same_tokens(tiny_plain_outputs["many"].token_ids, res.token_ids)
    assert res.metrics.num_draft_tokens == K * res.metrics.num_drafts > 0


def test_fixed_vocab_drafts_only_from_its_ids(tiny_target, tiny_edd_drafter, tiny_plain_outputs, full_mode_run,
                                               tmp_path):
    """A fixed vocabulary that holds none of the tokens plain decoding produces can never be accepted;
    outputs stay exact."""
    produced = {t for seq in tiny_plain_outputs["base"].token_ids for t in seq}
    allowed = torch.tensor([t for t in range(49152) if t not in produced])
    drafter = _drafter_with_vocab(tiny_edd_drafter, tmp_path, "fixed", fixed_ids=allowed)
    res = run_generate(tiny_target, PROMPTS, _spec(drafter), max_tokens=48)
    assert_same_tokens(tiny_plain_outputs["base"].token_ids, res.token_ids)
    assert res.metrics.num_drafts > 0 and res.metrics.num_accepted_tokens == 0
    assert full_mode_run.metrics.num_accepted_tokens > 0  # the full head does get accepted


def test_env_switch_overrides_the_checkpoint_mode(tiny_target, tiny_edd_drafter, tiny_plain_outputs, full_mode_run,
                                                  tmp_path, monkeypatch):
    produced = {t for seq in tiny_plain_outputs["base"].token_ids for t in seq}
    allowed = torch.tensor([t for t in range(49152) if t not in produced])
    drafter = _drafter_with_vocab(tiny_edd_drafter, tmp_path, "fixed", fixed_ids=allowed)
    monkeypatch.setenv("SPECX_VOCAB", "full")
    res = run_generate(tiny_target, PROMPTS, _spec(drafter), max_tokens=48)
    assert res.metrics.accepted_per_pos == full_mode_run.metrics.accepted_per_pos


def test_missing_vocab_file_is_refused_at_startup(tiny_target, tiny_edd_drafter, tmp_path):
    from tests.vllm.test_drafter_errors import _start_error

    drafter = _drafter_with_vocab(tiny_edd_drafter, tmp_path, "speculative")
    (tmp_path / "edd_speculative" / "vocab" / "vocab.safetensors").unlink()
    text = _start_error(tiny_target, drafter)
    assert "vocab.safetensors" in text and "--stages vocab" in text, text[-2000:]


def test_vocab_tensors_for_another_model_are_refused(tiny_target, tiny_edd_drafter, tmp_path):
    from tests.vllm.test_drafter_errors import _start_error
    from vllm_specx.training.vocab_fit import save_vocab

    drafter = _drafter_with_vocab(tiny_edd_drafter, tmp_path, "speculative")
    save_vocab(drafter, torch.zeros(128, 8), torch.zeros(1000, 8), torch.arange(10), {"num_candidates": 64})
    text = _start_error(tiny_target, drafter)
    assert "do not fit" in text and "another model" in text, text[-2000:]


def test_subset_head_refuses_tensor_parallel():
    from vllm_specx.checkpoint import SpecxConfig, SpecxConfigError, TargetSignature
    from vllm_specx.vllm_adapter.vocab_head import build_vocab_head

    specx = SpecxConfig(drafter="edd", target=TargetSignature("LlamaForCausalLM", 100, 8, 2), vocab_mode="fixed",
                        vocab={"path": "vocab.safetensors"}).validate()
    with pytest.raises(SpecxConfigError, match="tensor_parallel_size=2"):
        build_vocab_head("/nonexistent", specx, "fixed", 100, 8, torch.device("cpu"), tensor_parallel_size=2)


def test_drafted_trees_with_a_speculative_vocabulary_are_lossless(tiny_target, edd_tree_drafter, tiny_plain_outputs,
                                                                   tmp_path):
    """PCT trees read their runner-up children from the subset head's top-k log-probs."""
    from vllm_specx.vllm_adapter import tree_step

    drafter = _drafter_with_vocab(edd_tree_drafter, tmp_path, "speculative", num_candidates=64, rank=4)
    before = dict(tree_step.STATS)
    res = run_generate(tiny_target, many_prompts(64), {"method": "eagle3", "model": drafter,
                                                       "num_speculative_tokens": 5}, max_tokens=32)
    assert_same_tokens(tiny_plain_outputs["many"].token_ids, res.token_ids)
    assert tree_step.STATS["tree_requests"] > before["tree_requests"]
    assert 2 * res.metrics.num_drafts < res.metrics.num_draft_tokens  # side branches were drafted


def test_calibrate_writes_a_cost_model_per_vocab_mode(tiny_edd_drafter, tmp_path, monkeypatch):
    from vllm_specx.calibrate import default_cost_model_path

    drafter = _drafter_with_vocab(tiny_edd_drafter, tmp_path, "speculative")
    monkeypatch.delenv("SPECX_VOCAB", raising=False)
    assert default_cost_model_path(drafter).name == "cost_model.json"  # the checkpoint's own mode
    monkeypatch.setenv("SPECX_VOCAB", "full")
    assert default_cost_model_path(drafter).name == "cost_model.full.json"
    monkeypatch.setenv("SPECX_VOCAB", "tiny")
    with pytest.raises(Exception, match="SPECX_VOCAB='tiny'"):
        default_cost_model_path(drafter)


def test_speculative_head_hands_large_batches_to_the_full_head(tiny_target, tiny_edd_drafter, tiny_plain_outputs,
                                                               tmp_path, monkeypatch):
    """Above vocab.max_batch rows the full head drafts (per-row subsets no longer pay); both paths lossless."""
    from vllm_specx.vllm_adapter.vocab_head import VocabSubsetHead

    rows_seen = []
    orig = VocabSubsetHead.forward

    def counting_forward(self, hidden, lm_head_weight, **kwargs):
        rows_seen.append(hidden.shape[0])
        return orig(self, hidden, lm_head_weight, **kwargs)

    monkeypatch.setattr(VocabSubsetHead, "forward", counting_forward)  # the engine runs in this process

    def rows(name):
        return specx_counter(f"vocab_{name}_rows")

    before = rows("subset"), rows("full")
    drafter = _drafter_with_vocab(tiny_edd_drafter, tmp_path, "speculative", num_candidates=64, max_batch=1)
    res = run_generate(tiny_target, PROMPTS, _spec(drafter), max_tokens=48, llm_kwargs={"max_num_seqs": 8})
    assert_same_tokens(tiny_plain_outputs["base"].token_ids, res.token_ids)
    # 8 requests in flight: the subset head ran only on steps with one row left, the full head on the rest
    assert rows_seen and set(rows_seen) == {1}, sorted(set(rows_seen))
    assert len(rows_seen) < K * res.metrics.num_drafts
    # the same split on specx's Prometheus counters
    assert rows("subset") - before[0] == len(rows_seen) and rows("full") - before[1] > 0
