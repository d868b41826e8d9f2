"""Stage `fit` of `vllm-specx train`: fit a drafter (EDD, or the EAGLE-3 baseline) to recorded target
distributions. Both drafters see the same data, batches, block boundaries, loss and optimiser.

Loss: KL(target || draft) on the target's recorded top-k (the target distribution renormalised over
its top-k; the constant entropy term is dropped, so this is cross-entropy to soft labels), computed
for every query under a random block mask (`core.edd.random_block_starts`), so that training sees
each draft depth the way chain and tree drafting run it.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_specx.core.eagle3 import Eagle3ArchConfig, Eagle3Drafter
from vllm_specx.core.edd import EddArchConfig, EddDrafter, init_weights_, random_block_starts
from vllm_specx.core.metrics import expected_calibration_error


@dataclass
class TrainConfig:
    epochs: float = 2.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_tokens: int = 4096
    max_seq_len: int = 768
    min_block: int = 1
    max_block: int = 8
    val_fraction: float = 0.05
    seed: int = 0
    save_every: int = 50
    threads: int = 0  # 0: torch default


def _batches(records: list[dict], batch_tokens: int, max_len: int, rng: random.Random,
             pool: int = 64) -> list[list[int]]:
    """Shuffled batches of at most `batch_tokens` padded tokens. Sequences are sorted by length within
    random pools of `pool`, so that a batch holds similar lengths (little padding) yet stays random."""
    order = list(range(len(records)))
    rng.shuffle(order)
    length = [min(len(r["tokens"]), max_len) for r in records]
    batches, cur, cur_max = [], [], 0
    for p in range(0, len(order), pool):
        for i in sorted(order[p : p + pool], key=length.__getitem__):
            n = length[i]
            if cur and max(cur_max, n) * (len(cur) + 1) > batch_tokens:
                batches.append(cur)
                cur, cur_max = [], 0
            cur.append(i)
            cur_max = max(cur_max, n)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def _collate(records: list[dict], idx: list[int], max_len: int):
    """Right-padded batch. Query slot s predicts x_{s+2}: its label is the target top-k at s+1."""
    rows = [records[i] for i in idx]
    s = min(max(len(r["tokens"]) for r in rows), max_len)
    b = len(rows)
    ht = rows[0]["hidden"].shape[-1]
    k = rows[0]["topk_ids"].shape[-1]
    tokens = torch.zeros(b, s, dtype=torch.long)
    hidden = torch.zeros(b, s, ht)
    topk_ids = torch.zeros(b, s, k, dtype=torch.long)
    topk_lp = torch.full((b, s, k), -1e4)
    loss_mask = torch.zeros(b, s - 1, dtype=torch.bool)
    for j, r in enumerate(rows):
        n = min(len(r["tokens"]), s)
        tokens[j, :n] = r["tokens"][:n]
        hidden[j, :n] = r["hidden"][:n].float()
        topk_ids[j, :n] = r["topk_ids"][:n]
        topk_lp[j, :n] = r["topk_lp"][:n].float()
        # slots whose predicted token x_{s+2} is a response token (s+2 >= prompt_len) and exists
        first = max(r["prompt_len"] - 2, 0)
        loss_mask[j, first : n - 2] = True
    return tokens, hidden, topk_ids[:, 1:], topk_lp[:, 1:], loss_mask


def target_init_tensors(get_tensor, num_layers: int) -> dict[str, torch.Tensor]:
    """Start the drafter from the target's last decoder layer and final norm.

    The LM head is the target's, so the output norm must match the target's (its gain sets the logit
    scale; from 1.0 the initial draft distribution is nearly uniform). The last layer is a better prior
    for a layer that feeds that head than random weights. `get_tensor(name)` reads the target's HF tensors.
    """
    last = f"model.layers.{num_layers - 1}."
    names = {
        "norm.weight": "model.norm.weight",
        "layer.input_layernorm.weight": last + "input_layernorm.weight",
        "layer.context_layernorm.weight": last + "input_layernorm.weight",
        "layer.post_attention_layernorm.weight": last + "post_attention_layernorm.weight",
    }
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        names[f"layer.{proj}.weight"] = last + f"self_attn.{proj}.weight"
    for proj in ("gate_proj", "up_proj", "down_proj"):
        names[f"layer.{proj}.weight"] = last + f"mlp.{proj}.weight"
    return {mine: get_tensor(theirs) for mine, theirs in names.items()}


@torch.no_grad()
def balance_soft_prompt_norm_(norm: torch.nn.Module, hidden: list[torch.Tensor], max_tokens: int = 200_000) -> None:
    """Initialise an RMSNorm's per-channel gain to undo the target's massive activations.

    Intermediate layers of Llama-family targets carry a few channels with RMS in the hundreds or
    thousands (SmolLM2-135M layer 27: one channel ~1330 vs overall ~60). After RMSNorm those channels
    dominate the soft prompt and the rest arrive ~100x smaller; learning the gain from 1.0 at Adam's
    step size takes thousands of steps. Starting the gain at overall_rms / channel_rms gives every
    channel unit scale from step one. (Same architecture: the gain is an ordinary weight.)
    """
    hs = torch.cat([h.float() for h in hidden])[:max_tokens]  # [N, Ht]
    channel_rms = hs.pow(2).mean(0).sqrt().clamp_min(1e-6)
    token_rms = hs.pow(2).mean(-1).sqrt().mean()
    norm.weight.copy_(token_rms / channel_rms)


def soft_kl_loss(logits: torch.Tensor, topk_ids: torch.Tensor, topk_lp: torch.Tensor) -> torch.Tensor:
    """logits [N,V]; topk_ids/lp [N,k] -> mean over the N queries."""
    logq = torch.log_softmax(logits.float(), dim=-1).gather(-1, topk_ids)  # [N,k]
    p = torch.softmax(topk_lp.float(), dim=-1)  # renormalised over the recorded top-k
    return -(p * logq).sum(-1).mean()


def split_records(records: list[dict], cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(train, validation): a seeded split, identical for every drafter trained with `cfg`."""
    idx = list(range(len(records)))
    random.Random(cfg.seed).shuffle(idx)
    n_val = max(1, int(len(idx) * cfg.val_fraction))
    return [records[i] for i in idx[n_val:]], [records[i] for i in idx[:n_val]]


def split_record_sources(sources: list[list[dict]], cfg: TrainConfig) -> tuple[list[dict], list[dict], list[list[dict]]]:
    """(train, validation, validation per source): each source split by `split_records` on its own, so a
    drafter fine-tuned on old + new records is validated on exactly the old run's held-out records."""
    splits = [split_records(records, cfg) for records in sources]
    return [r for t, _ in splits for r in t], [r for _, v in splits for r in v], [v for _, v in splits]


def build_edd(arch: EddArchConfig, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
              train_recs: list[dict], seed: int, target_init: dict[str, torch.Tensor] | None = None) -> EddDrafter:
    """target_init: drafter tensor name -> target tensor to start from (see `target_init_tensors`)."""
    torch.manual_seed(seed)
    drafter = EddDrafter(arch, embed_weight.float(), lm_head_weight.float())
    init_weights_(drafter, seed)
    if target_init:
        missing = drafter.load_state_dict({k: v.float() for k, v in target_init.items()}, strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys
    if arch.hidden_size == arch.target_hidden_size:  # soft prompt starts as the target's own state
        with torch.no_grad():
            drafter.hidden_proj.weight.copy_(torch.eye(arch.hidden_size))
    balance_soft_prompt_norm_(drafter.hidden_norm, [r["hidden"] for r in train_recs])
    return drafter


def build_eagle3(arch: Eagle3ArchConfig, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                 train_recs: list[dict], seed: int, target_init: dict[str, torch.Tensor] | None = None) -> Eagle3Drafter:
    """The same starting point as EDD where shapes allow: target last layer and final norm; `fc` passes
    the highest aux layer (EDD's soft-prompt layer) through and starts small on the others."""
    torch.manual_seed(seed)
    drafter = Eagle3Drafter(arch, embed_weight.float(), lm_head_weight.float())
    g = torch.Generator().manual_seed(seed)
    h, n_aux = arch.hidden_size, len(arch.aux_layer_ids)
    with torch.no_grad():
        for p in drafter.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 / math.sqrt(p.shape[1]))
        if arch.hidden_size == arch.target_hidden_size:
            drafter.fc.weight[:, (n_aux - 1) * h :] = torch.eye(h)
        init = {k: v.float() for k, v in (target_init or {}).items()}
        m = drafter.midlayer
        for mine, theirs in (("norm.weight", "norm.weight"),
                             ("input_layernorm", "layer.input_layernorm.weight"),
                             ("post_attention_layernorm", "layer.post_attention_layernorm.weight")):
            if theirs in init:
                (drafter.norm.weight if mine == "norm.weight" else m[mine].weight).copy_(init[theirs])
        for proj in ("q_proj", "k_proj", "v_proj"):  # the feature half of the 2H input
            if f"layer.{proj}.weight" in init:
                m["self_attn"][proj].weight[:, h:] = init[f"layer.{proj}.weight"]
        if "layer.o_proj.weight" in init:
            m["self_attn"]["o_proj"].weight.copy_(init["layer.o_proj.weight"])
        for proj in ("gate_proj", "up_proj", "down_proj"):
            if f"layer.{proj}.weight" in init:
                m["mlp"][proj].weight.copy_(init[f"layer.{proj}.weight"])
        feats = [drafter.combine(r["hidden"].float()) for r in train_recs[:256]]
    balance_soft_prompt_norm_(m["hidden_norm"], feats)
    return drafter


def train_drafter(drafter: EddDrafter | Eagle3Drafter, train_recs: list[dict], val_recs: list[dict],
                  cfg: TrainConfig, work_dir: Path, name: str) -> dict:
    """KL training under random block masks; resumable from work_dir/train_state_<name>.pt."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    steps_per_epoch = len(_batches(train_recs, cfg.batch_tokens, cfg.max_seq_len, random.Random(0)))
    total_steps = max(1, int(steps_per_epoch * cfg.epochs))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0)))
    )
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = work_dir / f"train_state_{name}.pt"
    step, log = 0, []
    if ckpt_path.exists():  # resume
        state = torch.load(ckpt_path, weights_only=False)
        drafter.load_state_dict(state["drafter"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, log = state["step"], state["log"]
    gen = torch.Generator().manual_seed(cfg.seed)
    epoch_rng = random.Random(cfg.seed + 1)
    batches: list[list[int]] = []
    for _ in range(math.ceil(cfg.epochs) + 1):
        batches += _batches(train_recs, cfg.batch_tokens, cfg.max_seq_len, epoch_rng)
    drafter.train()
    bar = tqdm(total=total_steps, initial=step, desc=f"training {name}", unit="step")
    while step < total_steps:
        tokens, hidden, topk_ids, topk_lp, mask = _collate(train_recs, batches[step], cfg.max_seq_len)
        gen.manual_seed(cfg.seed * 100003 + step)  # deterministic per step, also after resume
        starts = random_block_starts(tokens.shape[0], tokens.shape[1], cfg.min_block, cfg.max_block, gen)
        out = drafter.forward_blocks(tokens, hidden, starts)
        # LM head only on the queries that count (response tokens): it dominates the step's cost
        loss = soft_kl_loss(drafter.logits(out[mask]), topk_ids[mask], topk_lp[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        log.append({"step": step, "loss": float(loss.detach())})
        bar.set_postfix(loss=f"{log[-1]['loss']:.3f}")
        bar.update(1)
        if step % cfg.save_every == 0 or step == total_steps:
            torch.save({"drafter": drafter.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step, "log": log}, ckpt_path)
    bar.close()
    report = evaluate_drafter(drafter, val_recs, depth=cfg.max_block)
    report["train"] = {"drafter": name, "steps": step, "final_loss": log[-1]["loss"] if log else None,
                       "loss_curve": [e["loss"] for e in log[:: max(1, len(log) // 50)]],
                       "config": asdict(cfg), "n_train_seqs": len(train_recs), "n_val_seqs": len(val_recs)}
    (work_dir / f"train_report_{name}.json").write_text(json.dumps(report, indent=2))
    return report


@torch.no_grad()
def evaluate_drafter(drafter: EddDrafter | Eagle3Drafter, records: list[dict], depth: int = 8) -> dict:
    """Held-out chain acceptance under greedy drafting, per-depth top-1 agreement, and calibration.

    Responses are the target's own greedy outputs, so along a block starting at slot b the draft at
    depth j is accepted iff drafts at depths 0..j all equal the recorded tokens. Blocks of length
    `depth` are tiled at every offset, which covers every start position once per offset.
    """
    drafter.eval()
    correct_at = torch.zeros(depth)
    count_at = torch.zeros(depth)
    accept_lengths = []
    confs, hits = [], []
    for r in records:
        tokens, hidden, _, _, mask = _collate([r], [0], 10**9)
        s = tokens.shape[1]
        for offset in range(depth):
            starts = torch.clamp((torch.arange(s) - offset) // depth * depth + offset, min=0)[None]
            starts = torch.where(torch.arange(s)[None] < offset, torch.zeros_like(starts), starts)
            logits = drafter.logits(drafter.forward_blocks(tokens, hidden, starts))[0]  # [S-1, V]
            probs = logits.float().softmax(-1)
            conf, pred = probs.max(-1)
            truth = tokens[0, 2:]  # slot q predicts x_{q+2}
            ok = (pred[: s - 2] == truth) & mask[0, : s - 2]
            valid = mask[0, : s - 2]
            d = torch.arange(s - 2) - starts[0, : s - 2]
            for j in range(depth):
                sel = valid & (d == j)
                correct_at[j] += ok[sel].sum()
                count_at[j] += sel.sum()
            confs.append(conf[: s - 2][valid])
            hits.append(ok[valid].float())
            # chain acceptance per block start: consecutive correct depths
            block_first = valid & (d == 0)
            for b in torch.nonzero(block_first).flatten().tolist():
                n = 0
                while b + n < s - 2 and d[b + n] == n and ok[b + n]:
                    n += 1
                accept_lengths.append(1 + n)
    confs_t, hits_t = torch.cat(confs), torch.cat(hits)
    per_depth = (correct_at / count_at.clamp(min=1)).tolist()
    return {
        "val_top1_by_depth": per_depth,
        "val_mean_accept_len_chain": float(torch.tensor(accept_lengths, dtype=torch.float).mean()),
        "val_draft_confidence_ece": expected_calibration_error(confs_t, hits_t),
        "val_tokens": int(hits_t.numel()),
        "depth": depth,
    }
