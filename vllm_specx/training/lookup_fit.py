"""The `lookup` stage: fit the prompt-lookup accept table (`core.lookup.fit_lookup_table`) on the
target's own greedy responses to training prompts, and enable lookup candidates in the drafter's
specx_config.json. Reference answers (Alpaca outputs, stdlib source) are not the target's outputs, so
only `responses_generated.jsonl` files are read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm


def fit_lookup(drafter_dir: Path, work_dirs: list[Path], command: str, max_n: int = 4, k: int = 8) -> dict:
    from vllm_specx.checkpoint import SPECX_CONFIG_NAME, load_specx_config
    from vllm_specx.core.lookup import fit_lookup_table

    files = [w / "responses_generated.jsonl" for w in work_dirs if (w / "responses_generated.jsonl").exists()]
    if not files:
        raise SystemExit(f"the lookup stage reads the target's greedy responses (responses_generated.jsonl) from "
                         f"{[str(w) for w in work_dirs]}; none found: run the data stage first")
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    seqs, plens = [], []
    for r in rows:
        seqs.append(np.asarray(r["prompt_ids"] + r["response_ids"]))
        plens.append(len(r["prompt_ids"]))
    table, report = fit_lookup_table(tqdm(seqs, desc="lookup: fitting on responses", unit="resp"), plens,
                                     max_n=max_n, k=k)
    report["files"] = [str(f) for f in files]
    specx = load_specx_config(drafter_dir)
    specx.lookup = {"enabled": True, "min_n": 1, "first_accept": list(table.first),
                    "deeper_accept": list(table.deeper), "report": report, "command": command}
    (Path(drafter_dir) / SPECX_CONFIG_NAME).write_text(json.dumps(specx.validate().to_dict(), indent=2))
    return report
