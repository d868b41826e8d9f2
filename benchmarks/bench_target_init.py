"""MCSD's target-initialised candidates, as published and in their lossless form, measured (#6).

Improved MCSD (arXiv 2409.10644, "target model initialised multi-candidate") seeds each round's first
draft level with k tokens taken from the target's own last distribution (its top-k in greedy), lets the
drafter continue each of them, and commits the branch whose continuation the target accepts furthest.
Its lossless form is k = 1: the single first-level token is the target's own choice, which is what
vLLM's bonus token already is (specx's drafters start every chain from it). With k > 1 the committed
first token is sometimes not the target's choice, so the output changes: the published form is lossy.
"Not doing it" in the paper is its MCSD baseline, whose first level after the target's token comes from
the drafter; for greedy decoding that is k = 1 again, so the comparison that carries information is
k = 1 against the published k > 1: what the extra candidates buy in tokens per target pass, and what
they cost in output that no longer equals plain decoding.

Simulated in plain PyTorch, greedy, on the real target (SmolLM2-135M-Instruct, HF, fp32, with KV cache)
and the bundled EDD drafter (engine-free model, full LM head): per round, each first-level candidate is
continued by `--depth` drafter tokens and verified by the target (k chains = one tree of k * (depth+1)
nodes). Writes benchmarks/results/target_init_<tag>.{json,png}.

  python benchmarks/bench_target_init.py --per-category 5 --max-tokens 64 --k 1 2 3   (the committed run)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_acceptance import RESULTS, chat_prompts, load_prompts, machine  # noqa: E402


@torch.no_grad()
def draft_chain(drafter, soft: torch.Tensor, first_token: int, depth: int) -> list[int]:
    """Greedy EDD chain after `first_token`, which sits at position n = len(soft).

    soft: [n, H] the drafter's context vectors of the n verified positions. The query in slot n-1+j
    reads embed(x_{n+j}) at RoPE position n+j and attends to soft prompts 0..n-1 and to the embeddings
    of this block's tokens x_n..x_{n+j-1} (the layout vLLM's KV cache holds, see core/edd.py)."""
    n = soft.shape[0]
    tokens = [first_token]
    for j in range(depth):
        block = drafter.embed(torch.tensor(tokens[:-1], dtype=torch.long))  # [j, H]
        context = torch.cat([soft, block])[None]  # [1, n+j, H]
        query = drafter.embed(torch.tensor([[tokens[-1]]]))  # [1, 1, H]
        hidden = drafter.layer(query, torch.tensor([[n + j]]), context, torch.arange(n + j)[None],
                               torch.ones(1, 1, n + j, dtype=torch.bool))
        tokens.append(int(drafter.logits(hidden[0, -1]).argmax()))
    return tokens[1:]


def truncate(cache, length: int) -> None:
    """Keep the first `length` positions of an HF DynamicCache."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.no_grad()
def generate(target, drafter, layer: int, prompt_ids: list[int], k: int, depth: int, max_tokens: int,
             eos: int) -> dict:
    """One prompt, greedy, first level = the target's top-k; returns tokens and per-round counts."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = target(torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True, output_hidden_states=True)
    soft = drafter.context_from_target(out.hidden_states[layer][0])  # [n, H]
    candidates = out.logits[0, -1].topk(k).indices.tolist()
    committed: list[int] = []
    rounds = accepted = off_target = 0
    while len(committed) < max_tokens and eos not in committed:
        n = soft.shape[0]
        best = None  # (accepted, rank, tokens, target output)
        for rank, first in enumerate(candidates):
            if rank:
                truncate(cache, n)
            seq = [first] + draft_chain(drafter, soft, first, depth)
            o = target(torch.tensor([seq]), past_key_values=cache, use_cache=True, output_hidden_states=True)
            argmax = o.logits[0].argmax(-1).tolist()  # the target's choice after each of seq's tokens
            a = 0
            while a < depth and seq[a + 1] == argmax[a]:
                a += 1
            if best is None or a > best[0]:  # ties go to the higher-ranked candidate
                best = (a, rank, seq, o)
        a, rank, seq, o = best
        keep = seq[: a + 1]
        if rank == len(candidates) - 1:  # the cache holds this branch: drop its rejected tail
            truncate(cache, n + a + 1)
        else:  # rebuild the cache from the kept branch (costs one more forward; not counted)
            truncate(cache, n)
            o = target(torch.tensor([keep]), past_key_values=cache, use_cache=True, output_hidden_states=True)
        soft = torch.cat([soft, drafter.context_from_target(o.hidden_states[layer][0, : a + 1])])
        candidates = o.logits[0, a].topk(k).indices.tolist()
        committed += keep
        rounds += 1
        accepted += a
        off_target += rank > 0
    if eos in committed:
        committed = committed[: committed.index(eos) + 1]
    return {"tokens": committed[:max_tokens], "rounds": rounds, "accepted_drafts": accepted,
            "off_target_rounds": off_target}


@torch.no_grad()
def plain_greedy(target, prompt_ids: list[int], max_tokens: int, eos: int) -> list[int]:
    out = target.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt_ids):].tolist()


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in result["runs"]]
    labels = [f"k={k}" + (" (lossless)" if k == 1 else " (published)") for k in ks]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [("tokens_per_target_pass", "output tokens per target pass"),
              ("verified_nodes_per_pass", "tree nodes verified per pass"),
              ("outputs_differing_from_plain_greedy", "outputs != plain greedy (fraction of prompts)")]
    for ax, (key, title) in zip(axes, panels):
        ax.bar(labels, [r[key] for r in result["runs"]], color=["tab:green"] + ["tab:red"] * (len(ks) - 1))
        ax.set_title(title)
    fig.suptitle(f"target-initialised first level, greedy, {result['target']} + {Path(result['drafter']).name}, "
                 f"{result['prompts']} Spec-Bench prompts ({result['machine']['host_cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drafter", default=None, help="EDD drafter folder (default: the bundled one)")
    ap.add_argument("--per-category", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--depth", type=int, default=5, help="drafter tokens after each first-level token")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--tag", default="smollm2_cpu_intel")
    args = ap.parse_args()

    from safetensors import safe_open
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_specx.models import smollm2_path
    from vllm_specx.training.export import load_edd, target_embedding_and_head

    target_dir = str(smollm2_path())
    drafter_dir = args.drafter or str(Path(__file__).resolve().parents[1] / "vllm_specx" / "assets" / "edd-smollm2-135m")
    with safe_open(str(Path(target_dir) / "model.safetensors"), "pt") as f:
        embed, head = target_embedding_and_head(f.get_tensor, f.keys())
    drafter, specx = load_edd(drafter_dir, embed, head)
    drafter.eval()
    layer = drafter.cfg.target_layer_id  # vLLM aux-hidden-state id = HF hidden_states index
    target = AutoModelForCausalLM.from_pretrained(target_dir, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(target_dir)
    eos = tok.eos_token_id
    rows = chat_prompts(target_dir, load_prompts(["spec_bench"], args.per_category))
    prompts = [(c, tok(t, add_special_tokens=False).input_ids) for c, t in rows]

    t0 = time.time()
    reference = [plain_greedy(target, ids, args.max_tokens, eos) for _, ids in tqdm(prompts, desc="plain greedy")]
    result = {"what": __doc__.split("\n")[0], "target": "SmolLM2-135M-Instruct", "drafter": drafter_dir,
              "prompts": len(prompts), "max_tokens": args.max_tokens, "depth": args.depth, "machine": machine(),
              "runs": []}
    for k in args.k:
        per = [generate(target, drafter, layer, ids, k, args.depth, args.max_tokens, eos)
               for _, ids in tqdm(prompts, desc=f"k={k}")]
        rounds = sum(p["rounds"] for p in per)
        tokens = sum(len(p["tokens"]) for p in per)
        differ = [i for i, p in enumerate(per) if p["tokens"] != reference[i]]
        result["runs"].append({
            "k": k, "lossless": k == 1, "rounds": rounds, "output_tokens": tokens,
            "tokens_per_target_pass": tokens / rounds,
            "accepted_drafts_per_pass": sum(p["accepted_drafts"] for p in per) / rounds,
            "verified_nodes_per_pass": k * (args.depth + 1),
            "rounds_committing_a_non_target_token": sum(p["off_target_rounds"] for p in per) / rounds,
            "outputs_differing_from_plain_greedy": len(differ) / len(per),
            "prompts_differing": [prompts[i][0] for i in differ],
        })
        print(json.dumps({kk: v for kk, v in result["runs"][-1].items() if kk != "prompts_differing"}))
    result["seconds"] = round(time.time() - t0, 1)
    out = RESULTS / f"target_init_{args.tag}.json"
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(out)


if __name__ == "__main__":
    main()
