"""Where a drafter folder keeps its cost models, and which one fits this machine (runtime; no engine).

`vllm-specx calibrate` writes DRAFTER/cost_model[.<mode>].json, or, when that file holds another machine's
measurements, DRAFTER/cost_models/<machine>/...; the drafter's loader takes the one measured here.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

MACHINES_DIR = "cost_models"  # DRAFTER/cost_models/<machine>/cost_model*.json: other machines' measurements


def machine_id() -> str:
    """What a cost model was measured on: the GPU if one is used, else the CPU model and core count."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    cpu = ""
    if Path("/proc/cpuinfo").exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    return f"{cpu or platform.processor() or 'cpu'} x{os.cpu_count()}"


def cost_model_candidates(drafter: str | Path, name: str) -> list[Path]:
    """Files named `name` that may hold a cost model for this drafter: DRAFTER/name, then one per
    machine under DRAFTER/cost_models/ (a drafter shipped to several kinds of machine carries one each)."""
    root = Path(drafter)
    return [p for p in [root / name, *sorted(root.glob(f"{MACHINES_DIR}/*/{name}"))] if p.is_file()]


def find_cost_model(drafter: str | Path, names: list[str], machine: str | None = None):
    """The first cost model measured on `machine` (default: this one), trying `names` in order, each at
    the top of the drafter folder and then per machine. Returns (CostModel or None, its path or None,
    the machines of the files that did not match, for the caller's warning)."""
    from vllm_specx.core.cost_model import CostModel

    machine = machine or machine_id()
    others: list[str] = []
    for name in names:
        for path in cost_model_candidates(drafter, name):
            model = CostModel.load(path)
            if model.machine == machine:
                return model, path, others
            others.append(model.machine)
    return None, None, others
