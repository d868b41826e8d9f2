"""The layering the code relies on: the engine-free core imports no vLLM, and the vLLM adapter (runtime)
imports neither the test harness (`vllm_specx.testing`) nor the calibration command (`vllm_specx.calibrate`),
and keeps each unit under 500 lines."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "vllm_specx"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_imports_no_vllm():
    offenders = {p.name: sorted(m for m in imported_modules(p) if m == "vllm" or m.startswith("vllm."))
                 for p in (PKG / "core").glob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_adapter_imports_neither_the_test_harness_nor_the_calibration_command():
    banned = {"vllm_specx.testing", "vllm_specx.calibrate"}
    offenders = {p.name: sorted(imported_modules(p) & banned) for p in (PKG / "vllm_adapter").glob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_adapter_files_stay_small():
    """One concern per adapter unit (draft length, lookup choice, runner hooks, tree steps, tree backends,
    ...): no file over 500 lines."""
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PKG / "vllm_adapter").glob("*.py")}
    assert not {k: v for k, v in sizes.items() if v > 500}
