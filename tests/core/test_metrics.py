import torch

from vllm_specx.core.metrics import expected_calibration_error, roc_auc


def test_ece_zero_for_perfectly_calibrated_bins():
    probs = torch.tensor([0.25] * 4 + [0.75] * 4)
    labels = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0], dtype=torch.float)
    assert expected_calibration_error(probs, labels, n_bins=10) < 1e-9


def test_ece_detects_overconfidence():
    probs = torch.full((100,), 0.9)
    labels = torch.zeros(100)
    assert abs(expected_calibration_error(probs, labels) - 0.9) < 1e-6


def test_auc_matches_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (200,), generator=g).float()
    labels = (torch.rand(200, generator=g) < 0.4).float()
    pos, neg = scores[labels > 0], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    expected = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()
    assert abs(roc_auc(scores, labels) - expected) < 1e-9
