"""Stage `vocab` of `vllm-specx train`: the SpecVocab projection and the fixed reduced vocabulary.

Both are fitted to a trained EDD drafter (frozen) on the training records, and saved beside it in
vocab/vocab.safetensors; specx_config.json gets a `vocab` section with the sizes and a held-out report.

  speculative  proj_a [H, r], proj_b [V, r], initialised from the best rank-r factorisation of the LM
               head (SVD) and trained with the auxiliary loss `core.spec_vocab.projection_loss` on the
               drafter's normed hidden states: teachers are the drafter's own full-vocabulary top-t
               (the subset must contain what the full head would propose) and the target's recorded
               top-k (what will be accepted).
  fixed        the N most frequent tokens of the training sequences (+ EOS), FR-Spec style.

Held-out report: how often the full head's argmax (= the token the full-vocabulary drafter drafts)
and the target's argmax fall in the candidate set, before (SVD) and after training, and for the
fixed set. The subset head drafts exactly the full head's token whenever that token is a candidate.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from vllm_specx.core.edd import random_block_starts
from vllm_specx.core.spec_vocab import candidate_recall, fixed_vocab_from_counts, projection_loss, svd_projection
from vllm_specx.kernels.vocab_select import select_candidates_reference

VOCAB_FILE = "vocab/vocab.safetensors"  # a subfolder: vLLM loads every top-level *.safetensors as weights


@torch.no_grad()
def collect_draft_states(drafter, records: list[dict], max_tokens: int, seed: int, max_block: int = 6,
                         teacher_topk: int = 16) -> dict[str, torch.Tensor]:
    """Normed draft hidden states [N, H] under random drafting blocks, with the drafter's own top-t
    (ids, logits) and the target's recorded top-k (ids, log-probs) for the token each state predicts."""
    from vllm_specx.training.fit import _collate

    drafter.eval()
    gen = torch.Generator().manual_seed(seed)
    out = {"hidden": [], "draft_ids": [], "draft_lp": [], "target_ids": [], "target_lp": []}
    n = 0
    for i in tqdm(range(len(records)), desc="draft states", unit="seq"):
        tokens, hidden, topk_ids, topk_lp, mask = _collate(records, [i], 10**9)
        starts = random_block_starts(1, tokens.shape[1], 1, max_block, gen)
        h = drafter.norm(drafter.forward_blocks(tokens, hidden, starts))[mask]  # [n, H]
        logits = torch.nn.functional.linear(h, drafter.lm_head_weight.to(h.dtype)).float()  # [n, V]
        d_lp, d_ids = torch.log_softmax(logits, -1).topk(teacher_topk, dim=-1)
        for key, val in zip(out, (h, d_ids, d_lp, topk_ids[mask], topk_lp[mask].float())):
            out[key].append(val)
        n += h.shape[0]
        if n >= max_tokens:
            break
    return {k: torch.cat(v)[:max_tokens] for k, v in out.items()}


@torch.no_grad()
def recall_report(states: dict, proj_a: torch.Tensor, proj_b: torch.Tensor, num_candidates: int,
                  fixed_ids: torch.Tensor | None = None, chunk: int = 512) -> dict:
    n = states["hidden"].shape[0]
    hits_d = hits_t = 0.0
    for s in range(0, n, chunk):  # recall per chunk, weighted by the chunk's size (the last is shorter)
        cand = select_candidates_reference(states["hidden"][s:s + chunk], proj_a, proj_b, num_candidates)
        rows = cand.shape[0]
        hits_d += rows * candidate_recall(cand, states["draft_ids"][s:s + chunk, 0])
        hits_t += rows * candidate_recall(cand, states["target_ids"][s:s + chunk, 0])
    report = {"draft_top1_in_candidates": hits_d / n, "target_top1_in_candidates": hits_t / n}
    if fixed_ids is not None:
        in_fixed = torch.zeros(proj_b.shape[0], dtype=torch.bool)
        in_fixed[fixed_ids] = True
        report["draft_top1_in_fixed"] = float(in_fixed[states["draft_ids"][:, 0]].float().mean())
        report["target_top1_in_fixed"] = float(in_fixed[states["target_ids"][:, 0]].float().mean())
    return report


def fit_projection(states: dict, proj_a: torch.Tensor, proj_b: torch.Tensor, steps: int, lr: float,
                   batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Adam on the auxiliary loss (drafter top-t + target top-k teachers); returns trained copies."""
    a = proj_a.clone().requires_grad_(True)
    b = proj_b.clone().requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    rng = random.Random(seed)
    n = states["hidden"].shape[0]
    curve = []
    for step in tqdm(range(steps), desc="vocab projection", unit="step"):
        idx = torch.tensor(rng.sample(range(n), min(batch, n)))
        h = states["hidden"][idx]
        loss = (projection_loss(h, a, b, states["draft_ids"][idx], states["draft_lp"][idx])
                + projection_loss(h, a, b, states["target_ids"][idx], states["target_lp"][idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        curve.append(float(loss.detach()))
    return a.detach(), b.detach(), curve


def train_vocab_head(drafter, train_recs: list[dict], val_recs: list[dict], out_dir, *, rank: int = 64,
                     num_candidates: int = 2048, fixed_size: int = 32768, return_topk: int = 16,
                     steps: int = 300, lr: float = 3e-3, batch: int = 1024, max_tokens: int = 60000,
                     always_include: list[int] = (), seed: int = 0, command: str = "") -> dict:
    out = Path(out_dir)
    lm_head = drafter.lm_head_weight.float()
    vocab_size = lm_head.shape[0]
    train = collect_draft_states(drafter, train_recs, max_tokens, seed)
    val = collect_draft_states(drafter, val_recs, max(2000, max_tokens // 10), seed + 1)

    counts = torch.zeros(vocab_size, dtype=torch.long)
    for r in train_recs:
        counts += torch.bincount(r["tokens"], minlength=vocab_size)[:vocab_size]
    fixed_ids = fixed_vocab_from_counts(counts, min(fixed_size, vocab_size),
                                        always_include)

    proj_a0, proj_b0 = svd_projection(lm_head, rank)
    before = recall_report(val, proj_a0, proj_b0, num_candidates, fixed_ids)
    proj_a, proj_b, curve = fit_projection(train, proj_a0, proj_b0, steps, lr, batch, seed)
    after = recall_report(val, proj_a, proj_b, num_candidates)
    report = {"val_svd_init": before, "val_trained": after, "n_train_states": int(train["hidden"].shape[0]),
              "n_val_states": int(val["hidden"].shape[0]),
              "loss_curve": curve[:: max(1, len(curve) // 30)], "steps": steps, "lr": lr, "batch": batch}
    save_vocab(out, proj_a, proj_b, fixed_ids, {"rank": rank, "num_candidates": num_candidates,
                                                "return_topk": return_topk, "report": report, "command": command})
    return report


def save_vocab(drafter_dir, proj_a: torch.Tensor, proj_b: torch.Tensor, fixed_ids: torch.Tensor, settings: dict,
               mode: str | None = None) -> None:
    """Write vocab.safetensors (16-bit projections, int32 fixed ids) and the `vocab` section."""
    out = Path(drafter_dir)
    (out / VOCAB_FILE).parent.mkdir(parents=True, exist_ok=True)
    save_file({"proj_a": proj_a.half().contiguous(), "proj_b": proj_b.half().contiguous(),
               "fixed_ids": fixed_ids.int().contiguous()}, str(out / VOCAB_FILE), metadata={"format": "pt", "specx": "vocab"})
    attach_vocab(out, {"path": VOCAB_FILE, "fixed_size": int(fixed_ids.numel()), **settings}, mode)


def attach_vocab(drafter_dir, vocab: dict, mode: str | None = None) -> None:
    from vllm_specx.checkpoint import SPECX_CONFIG_NAME, load_specx_config

    out = Path(drafter_dir)
    specx = load_specx_config(out)
    specx.vocab = vocab
    if mode is not None:
        specx.vocab_mode = mode
    (out / SPECX_CONFIG_NAME).write_text(json.dumps(specx.validate().to_dict(), indent=2))
