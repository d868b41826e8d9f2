"""Stage `early-stop` of `vllm-specx train`: features and labels for the MCSD decision model.

The trained drafter is run over recorded sequences in chain blocks of `k` draft steps (tiled at
every offset). A draft step at depth d is a training example only if steps 0..d-1 of its block
were accepted: then the teacher-forced inputs equal what chain drafting would have fed it, and
the label is exactly "accepted given the path so far" (greedy: draft argmax == target's token;
the recorded responses are the target's own greedy outputs). Engine-free: tensors in, tensors out.
"""

from __future__ import annotations

import torch

from vllm_specx.core.early_stop import draft_step_features, topk_and_entropy


@torch.no_grad()
def collect_early_stop_examples(
    drafter, records: list[dict], k: int, hidden_proj: torch.Tensor | None = None, max_offsets: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (features [N, F], labels [N] 0/1) for greedy chain drafting with up to k tokens."""
    from vllm_specx.training.fit import _collate

    drafter.eval()
    feats, labels = [], []
    offsets = range(k if max_offsets is None else min(k, max_offsets))
    for r in records:
        tokens, hidden, _, _, mask = _collate([r], [0], 10**9)
        s = tokens.shape[1]
        if s < 3:
            continue
        slot = torch.arange(s)
        for offset in offsets:
            starts = torch.where(slot < offset, torch.zeros_like(slot), (slot - offset) // k * k + offset)[None]
            out = drafter.forward_blocks(tokens, hidden, starts)[0, : s - 2]  # [S-2, H]
            logits = drafter.logits(out)  # [S-2, V]
            top, entropy = topk_and_entropy(logits, k=2)
            pred = logits.argmax(-1)
            ok = pred == tokens[0, 2:]  # slot q predicts x_{q+2}
            depth = slot[: s - 2] - starts[0, : s - 2]
            valid = mask[0, : s - 2]
            # within a block: path confidence and "all earlier steps accepted", by a prefix product
            path_conf = torch.ones(s - 2)
            prefix_ok = torch.ones(s - 2, dtype=torch.bool)
            for d in range(1, k):  # k is small; vectorised over the sequence
                here = depth == d
                prev = torch.nonzero(here).flatten() - 1
                path_conf[here] = path_conf[prev] * top[prev, 0]
                prefix_ok[here] = prefix_ok[prev] & ok[prev] & valid[prev]
            keep = valid & prefix_ok & (depth < k)
            normed = drafter.norm(out)  # what vLLM hands compute_logits (and our controller) per step
            f = draft_step_features(normed[keep], top[keep], entropy[keep], depth[keep], path_conf[keep], hidden_proj)
            feats.append(f)
            labels.append(ok[keep].float())
    return torch.cat(feats), torch.cat(labels)


def train_decision_model(drafter, train_recs: list[dict], val_recs: list[dict], k: int, out_dir, seed: int = 0,
                         max_train_records: int = 300, hidden_proj_dim: int = 8) -> dict:
    """Fit the MLP decision model and the confidence-only logistic baseline on the same examples,
    save the MLP beside the drafter (`<out>/early_stop/`) and record both reports in specx_config.json."""
    from pathlib import Path

    from vllm_specx.core.early_stop import make_hidden_projection, train_early_stop

    out = Path(out_dir)
    proj = make_hidden_projection(drafter.cfg.hidden_size, hidden_proj_dim, seed)
    recs = list(val_recs) + list(train_recs[:max_train_records])
    feats, labels = collect_early_stop_examples(drafter, recs, k=k, hidden_proj=proj, max_offsets=2)
    mlp, mlp_report = train_early_stop(feats, labels, kind="mlp", seed=seed, hidden_proj=proj)
    confidence_cols = feats[:, :6]  # the logistic baseline reads draft confidence features only
    _, logistic_report = train_early_stop(confidence_cols, labels, kind="logistic", seed=seed)
    report = {"mlp": _brief(mlp_report), "logistic_confidence": _brief(logistic_report),
              "examples": int(labels.numel()), "k": k}
    attach_early_stop(out, mlp, report)
    return report


def attach_early_stop(drafter_dir, model, report: dict | None = None, threshold: float | None = None) -> None:
    """Save a decision model beside a drafter and switch it on in its specx_config.json.
    threshold: fixed node threshold (default: the drafter's cost model if calibrated, else a constant)."""
    import json
    from pathlib import Path

    from vllm_specx.checkpoint import SPECX_CONFIG_NAME, load_specx_config
    from vllm_specx.core.early_stop import save_early_stop

    out = Path(drafter_dir)
    save_early_stop(model, out / "early_stop")
    specx = load_specx_config(out)
    specx.early_stop = {"path": "early_stop", "kind": model.kind, "report": report or {}}
    if threshold is not None:
        specx.early_stop["threshold"] = threshold
    (out / SPECX_CONFIG_NAME).write_text(json.dumps(specx.validate().to_dict(), indent=2))


def _brief(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "reliability"}
