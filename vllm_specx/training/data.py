"""Stage 1 of `vllm-specx train`: training prompts -> target-generated responses -> recorded target states.

Prompts come from training-only sources (Alpaca instructions shipped in the `llamafactory` sdist, and
instructions built from the Python standard library's own functions). Evaluation sets (Spec-Bench,
MT-Bench, HumanEval, GSM8K) are never used; `drop_eval_overlap` removes any prompt that appears in
an evaluation file it is given.

Records (one safetensors shard per `shard_size` sequences, so the stage resumes where it stopped):
  tokens_<i>   [S] int32     prompt + response token ids
  hidden_<i>   [S, L, Ht] fp16  target hidden states at the recorded layers (EDD's soft-prompt layer
                             and EAGLE-3's low/middle/high layers, so one recording trains both)
  topk_ids_<i> [S, k] int32  target top-k ids of the next-token distribution at each position
  topk_lp_<i>  [S, k] fp16   their log-probabilities (full-vocabulary normalised)
  meta: prompt_len per sequence
"""

from __future__ import annotations

import ast
import json
import random
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

LLAMAFACTORY_SDIST = "llamafactory==0.9.5"
ALPACA_MEMBER = "data/alpaca_en_demo.json"


# ---------------------------------------------------------------- prompts


def pip_download(requirement: str, dest: str | Path, binary: bool) -> Path:
    """Fetch one distribution of `requirement` (a wheel if `binary`, else the sdist) into `dest`, no deps."""
    fmt = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *fmt, "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    name = requirement.split("=")[0].strip().lower()
    found = sorted(Path(dest).glob(f"{name}-*" + (".whl" if binary else ".tar.gz")))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"could not fetch {requirement}: {proc.stderr[-300:]}")
    return found[0]


def alpaca_rows(cache: Path) -> list[dict]:
    """Alpaca rows (instruction, input, output) from the llamafactory sdist (downloaded once, cached)."""
    out = cache / "alpaca_en_demo.json"
    if not out.exists():
        with tempfile.TemporaryDirectory() as tmp:
            with tarfile.open(pip_download(LLAMAFACTORY_SDIST, tmp, binary=False)) as tf:
                member = next(m for m in tf.getmembers() if m.name.endswith(ALPACA_MEMBER))
                out.write_bytes(tf.extractfile(member).read())
    return json.loads(out.read_text())


def drop_eval_overlap(prompts: list[str], eval_files: list[Path], extra_texts: list[str] = ()) -> list[str]:
    """Remove prompts whose text appears in any evaluation file or in `extra_texts` (never train on
    an evaluation set)."""
    eval_texts: set[str] = {t.strip()[:200] for t in extra_texts}
    for f in eval_files:
        if f.exists():
            for line in f.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                for t in row.get("turns", []) + [row.get("question", ""), row.get("prompt", "")]:
                    if t:
                        eval_texts.add(t.strip()[:200])
    return [p for p in prompts if p.strip()[:200] not in eval_texts]


def stdlib_code_pairs(limit: int, seed: int = 0) -> list[tuple[str, str]]:
    """(instruction, reference solution) pairs from documented standard-library functions."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pairs = []
    for path in sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("_")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                code = ast.get_source_segment(source, node)
                if doc and code and 40 <= len(doc) <= 600 and len(code) < 2500:
                    args = ", ".join(a.arg for a in node.args.args)
                    pairs.append((f"Write a Python function `{node.name}({args})`. {doc.splitlines()[0]}",
                                  f"```python\n{code}\n```"))
    random.Random(seed).shuffle(pairs)
    return pairs[:limit]


def alpaca_pairs(cache: Path) -> list[tuple[str, str]]:
    rows = alpaca_rows(cache)
    return [((r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")).strip(), r["output"]) for r in rows]


def reference_responses(target: str, pairs: list[tuple[str, str]], out_file: Path, max_len: int) -> None:
    """Reference answers as responses (teacher-forced; no generation). The drafter still learns the
    target's own distribution on them: labels are the target's top-k at every position."""
    from transformers import AutoTokenizer

    from vllm_specx.models import end_of_turn_id, user_prompt_ids

    tok = AutoTokenizer.from_pretrained(target)
    end = end_of_turn_id(tok)
    with out_file.open("w") as fh:
        for prompt, answer in pairs:
            ids = user_prompt_ids(tok, prompt)
            resp = tok(answer, add_special_tokens=False)["input_ids"] + ([end] if end is not None else [])
            if len(ids) < max_len // 2:
                fh.write(json.dumps({"prompt_ids": ids, "response_ids": resp[: max_len - len(ids)],
                                     "source": "reference"}) + "\n")


# ---------------------------------------------------------------- responses (vLLM)


def generate_responses(target: str, prompts: list[str], out_file: Path, max_tokens: int, max_model_len: int) -> None:
    """Greedy target responses, generated by vLLM in batches; appends, so a rerun resumes."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams, TokensPrompt

    done = 0
    if out_file.exists():
        done = sum(1 for _ in out_file.open())
    todo = prompts[done:]
    if not todo:
        return
    tok = AutoTokenizer.from_pretrained(target)
    from vllm_specx.models import user_prompt_ids

    prompt_ids = [user_prompt_ids(tok, p) for p in todo]
    keep = max_model_len - max_tokens
    # fp32: on CPUs without native bf16 (AVX2 only) bf16 matmuls are emulated and several times slower
    llm = LLM(target, max_model_len=max_model_len, enforce_eager=True, seed=0, dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    chunk = 256  # vLLM batches these; bigger chunks keep the CPU busy, appends keep it resumable
    with out_file.open("a") as fh:
        for i in tqdm(range(0, len(prompt_ids), chunk), desc="generating responses", unit="batch"):
            batch = [ids[-keep:] for ids in prompt_ids[i : i + chunk]]
            outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in batch], params, use_tqdm=False)
            for ids, o in zip(batch, outs):
                fh.write(json.dumps({"prompt_ids": ids, "response_ids": list(o.outputs[0].token_ids)}) + "\n")
            fh.flush()
    del llm


# ---------------------------------------------------------------- target states (HF, teacher forcing)


@torch.no_grad()
def record_target_states(
    target: str, responses_file: Path, out_dir: Path, layer_ids: list[int], topk: int = 16, shard_size: int = 64,
) -> list[Path]:
    """Teacher-forced target forward over prompt+response: hidden states at `layer_ids` (vLLM aux
    numbering = HF hidden_states index) and the top-k next-token distribution."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    rows = [json.loads(line) for line in responses_file.read_text().splitlines()]
    out_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(target, torch_dtype=torch.float32)
    model.eval()
    shards = []
    n_shards = (len(rows) + shard_size - 1) // shard_size
    for s in tqdm(range(n_shards), desc="recording target states", unit="shard"):
        path = out_dir / f"shard_{s:05d}.safetensors"
        shards.append(path)
        if path.exists():
            continue  # resume
        tensors, prompt_lens = {}, []
        for j, row in enumerate(rows[s * shard_size : (s + 1) * shard_size]):
            ids = torch.tensor(row["prompt_ids"] + row["response_ids"], dtype=torch.long)[None]
            out = model(ids, output_hidden_states=True)
            logp = torch.log_softmax(out.logits[0].float(), dim=-1)
            top_lp, top_ids = logp.topk(topk, dim=-1)
            tensors[f"tokens_{j}"] = ids[0].to(torch.int32)
            tensors[f"hidden_{j}"] = torch.stack([out.hidden_states[i][0] for i in layer_ids], 1).to(torch.float16)
            tensors[f"topk_ids_{j}"] = top_ids.to(torch.int32)
            tensors[f"topk_lp_{j}"] = top_lp.to(torch.float16)
            prompt_lens.append(len(row["prompt_ids"]))
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"prompt_lens": json.dumps(prompt_lens), "layer_ids": json.dumps(layer_ids)})
        tmp.rename(path)
    return shards


def load_records(shards: list[Path], layer_ids: list[int]) -> list[dict[str, torch.Tensor | int]]:
    """Records with `hidden` [S, len(layer_ids) * Ht]: the requested layers, concatenated in order."""
    from safetensors import safe_open

    records = []
    for path in shards:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            prompt_lens = json.loads(meta["prompt_lens"])
            have = json.loads(meta["layer_ids"]) if "layer_ids" in meta else [int(meta["layer_id"])]
            missing = [i for i in layer_ids if i not in have]
            if missing:
                raise ValueError(f"{path} holds target layers {have}, not {missing}: re-run the record stage "
                                 "in a fresh --work-dir")
            pick = [have.index(i) for i in layer_ids]
            for j, plen in enumerate(prompt_lens):
                hidden = f.get_tensor(f"hidden_{j}")
                hidden = hidden[:, None] if hidden.dim() == 2 else hidden  # single-layer shards: [S, Ht]
                records.append({
                    "tokens": f.get_tensor(f"tokens_{j}").long(),
                    "hidden": hidden[:, pick].flatten(1),
                    "topk_ids": f.get_tensor(f"topk_ids_{j}").long(),
                    "topk_lp": f.get_tensor(f"topk_lp_{j}"),
                    "prompt_len": plen,
                })
    return records
