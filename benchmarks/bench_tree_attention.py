"""Benchmark the tree-attention kernel (PCT verification) against its torch reference and the
memory-bandwidth floor.

For each (heads, batch B, tree nodes N per request, context L) it times, on random trees over a
shuffled paged cache (block size 16):
  triton     kernels.tree_attention.tree_attention_triton (GPU only: interpreted timings mean nothing)
  reference  core.tree_attention.tree_attention_paged (gather + masked SDPA: vLLM-CPU's tree path)
and the floor: the bytes that must be read at least once (every request's context and tree K/V, the
queries, the ancestor masks) and written (the outputs), over the peak memory bandwidth (H100
3.35e12 B/s, H200 4.8e12 B/s; --peak-bandwidth overrides). The kernel runs one program per (node,
query head) over the whole context, with no split over the context and no sharing of K/V reads
between the nodes of one tree or the query heads of one KV head (they meet in cache, if at all), so
`triton / floor` says how much a split-K, node-sharing kernel could still win.

Writes benchmarks/results/tree_attention_kernel_<device>.json and a PNG beside it.

    python benchmarks/bench_tree_attention.py            # GPU: full grid; CPU: reduced, reference only
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from bench_lm_head import PEAK_BANDWIDTH, describe_machine, time_ms  # also puts the checkout on sys.path

from vllm_specx.core.tree import build_tree_buffers
from vllm_specx.kernels.tree_attention import tree_attention_reference, tree_attention_triton, triton_path_available

HEADS = {"smollm2-135m": (9, 3, 64), "llama-8b": (32, 8, 128)}  # (query heads, KV heads, head dim)
BLOCK_SIZE = 16


def make_case(batch: int, nodes: int, context: int, heads: tuple[int, int, int], dtype, seed: int = 0):
    """Random trees of `nodes` nodes after `context` cached tokens, per request, over shuffled blocks (on CPU)."""
    hq, hkv, d = heads
    g = torch.Generator().manual_seed(seed)
    parents = (torch.rand(batch, nodes, generator=g) * torch.arange(nodes)).long()  # parent of i in [0, i)
    parents[:, 0] = -1
    ctx = torch.full((batch,), context)
    buf = build_tree_buffers(parents, torch.ones(batch, nodes, dtype=torch.bool), ctx)
    blocks_per_req = math.ceil((context + nodes) / BLOCK_SIZE)
    block_table = torch.randperm(batch * blocks_per_req, generator=g).view(batch, blocks_per_req).int()
    cache = lambda: torch.randn(batch * blocks_per_req, BLOCK_SIZE, hkv, d, generator=g).to(dtype)  # noqa: E731
    return dict(query=torch.randn(batch * nodes, hq, d, generator=g).to(dtype),
                query_start_loc=torch.arange(0, batch * nodes + 1, nodes), key_cache=cache(), value_cache=cache(),
                block_table=block_table, context_lens=ctx, tree_mask=buf.ancestor_mask)


def floor_bytes(batch: int, nodes: int, context: int, heads: tuple[int, int, int], dtype) -> int:
    hq, hkv, d = heads
    e = torch.empty((), dtype=dtype).element_size()
    kv = batch * (context + nodes) * hkv * d * 2 * e
    q_and_out = 2 * batch * nodes * hq * d * e
    return kv + q_and_out + batch * nodes * nodes


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["heads"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, (heads, batch) in zip(axes[0], panels):
        for nodes, style in zip(sorted({r["nodes"] for r in rows}), ("-", "--", ":")):
            sel = sorted((r for r in rows if (r["heads"], r["batch"], r["nodes"]) == (heads, batch, nodes)),
                         key=lambda r: r["context"])
            ctx = [r["context"] for r in sel]
            for key, color in (("triton_ms", "C0"), ("reference_ms", "C1"), ("floor_ms", "k")):
                if sel and sel[0].get(key) is not None:
                    ax.plot(ctx, [r[key] for r in sel], style, color=color, marker="o", ms=3,
                            label=f"{key[:-3]}, {nodes} nodes")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{heads}, batch {batch}", fontsize=9)
        ax.set_xlabel("context tokens per request")
    axes[0][0].set_ylabel("ms per layer call")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Tree attention, {meta['dtype']} on {meta['device_name']} (median of {meta['iters']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--peak-bandwidth", type=float, default=None, help="bytes/s for the floor")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    iters = args.iters or (50 if on_gpu else 5)
    machine = describe_machine(device)
    name = torch.cuda.get_device_name(device) if on_gpu else machine["cpu"]
    peak = args.peak_bandwidth or next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)
    use_kernel = on_gpu and triton_path_available(device)
    if on_gpu:
        grid = [(h, b, n, c) for h in HEADS for b in (1, 8, 32) for n in (8, 32) for c in (256, 1024, 4096)]
    else:
        grid = [("smollm2-135m", b, n, c) for b in (1, 8) for n in (8, 32) for c in (256, 1024)]
    rows = []
    for heads, batch, nodes, context in grid:
        case = {k: v.to(device) for k, v in make_case(batch, nodes, context, HEADS[heads], dtype).items()}
        scale = 1 / math.sqrt(HEADS[heads][2])
        row = dict(heads=heads, batch=batch, nodes=nodes, context=context,
                   floor_bytes=floor_bytes(batch, nodes, context, HEADS[heads], dtype))
        row["reference_ms"] = time_ms(lambda: tree_attention_reference(**case, scale=scale), device, iters, 2)[0]
        row["triton_ms"] = (time_ms(lambda: tree_attention_triton(**case, scale=scale), device, iters, 5)[0]
                            if use_kernel else None)
        row["floor_ms"] = row["floor_bytes"] / peak * 1e3 if peak else None
        if use_kernel:  # the timed kernel must compute the right thing
            ref = tree_attention_reference(**case, scale=scale).float()
            row["max_abs_error_vs_reference"] = float((tree_attention_triton(**case, scale=scale).float() - ref).abs().max())
        rows.append(row)
        print(json.dumps(row))
    meta = dict(device=str(device), device_name=name, machine=machine, dtype=str(dtype).replace("torch.", ""), iters=iters,
                statistic="median of `iters` timed calls after warm-up (CUDA events on GPU)", block_size=BLOCK_SIZE,
                peak_bandwidth_bytes_per_s=peak, heads={k: dict(zip(("query", "kv", "dim"), v)) for k, v in HEADS.items()},
                kernel="triton" if use_kernel else None,
                caveat=None if use_kernel else "no GPU: the Triton kernel is not timed (the interpreter is a "
                "correctness tool); reference = gather + masked SDPA in torch on this CPU")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"tree_attention_kernel_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, meta, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")


if __name__ == "__main__":
    main()
