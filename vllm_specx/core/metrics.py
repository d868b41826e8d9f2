"""Calibration and ranking metrics shared by PCT (draft confidence) and the early-stop model."""

from __future__ import annotations

import torch


def expected_calibration_error(
    probs: torch.Tensor,  # [N] predicted probability of the positive event
    labels: torch.Tensor,  # [N] 0/1 (or fractional) outcome
    n_bins: int = 15,
) -> float:
    """ECE with equal-width bins: sum_b |B|/N * |mean(probs_b) - mean(labels_b)|."""
    probs = probs.detach().double().flatten()
    labels = labels.detach().double().flatten()
    if probs.numel() == 0:
        return float("nan")
    bins = torch.clamp((probs * n_bins).long(), max=n_bins - 1)
    count = torch.bincount(bins, minlength=n_bins).double()
    sum_p = torch.bincount(bins, weights=probs, minlength=n_bins)
    sum_y = torch.bincount(bins, weights=labels, minlength=n_bins)
    nonempty = count > 0
    gap = (sum_p[nonempty] - sum_y[nonempty]).abs()
    return float(gap.sum() / probs.numel())


def reliability_bins(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> list[dict[str, float]]:
    """Per-bin (mean confidence, observed frequency, count), for reliability plots."""
    probs = probs.detach().double().flatten()
    labels = labels.detach().double().flatten()
    bins = torch.clamp((probs * n_bins).long(), max=n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = bins == b
        n = int(sel.sum())
        if n:
            out.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "confidence": float(probs[sel].mean()),
                        "frequency": float(labels[sel].mean()), "count": n})
    return out


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    scores = scores.detach().double().flatten()
    labels = labels.detach().flatten() > 0.5
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.double)
    # average ranks over ties
    uniq, inverse = torch.unique(sorted_scores, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.double).index_add_(0, inverse, ranks[order])
    cnts = torch.bincount(inverse, minlength=uniq.numel()).double()
    ranks[order] = (sums / cnts)[inverse]
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))
