"""The per-request draft-length controller used inside vLLM, driven by synthetic draft steps."""

import pytest
import torch

from vllm_specx.core.early_stop import FEATURE_NAMES, DraftLengthPolicy, train_early_stop
from vllm_specx.vllm_adapter.draft_length import ChainStopController, _AllStopped


@pytest.fixture(scope="module")
def confidence_model():
    """Acceptance probability ~ top-1 probability (learned from synthetic Bernoulli labels)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(4000, len(FEATURE_NAMES), generator=g) * torch.tensor([1, 1, 1, 10, 5, -20.0])
    labels = torch.bernoulli(feats[:, 0], generator=g)
    model, report = train_early_stop(feats, labels, kind="mlp", epochs=30, seed=0)
    assert report["auc"] > 0.7
    return model


def _logits(top1_probs):  # [B] -> [B, V] logits whose softmax has that top-1 probability
    v = 50
    p = torch.tensor(top1_probs)[:, None]
    probs = torch.cat([p, (1 - p).expand(-1, v - 1) / (v - 1)], dim=1)
    return probs.log()


def test_requests_stop_at_their_own_depth_and_the_loop_ends_when_all_stop(confidence_model):
    ctl = ChainStopController(DraftLengthPolicy(4, confidence_model), None, lambda b: 0.3)
    ctl.begin(armed=True)
    hidden = torch.randn(3, 8)
    ctl.observe(hidden, _logits([0.95, 0.95, 0.1]))  # request 2 stops at depth 0
    ctl.observe(hidden, _logits([0.95, 0.1, 0.1]))  # request 1 stops at depth 1
    with pytest.raises(_AllStopped) as stop:
        ctl.observe(hidden, _logits([0.1, 0.1, 0.1]))  # request 0 stops at depth 2: all stopped
    assert stop.value.tokens.shape == (3, 2)  # tokens of depths 0..1, the longest kept
    assert ctl.finish() == [2, 1, 0]
    assert ctl.finish() is None  # consumed: a step without drafting never reuses old lengths


def test_unarmed_controller_changes_nothing(confidence_model):
    ctl = ChainStopController(DraftLengthPolicy(4, confidence_model), None, lambda b: 0.3)
    ctl.begin(armed=False)  # e.g. probabilistic drafts: fixed K
    ctl.observe(torch.randn(2, 8), _logits([0.1, 0.1]))
    assert ctl.finish() is None


def test_threshold_follows_batch_size(confidence_model):
    """A higher node threshold (bigger batch) keeps fewer tokens for the same drafts."""
    kept = {}
    for batch_threshold in (0.2, 0.9):
        ctl = ChainStopController(DraftLengthPolicy(3, confidence_model), None, lambda b, t=batch_threshold: t)
        ctl.begin(armed=True)
        try:
            for _ in range(3):
                ctl.observe(torch.randn(1, 8), _logits([0.8]))
        except _AllStopped:
            pass
        kept[batch_threshold] = ctl.finish()[0]
    assert kept[0.2] > kept[0.9]
