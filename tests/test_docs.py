"""README.md and docs/*.md name only what exists: result files, docs pages and their sections, repository
paths, bench.py subcommands; README stays short. Fast (reads text files only)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README_MAX_LINES = 350
# results a committed script writes but that no machine of the project has produced yet
NOT_YET_RUN = {"acceptance_pct_smollm2_gpu.json", "acceptance_pct_smollm2_gpu.png"}
RESULT_PREFIXES = ("acceptance_", "paired_", "serve_", "lookup_", "step_", "target_init_", "drafter_", "lm_head_",
                   "tree_attention_kernel_", "vs_vllm_")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def _result_names(text: str) -> set[str]:
    names = set()
    for m in re.finditer(r"(?<![\w.-])([\w-]+\.(?:json|png))\b", text):
        if m.group(1).startswith(RESULT_PREFIXES):
            names.add(m.group(1))
    return names


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it to {README_MAX_LINES}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_named_results_exist(page):
    text = page.read_text()
    missing = sorted(n for n in _result_names(text) if not (RESULTS / n).is_file() and n not in NOT_YET_RUN)
    assert not missing, f"{page.name} names results that are not in benchmarks/results/: {missing}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_links_and_anchors_exist(page):
    bad = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", page.read_text()):
        target = m.group(1)
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no such section)")
    assert not bad, f"{page.name} links to what does not exist: {bad}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_named_repository_paths_exist(page):
    text = page.read_text()
    missing = []
    for m in re.finditer(r"`((?:vllm_specx|tests|scripts|benchmarks|constraints|docs)/[\w./-]*)`", text):
        path = m.group(1).rstrip("/.")
        if any(ch in path for ch in "<>*{}") or path.startswith("benchmarks/results/"):
            continue
        if not (ROOT / path).exists() and Path(path).name not in NOT_YET_RUN:
            missing.append(path)
    assert not missing, f"{page.name} names paths that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_named_bench_subcommands_exist(page):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    named = set(re.findall(r"benchmarks/bench\.py ([a-z][a-z0-9-]+)", page.read_text()))
    unknown = sorted(named - set(bench.REGISTRY))
    assert not unknown, f"{page.name} names bench.py subcommands that do not exist: {unknown}"


def test_result_names_carry_no_run_tags():
    tagged = [p.name for p in RESULTS.iterdir() if re.search(r"_s\d{1,2}(_|\.)|_rep\d", p.name)]
    assert not tagged, f"results must have stable descriptive names, not run tags: {tagged}"


def test_the_checks_can_fail(tmp_path):
    assert _result_names("see `benchmarks/results/acceptance_nothing_here.json`") == {"acceptance_nothing_here.json"}
    assert _slug("Early stop (MCSD) and the cost model") == "early-stop-mcsd-and-the-cost-model"
    assert _slug("vLLM-CPU's mixed-batch bug") == "vllm-cpus-mixed-batch-bug"
