"""Prompt-lookup candidates beside the EDD drafter inside vLLM (CPU V1 runner): lossless, and they do get accepted."""

import json
import shutil

import pytest
import torch

from tests.conftest import many_prompts
from vllm_specx.core.early_stop import FEATURE_NAMES, train_early_stop
from vllm_specx.testing import assert_same_tokens, run_generate
from vllm_specx.training.early_stop_data import attach_early_stop

K = 4


@pytest.fixture(scope="module")
def edd_with_lookup(tiny_edd_drafter, tmp_path_factory):
    """The random tiny EDD drafter (its drafts are almost always rejected) keeping one token per step
    (a decision model that accepts depth 0 only), plus a lookup table, switched on."""
    g = torch.Generator().manual_seed(0)
    n = 3000
    feats = torch.rand(n, len(FEATURE_NAMES), generator=g) * torch.tensor([1.0, 1.0, 1.0, 12.0, 1.0, -30.0])
    feats[:, 4] = torch.randint(0, K, (n,), generator=g).float()
    model, _ = train_early_stop(feats, (feats[:, 4] == 0).float(), kind="mlp", epochs=20, seed=0)
    folder = tmp_path_factory.mktemp("edd_lookup") / "drafter"
    shutil.copytree(tiny_edd_drafter, folder)
    attach_early_stop(folder, model, {}, threshold=0.3)
    cfg = json.loads((folder / "specx_config.json").read_text())
    cfg["lookup"] = {"enabled": True, "first_accept": [0.3, 0.6, 0.8, 0.95], "deeper_accept": [0.6, 0.7, 0.85, 0.95]}
    (folder / "specx_config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_lookup_chains_are_lossless_and_accepted(tiny_target, edd_with_lookup, tiny_plain_outputs, monkeypatch):
    spec = {"method": "eagle3", "model": edd_with_lookup, "num_speculative_tokens": K}
    monkeypatch.setenv("SPECX_LOOKUP", "0")
    off = run_generate(tiny_target, many_prompts(64), spec, max_tokens=32)
    monkeypatch.setenv("SPECX_LOOKUP", "1")
    on = run_generate(tiny_target, many_prompts(64), spec, max_tokens=32)
    assert_same_tokens(tiny_plain_outputs["many"].token_ids, off.token_ids)
    assert_same_tokens(tiny_plain_outputs["many"].token_ids, on.token_ids)
    assert off.metrics.num_draft_tokens == off.metrics.num_drafts  # the drafter alone: one token per step
    assert on.metrics.num_draft_tokens > on.metrics.num_drafts  # lookup chains run deeper
    # the tiny target repeats itself (and half the prompts repeat a phrase): lookup chains get accepted,
    # also past depth 0, where the drafter alone never proposes anything
    assert off.metrics.accepted_per_pos[1:] == [0] * (K - 1)
    assert sum(on.metrics.accepted_per_pos[1:]) > 20
    assert on.metrics.num_accepted_tokens > off.metrics.num_accepted_tokens


def test_lookup_chains_mix_with_pct_trees_losslessly(tiny_target, edd_with_lookup, tiny_plain_outputs, monkeypatch):
    monkeypatch.setenv("SPECX_LOOKUP", "1")
    monkeypatch.setenv("SPECX_TREE", "1")
    spec = {"method": "eagle3", "model": edd_with_lookup, "num_speculative_tokens": K}
    res = run_generate(tiny_target, many_prompts(64), spec, max_tokens=32)
    assert_same_tokens(tiny_plain_outputs["many"].token_ids, res.token_ids)
    assert res.metrics.num_accepted_tokens > 32
