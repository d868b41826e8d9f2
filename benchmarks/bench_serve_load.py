"""Serving benchmark: `vllm serve` (through `vllm-specx serve`) with and without speculation, under load.

  python benchmarks/bench_serve_load.py --concurrency 1 8 32 64 --methods none edd
  (`python benchmarks/bench.py serve-low` and the other serve-* subcommands are the committed runs)

Per method one server on 127.0.0.1; per concurrency level C, max(C, --min-requests) Spec-Bench chat
requests (greedy, streaming) are sent with at most C in flight. Reports output throughput (tokens/s over
the level's wall time), time to first token and inter-token latency percentiles (p50/p90/p99, from the
streamed chunks' arrival times), and speculation counters read from /metrics before and after. A chunk
can carry several tokens when drafts are accepted; inter-token latency is the chunk gap divided by its
tokens. --reps N starts N servers per method, methods interleaved, and reports per level the repetition
with the median throughput ratio to `none` of the same repetition (every repetition's figures beside it).
Writes benchmarks/results/serve_<tag>.json + .png.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_acceptance import RESULTS, load_prompts, machine, method_config  # noqa: E402

HOST, NAME = "127.0.0.1", "target"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _metric(text: str, name: str) -> float:
    tot = 0.0
    for line in text.splitlines():
        if not line.startswith("#") and line.split("{", 1)[0].split(" ", 1)[0] in (name, name + "_total"):
            tot += float(line.rsplit(" ", 1)[1])
    return tot


def _stream_one(base: str, prompt: str, max_tokens: int) -> dict:
    import requests

    http = requests.Session()
    http.trust_env = False
    body = {"model": NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals, tokens = [], None
    with http.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                arrivals.append(time.perf_counter() - t0)
    return {"arrivals": arrivals, "tokens": tokens or len(arrivals), "end": time.perf_counter() - t0}


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def run_level(base: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        res = list(pool.map(lambda p: _stream_one(base, p, max_tokens), prompts))
    wall = time.perf_counter() - t0
    ttft = [r["arrivals"][0] for r in res if r["arrivals"]]
    itl = []
    for r in res:
        a = r["arrivals"]
        if len(a) > 1 and r["tokens"] > 1:
            itl += [(a[-1] - a[0]) / (r["tokens"] - 1)] * (r["tokens"] - 1)  # per token, averaged per request
    tokens = sum(r["tokens"] for r in res)
    return {"requests": len(res), "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            **{f"ttft_p{q}_s": _pct(ttft, q) for q in (50, 90, 99)},
            **{f"itl_p{q}_s": _pct(itl, q) for q in (50, 90, 99)}}


def serve_and_measure(target: str, spec: dict | None, prompts: list[str], levels: list[int], min_requests: int,
                      max_tokens: int, log: Path) -> dict:
    import requests

    spec = dict(spec) if spec else None
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"))
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if spec and "env" in spec:
        env.update(spec.pop("env"))
    port = _free_port()
    base = f"http://{HOST}:{port}"
    cmd = [sys.executable, "-m", "vllm_specx.cli", "serve", target, "--host", HOST, "--port", str(port),
           "--served-model-name", NAME, "--dtype", os.environ.get("SPECX_BENCH_DTYPE", "float32"),
           "--max-model-len", "2048", "--max-num-seqs", str(max(levels)), "--enforce-eager"]
    if spec:
        cmd += ["--speculative-config", json.dumps(spec)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    http = requests.Session()
    http.trust_env = False
    out = {}
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited ({proc.returncode}); see {log}")
            try:
                if http.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(1)
        _stream_one(base, prompts[0], 8)  # warm-up
        for c in levels:
            n = max(c, min_requests)
            before = http.get(f"{base}/metrics").text
            level = run_level(base, (prompts * (n // len(prompts) + 1))[:n], c, max_tokens)
            after = http.get(f"{base}/metrics").text
            d = {k: _metric(after, k) - _metric(before, k) for k in (
                "vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                "vllm:spec_decode_num_accepted_tokens", "specx:draft_tokens_kept", "specx:skipped_steps",
                "specx:drafter_forwards_skipped", "specx:drafter_blind_requests", "vllm:prefix_cache_hits",
                "vllm:iteration_tokens_total_count", "vllm:iteration_tokens_total_sum")}
            level["spec_counters"] = d
            drafts, acc = d["vllm:spec_decode_num_drafts"], d["vllm:spec_decode_num_accepted_tokens"]
            level["mean_acceptance_length"] = 1 + acc / drafts if drafts else None
            passes = level["output_tokens"] - acc
            level["tokens_per_request_pass"] = level["output_tokens"] / passes if passes > 0 else None
            out[str(c)] = level
            print(f"  concurrency {c}: {level['tokens_per_s']:.1f} tok/s, ttft p50 {level['ttft_p50_s']:.2f}s, "
                  f"itl p50 {1e3 * (level['itl_p50_s'] or 0):.0f} ms", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def median_runs(reps: dict[str, list[dict]], levels: list[int]) -> dict:
    """Per method and level: the repetition with the median throughput ratio to `none` of the same
    repetition (the median throughput without `none`), plus every repetition's tokens/s and ratio."""
    out = {}
    for m, runs in reps.items():
        out[m] = {}
        for c in map(str, levels):
            tps = [r[c]["tokens_per_s"] for r in runs]
            ratios = [t / n[c]["tokens_per_s"] for t, n in zip(tps, reps["none"])] if "none" in reps else None
            key = ratios or tps
            median = sorted(range(len(key)), key=key.__getitem__)[(len(key) - 1) // 2]
            out[m][c] = dict(runs[median][c], reps_tokens_per_s=tps, reps_throughput_vs_none=ratios,
                             throughput_vs_none=ratios[median] if ratios else None)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    levels = result["concurrency"]
    # One level, several repetitions: the first panel shows every repetition's ratio to none instead.
    by_rep = len(levels) == 1 and result["runs"]["none" if "none" in result["runs"] else result["methods"][0]][
        str(levels[0])].get("reps_throughput_vs_none") is not None
    for i, m in enumerate(result["methods"]):
        r, color = result["runs"][m], f"C{i}"  # one colour per method; dashed = p90
        if by_rep:
            ratios = r[str(levels[0])]["reps_throughput_vs_none"]
            axes[0].bar([i + 0.8 * (j + 0.5) / len(ratios) - 0.4 for j in range(len(ratios))], ratios,
                        width=0.8 / len(ratios), color=color, label=m)
        else:
            axes[0].plot(levels, [r[str(c)]["tokens_per_s"] for c in levels], marker="o", color=color, label=m)
        axes[1].plot(levels, [r[str(c)]["ttft_p50_s"] for c in levels], marker="o", color=color, label=f"{m} p50")
        axes[1].plot(levels, [r[str(c)]["ttft_p90_s"] for c in levels], ls="--", marker=".", color=color,
                     label=f"{m} p90")
        axes[2].plot(levels, [1e3 * r[str(c)]["itl_p50_s"] for c in levels], marker="o", color=color, label=f"{m} p50")
        axes[2].plot(levels, [1e3 * r[str(c)]["itl_p90_s"] for c in levels], ls="--", marker=".", color=color,
                     label=f"{m} p90")
    for ax, title in zip(axes, ("output tokens/s", "time to first token (s)", "inter-token latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
        ax.legend()
    if by_rep:
        ax = axes[0]
        ax.set_xscale("linear")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(result["methods"])), result["methods"], fontsize=8)
        ax.set_xlabel(f"one bar per repetition, {levels[0]} in flight")
        ratios = [x for m in result["methods"] for x in result["runs"][m][str(levels[0])]["reps_throughput_vs_none"]]
        ax.set_ylim(min(0.8, min(ratios) - 0.02), max(1.1, max(ratios) + 0.02))
        ax.get_legend().remove()  # the ticks name the methods
        ax.set_title("output tokens/s, ratio to none of the same repetition")
    fig.suptitle(f"vllm serve, {result['target']} on {result['machine']['gpu'] or result['machine']['host_cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["none", "edd"], help="as in bench_acceptance.py")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--tag", default="smollm2_cpu")
    ap.add_argument("--reps", type=int, default=1, help="servers per method, methods interleaved; medians reported")
    ap.add_argument("--replot", type=Path, help="redraw the plot of a results JSON and exit")
    ap.add_argument("--interleave", action="store_true",
                    help="order prompts round-robin over categories (default: category by category, so a "
                         "level with few requests sees only the first categories)")
    ap.add_argument("--distinct", action="store_true",
                    help="as many distinct prompts as requests (default: max(concurrency) // 6 + 2 per category, "
                         "reused, so later requests hit the prefix cache)")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return

    from vllm_specx.models import smollm2_path

    target = str(smollm2_path())
    pool = max(args.concurrency + [args.min_requests]) if args.distinct else max(args.concurrency)
    labelled = load_prompts(["spec_bench"], per_category=pool // 6 + 2)
    if args.interleave:
        cats = list(dict.fromkeys(c for c, _ in labelled))
        by_cat = [[t for c, t in labelled if c == cat] for cat in cats]
        labelled = [(cats[j], ts[i]) for i in range(max(map(len, by_cat))) for j, ts in enumerate(by_cat) if i < len(ts)]
    prompts = [t for _, t in labelled]
    specs = {m.split("=", 1)[0]: method_config(m, args.k) for m in args.methods}
    result = {"target": "SmolLM2-135M-Instruct", "concurrency": args.concurrency, "methods": list(specs),
              "speculative_configs": specs, "max_tokens": args.max_tokens, "min_requests": args.min_requests,
              "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "reps": args.reps,
              "distinct_prompts": len(set(prompts)), "interleaved": args.interleave, "runs": {}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"serve_{args.tag}.json"
    reps: dict[str, list[dict]] = {m: [] for m in specs}
    for rep in range(args.reps):  # methods interleaved, so that drift of a shared host hits all of them
        for m, spec in specs.items():
            print(f"{m} (rep {rep + 1}/{args.reps})", flush=True)
            reps[m].append(serve_and_measure(target, spec, prompts, args.concurrency, args.min_requests,
                                             args.max_tokens, RESULTS / f".serve_{args.tag}_{m}.log"))
            result["runs"] = {m: r[-1] for m, r in reps.items() if r}  # partial results survive a crash
            out.write_text(json.dumps(result, indent=2))
    result["runs"] = median_runs(reps, args.concurrency)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
