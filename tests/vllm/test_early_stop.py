"""MCSD early stop inside vLLM (CPU V1 runner): per-request draft lengths, lossless, switchable."""

import shutil

import pytest
import torch

from tests.conftest import many_prompts
from vllm_specx.core.early_stop import FEATURE_NAMES, train_early_stop
from vllm_specx.testing import assert_same_tokens, run_generate
from vllm_specx.training.early_stop_data import attach_early_stop

K = 3


@pytest.fixture(scope="module")
def edd_with_depth_rule(tiny_edd_drafter, tmp_path_factory):
    """The tiny EDD drafter plus a decision model that accepts depth 0 and rejects deeper tokens:
    every request must keep exactly one draft token per step."""
    g = torch.Generator().manual_seed(0)
    n = 3000
    # columns: top1, top2, margin, entropy, depth, log_path_conf, over the ranges a random drafter produces
    feats = torch.rand(n, len(FEATURE_NAMES), generator=g) * torch.tensor([1.0, 1.0, 1.0, 12.0, 1.0, -30.0])
    feats[:, 4] = torch.randint(0, K, (n,), generator=g).float()
    labels = (feats[:, 4] == 0).float()
    model, report = train_early_stop(feats, labels, kind="mlp", epochs=20, seed=0)
    assert report["auc"] > 0.99
    folder = tmp_path_factory.mktemp("edd_es") / "drafter"
    shutil.copytree(tiny_edd_drafter, folder)
    attach_early_stop(folder, model, report, threshold=0.5)
    return str(folder)


def test_early_stop_cuts_drafts_and_stays_lossless(tiny_target, edd_with_depth_rule, tiny_plain_outputs):
    spec = {"method": "eagle3", "model": edd_with_depth_rule, "num_speculative_tokens": K}
    res = run_generate(tiny_target, many_prompts(64), spec, max_tokens=32)
    assert_same_tokens(tiny_plain_outputs["many"].token_ids, res.token_ids)
    m = res.metrics
    assert m.num_drafts > 0
    assert m.num_draft_tokens == m.num_drafts  # one token per request per step, not K
    assert m.accepted_per_pos[1:] == [0] * (K - 1)


def test_switching_early_stop_off_gives_fixed_length_back(tiny_target, edd_with_depth_rule, tiny_plain_outputs,
                                                          monkeypatch):
    monkeypatch.setenv("SPECX_EARLY_STOP", "0")
    spec = {"method": "eagle3", "model": edd_with_depth_rule, "num_speculative_tokens": K}
    res = run_generate(tiny_target, many_prompts(64), spec, max_tokens=32)
    assert_same_tokens(tiny_plain_outputs["many"].token_ids, res.token_ids)
    assert res.metrics.num_drafts > 0 and res.metrics.num_draft_tokens == K * res.metrics.num_drafts
