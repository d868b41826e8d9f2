"""benchmarks/bench.py, the one benchmark entry point: every subcommand is listed and resolves to an
existing script with the committed configuration (dry runs only: nothing is benchmarked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402

sys.path.pop(0)


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "benchmarks/bench.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    for name in bench.REGISTRY:
        assert name in out


@pytest.mark.parametrize("name", sorted(bench.REGISTRY))
def test_each_subcommand_resolves_to_a_script_and_valid_configs(name, capsys):
    entry = bench.REGISTRY[name]
    assert (ROOT / "benchmarks" / entry.script).is_file()
    assert bench.main([name, "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(entry.runs)
    for argv, _env, result in bench.commands(entry, entry.tag, [], dry_run=True):
        for arg in argv:
            label, _, config = arg.partition("=")
            if config.startswith("{"):
                assert "method" in json.loads(config), (label, config)
        if entry.output:
            assert result is not None and result.endswith(".json")


def test_committed_results_record_their_command_and_packages():
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        data = json.loads(path.read_text())
        assert data.get("command"), f"{path.name} lacks its command"
        assert data.get("packages"), f"{path.name} lacks its package versions"


def test_extra_arguments_and_tag_reach_the_script():
    argv, env, result = bench.commands(bench.REGISTRY["paired-step-skipping"], "x", ["--max-tokens", "8"])[1]
    assert argv[-4:] == ["--tag", "x_off", "--max-tokens", "8"] and env["SPECX_STEP_PAYOFF"] == "0"
    assert result.endswith("results/paired_x_off.json")


def test_a_benchmark_that_needs_a_drafter_path_says_so(monkeypatch):
    monkeypatch.delenv("EDD_MIXED", raising=False)
    with pytest.raises(SystemExit, match="EDD_MIXED"):
        bench.commands(bench.REGISTRY["equal-budget-mixed"], "t", [])
