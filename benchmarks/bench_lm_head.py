"""Benchmark the SpecVocab draft head against the full LM head.

For each (vocab V, hidden H, batch B) it times
  full        full LM head [V, H] + log-softmax + torch.topk            (the baseline)
  fixed32k    a fixed 32k-row head + topk   (a statically pruned draft vocabulary)
  subset      topk_lm_head over C candidates per row (Triton on GPU, torch reference on CPU)
  select      select_candidates_reference: low-rank scores (rank r) + top-C
  specvocab   select + subset, the whole SpecVocab draft head
and the bandwidth floor of `subset`: the bytes it must read, B * (C * H * dtype_bytes +
H * dtype_bytes + C * id_bytes), over the peak memory bandwidth (H100 3.35e12 B/s,
H200 4.8e12 B/s, overridable with --peak-bandwidth; on CPU the larger of a measured copy
and a measured read-only bandwidth, both recorded). The full head's floor (V * H bytes) is
recorded too: per-row candidate sets share no weight reads across the batch, so the
subset head reads B * C rows against the full head's V and stops paying off once B * C
approaches V (see `subset_rows_over_vocab`).

Writes benchmarks/results/lm_head_kernel_<device>.json and a PNG plot beside it.

On a CPU the "subset" column is the torch reference (a gather + batched GEMV), not the
Triton kernel: CPU figures show the algorithmic saving (C rows instead of V), not kernel
quality. The default grid is reduced (and bounded by --max-weight-gb on CPU); --full runs
every combination.

    python benchmarks/bench_lm_head.py            # reduced grid
    python benchmarks/bench_lm_head.py --full     # all vocab x hidden x batch
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from vllm_specx.kernels.topk_lm_head import (  # noqa: E402
    full_vocab_topk_reference,
    topk_lm_head,
    topk_lm_head_reference,
    triton_path_available,
)
from vllm_specx.kernels.vocab_select import select_candidates_reference  # noqa: E402

VOCABS = (49152, 128256, 151936, 262144)  # SmolLM2, Llama-3, Qwen2, Gemma-3
HIDDENS = (576, 4096, 8192)
BATCHES_FULL = (1, 4, 16, 64)
FIXED_VOCAB = 32768
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, HBM3 / HBM3e spec sheets
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------ timing


def time_ms(fn, device: torch.device, iters: int, warmup: int) -> tuple[float, float]:
    """(median, min) wall time of fn() in milliseconds (CUDA events on GPU). The min is
    kept because shared CPU machines add one-sided noise."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), min(samples)


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> dict[str, float]:
    """Best-of-5 bandwidths in bytes/s over a 256 MiB fp32 tensor: a copy (read + write
    bytes counted) and a read-only reduction. The subset head mostly reads, and a CPU
    reads faster than it copies, so the floor uses the larger of the two."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    _, copy_ms = time_ms(lambda: dst.copy_(src), device, iters=5, warmup=1)
    _, read_ms = time_ms(lambda: src.sum(), device, iters=5, warmup=1)
    return {"copy": 2 * nbytes / (copy_ms * 1e-3), "read": nbytes / (read_ms * 1e-3)}


# ----------------------------------------------------------------------------- context


def describe_machine(device: torch.device) -> dict:
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def default_peak_bandwidth(device: torch.device) -> tuple[float, str, dict[str, float]]:
    """(bytes/s used for the floors, where it came from, measured bandwidths)."""
    measured = measure_bandwidth(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BANDWIDTH.items():
            if key in name:
                return value, f"spec sheet ({key})", measured
    best = max(measured.values())
    which = "read-only sum" if best == measured["read"] else "copy (read + write)"
    return best, f"measured, max of copy and read-only over 256 MiB fp32 ({which})", measured


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


# ------------------------------------------------------------------------------- bench


def bench_one(vocab, hidden, batches, args, device, dtype, peak_bw, subset_fn) -> list[dict]:
    """All batch sizes for one (V, H): the weights are built once."""
    g = torch.Generator(device=device).manual_seed(vocab + hidden)
    weight = torch.randn(vocab, hidden, device=device, dtype=dtype, generator=g) * hidden**-0.5  # [V, H]
    proj_a = torch.randn(hidden, args.rank, device=device, dtype=dtype, generator=g) * hidden**-0.5  # [H, r]
    proj_b = torch.randn(vocab, args.rank, device=device, dtype=dtype, generator=g) * args.rank**-0.5  # [V, r]
    fixed_head = weight[:FIXED_VOCAB]  # [32k, H] view, contiguous
    dtype_bytes = weight.element_size()
    rows = []
    for batch in batches:
        h = torch.randn(batch, hidden, device=device, dtype=dtype, generator=g)  # [B, H]
        cand = select_candidates_reference(h, proj_a, proj_b, args.num_candidates)  # [B, C] int64

        timings = {
            "full": lambda: full_vocab_topk_reference(h, weight, args.k),
            "fixed32k": lambda: full_vocab_topk_reference(h, fixed_head, args.k),
            "subset": lambda: subset_fn(h, weight, cand, args.k),
            "select": lambda: select_candidates_reference(h, proj_a, proj_b, args.num_candidates),
            "specvocab_total": lambda: subset_fn(
                h, weight, select_candidates_reference(h, proj_a, proj_b, args.num_candidates), args.k
            ),
        }
        row = {"vocab": vocab, "hidden": hidden, "batch": batch}
        for name, fn in timings.items():
            row[f"{name}_ms"], row[f"{name}_min_ms"] = time_ms(fn, device, args.iters, args.warmup)
        full_ms, subset_ms, total_ms = row["full_ms"], row["subset_ms"], row["specvocab_total_ms"]

        c = args.num_candidates
        subset_bytes = batch * (c * hidden * dtype_bytes + hidden * dtype_bytes + c * cand.element_size())
        full_bytes = vocab * hidden * dtype_bytes + batch * hidden * dtype_bytes
        row.update({
            # Per-row candidate sets share no weight reads across the batch, so the subset
            # head reads B*C rows against the full head's V: it loses once B*C nears V.
            "subset_rows_over_vocab": batch * c / vocab,
            "subset_bytes": subset_bytes,
            "subset_floor_ms": subset_bytes / peak_bw * 1e3,
            "full_floor_ms": full_bytes / peak_bw * 1e3,
            "subset_fraction_of_floor": (subset_bytes / peak_bw * 1e3) / subset_ms,
            "speedup_subset_vs_full": full_ms / subset_ms,
            "speedup_total_vs_full": full_ms / total_ms,
        })  # fmt: skip
        rows.append(row)
        print(
            f"V={vocab:6d} H={hidden:4d} B={batch:2d} | full {full_ms:8.3f} ms | 32k {row['fixed32k_ms']:8.3f} | "
            f"subset {subset_ms:7.3f} (floor {row['subset_floor_ms']:.3f}) | select {row['select_ms']:7.3f} | "
            f"specvocab {total_ms:7.3f} | x{row['speedup_total_vs_full']:.2f}",
            flush=True,
        )
        del h, cand
    del weight, proj_a, proj_b, fixed_head
    return rows


def plot(results: list[dict], meta: dict, path: Path, use_min: bool) -> None:
    """Time vs vocabulary, one panel per (batch, hidden). use_min plots the fastest call
    instead of the median (shared CPU machines: the min is the least contended figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hiddens = sorted({r["hidden"] for r in results})
    batches = sorted({r["batch"] for r in results})
    shown_batches = [batches[0], batches[-1]] if len(batches) > 1 else batches
    fig, axes = plt.subplots(len(shown_batches), len(hiddens), figsize=(4.2 * len(hiddens), 3.4 * len(shown_batches)),
                             squeeze=False)  # fmt: skip
    series = [
        ("full_ms", "full head + topk", "tab:red", "-"),
        ("fixed32k_ms", "fixed 32k head + topk", "tab:orange", "-"),
        ("specvocab_total_ms", "SpecVocab (select + subset)", "tab:blue", "-"),
        ("subset_ms", "subset head only", "tab:cyan", "--"),
        ("select_ms", "selection only", "tab:purple", ":"),
        ("subset_floor_ms", "subset bandwidth floor", "black", ":"),
        ("full_floor_ms", "full head bandwidth floor", "tab:red", ":"),
    ]
    for i, batch in enumerate(shown_batches):
        for j, hidden in enumerate(hiddens):
            ax = axes[i][j]
            rows = [r for r in results if r["hidden"] == hidden and r["batch"] == batch]
            rows.sort(key=lambda r: r["vocab"])
            if not rows:
                ax.set_visible(False)
                continue
            vocabs = [r["vocab"] for r in rows]
            for key, label, color, style in series:
                if use_min and not key.endswith("floor_ms"):
                    key = key.replace("_ms", "_min_ms")
                ax.plot(vocabs, [r[key] for r in rows], style, marker="o", ms=3, color=color, label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.minorticks_off()
            ax.set_xticks(vocabs)
            ax.set_xticklabels([f"{v // 1000}k" for v in vocabs], fontsize=7)
            ax.set_title(f"H={hidden}, B={batch}", fontsize=9)
            ax.set_xlabel("vocabulary size")
            if j == 0:
                ax.set_ylabel("ms per draft step")
    handles, labels = next(ax for row in axes for ax in row if ax.get_visible()).get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    impl = meta["subset_implementation"]
    fig.suptitle(f"Draft LM head, C={meta['num_candidates']}, r={meta['rank']}, k={meta['k']}, {meta['dtype']} "
                 f"on {meta['device_name']} (subset: {impl}; {'min' if use_min else 'median'} of "
                 f"{meta['iters']} calls)", fontsize=10)  # fmt: skip
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="every vocab x hidden x batch combination")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights/hidden dtype (default bf16 on GPU, fp32 on CPU where 16-bit GEMMs are slow)")
    parser.add_argument("--num-candidates", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=128, help="rank r of the selection projections")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--peak-bandwidth", type=float, default=None, help="bytes/s for the floor")
    parser.add_argument("--max-weight-gb", type=float, default=None,
                        help="skip heads larger than this (default: 2.2 on CPU, none on GPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on CPU: on a shared machine a descheduled "
                             "second thread stalls every parallel region; GPU runs leave it alone)")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="V:H",
                        help="only these (vocab, hidden) heads, e.g. 262144:640 (Gemma-3-270M)")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes (default: the grid's)")
    parser.add_argument("--name", default=None, help="result name suffix: lm_head_kernel_<device>_<name>.json")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)  # fmt: skip

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads or not on_gpu:
        torch.set_num_threads(args.threads or 1)
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    args.iters = args.iters or (50 if on_gpu else 7)
    args.warmup = args.warmup or (10 if on_gpu else 1)
    max_weight_bytes = (args.max_weight_gb if args.max_weight_gb is not None else (None if on_gpu else 2.2))
    max_weight_bytes = max_weight_bytes * 1e9 if max_weight_bytes is not None else float("inf")

    if args.full:
        grid = [(v, h) for h in HIDDENS for v in VOCABS]
        batches = BATCHES_FULL
    elif on_gpu:
        grid = [(v, h) for h in HIDDENS for v in VOCABS]
        batches = (1, 64)
    else:  # reduced CPU grid: every vocab at the small hidden, two vocabs at 4096
        grid = [(v, 576) for v in VOCABS] + [(49152, 4096), (128256, 4096)]
        batches = (1, 8, 64)
    if args.shapes:
        grid = [tuple(int(x) for x in shape.split(":")) for shape in args.shapes]
    batches = tuple(args.batches) if args.batches else batches

    peak_bw, bw_source, measured_bw = default_peak_bandwidth(device)
    if args.peak_bandwidth:
        peak_bw, bw_source = args.peak_bandwidth, "--peak-bandwidth"
    # Off the GPU always the reference: the Triton interpreter (TRITON_INTERPRET=1) is a
    # correctness tool, timing it would be meaningless.
    use_kernel = on_gpu and triton_path_available(device)
    subset_fn = topk_lm_head if use_kernel else topk_lm_head_reference
    kernel_impl = "triton" if use_kernel else "torch reference"
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if on_gpu else "CPU",
        "machine": describe_machine(device),
        "subset_implementation": kernel_impl,
        "selection_implementation": "torch reference (fp32 low-rank GEMM + torch.topk)",
        "caveat": (
            None
            if kernel_impl == "triton"
            else "CPU run: 'subset' is the torch reference (gather + batched GEMV), not the Triton kernel. "
            "The figures show the algorithmic saving of reading C rows instead of V, not kernel quality; "
            "the reference also materialises the gathered rows (in cache-sized blocks), which the kernel does not. "
            "CPU timings come from a shared machine (see load_average_*), single torch thread: expect noise."
        ),
        "dtype": str(dtype).replace("torch.", ""),
        "num_candidates": args.num_candidates,
        "rank": args.rank,
        "k": args.k,
        "fixed_vocab": FIXED_VOCAB,
        "iters": args.iters,
        "warmup": args.warmup,
        "statistic": "median (and min as *_min_ms) of `iters` timed calls after `warmup` calls",
        "plotted_statistic": "median" if on_gpu else "min",
        "peak_bandwidth_bytes_per_s": peak_bw,
        "peak_bandwidth_source": bw_source,
        "measured_bandwidth_bytes_per_s": measured_bw,
        "floor_bytes_formula": "B * (C*H*dtype_bytes + H*dtype_bytes + C*id_bytes)",
        "full_grid": bool(args.full),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_at_start": os.getloadavg(),
    }
    print(json.dumps({k: v for k, v in meta.items() if k != "machine"}, indent=1))

    results, skipped = [], []
    for vocab, hidden in grid:
        weight_bytes = vocab * hidden * torch.tensor([], dtype=dtype).element_size()
        if weight_bytes > max_weight_bytes:
            skipped.append({"vocab": vocab, "hidden": hidden, "reason": f"head {weight_bytes / 1e9:.1f} GB > max"})
            continue
        results += bench_one(vocab, hidden, batches, args, device, dtype, peak_bw, subset_fn)

    meta["load_average_at_end"] = os.getloadavg()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"lm_head_kernel_{device_slug(device)}" + (f"_{args.name}" if args.name else "")
    with open(out_dir / f"{stem}.json", "w") as f:
        json.dump({"meta": meta, "results": results, "skipped": skipped}, f, indent=1)
    plot(results, meta, out_dir / f"{stem}.png", use_min=not on_gpu)
    print(f"wrote {out_dir / (stem + '.json')} and {stem}.png")


if __name__ == "__main__":
    main()
