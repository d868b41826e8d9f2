"""`vllm-specx attach EAGLE3_DIR --out DIR`: specx's parts on an existing EAGLE-3 drafter, by configuration.

DIR gets
  config.json        EAGLE3_DIR's speculators config with the algorithm `specx_eagle3` (vLLM builds its own
                     EAGLE-3 layers from it, as `SpecxEagle3ForCausalLM`: vllm_adapter/eagle3_model.py)
  *.safetensors      relative links to EAGLE3_DIR's weights (nothing copied; EAGLE3_DIR is not touched and
                     stays a plain vLLM `eagle3` drafter; move the two folders together, or attach again)
  specx_config.json  specx's settings for it, validated like an EDD drafter's
The parts that need training are added to DIR by `vllm-specx train --drafter eagle3 --out DIR --stages
data,record,early-stop,lookup` (the MCSD decision model, then the prompt-lookup table, which needs it) and
`vllm-specx calibrate DIR` (the cost model); PCT trees by `"tree": {"enabled": true}` in specx_config.json
(runner-ups are tree leaves: vLLM's EAGLE-3 layer has no pass below them). Attaching again keeps DIR's
trained parts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HELP = "give an existing EAGLE-3 drafter (speculators format) specx's parts, in a new folder"
DESCRIPTION = __doc__.split("\n\n", 1)[1]


def add_arguments(parser) -> None:
    parser.add_argument("eagle3_dir", help="EAGLE-3 drafter folder in the speculators format (config.json + weights)")
    parser.add_argument("--out", required=True, help="folder to write (weights are linked, not copied)")
    parser.add_argument("--target", default=None,
                        help="the target's HF folder, or 'smollm2' / 'gemma3' (default: the checkpoint's verifier "
                             "name_or_path, when that is a local folder)")
    parser.add_argument("--num-speculative-tokens", type=int, default=None,
                        help="K (default: the checkpoint's proposal speculative_tokens)")


def run(args) -> int:
    out = attach_eagle3(args.eagle3_dir, args.out, target=args.target,
                        num_speculative_tokens=args.num_speculative_tokens)
    print(f"wrote {out}: serve it with --speculative-config "
          f"'{{\"method\": \"eagle3\", \"model\": \"{out}\", \"num_speculative_tokens\": "
          f"{json.loads((out / 'specx_config.json').read_text())['num_speculative_tokens']}}}'")
    return 0


def attach_eagle3(eagle3_dir: str | Path, out_dir: str | Path, target: str | None = None,
                  num_speculative_tokens: int | None = None) -> Path:
    from vllm_specx.checkpoint import EAGLE3_SPECULATORS_TYPE, SPECX_CONFIG_NAME, SpecxConfig, SpecxConfigError

    src, out = Path(eagle3_dir).resolve(), Path(out_dir)
    cfg = _speculators_config(src)
    weights = sorted(src.glob("*.safetensors")) + sorted(src.glob("*.safetensors.index.json"))
    if not any(w.suffix == ".safetensors" for w in weights):
        raise SpecxConfigError(f"{src} has no *.safetensors weights to attach to.")
    if out.resolve() == src:
        raise SpecxConfigError("--out must be a new folder: the EAGLE-3 folder stays as it is, for plain vLLM.")
    existing = out / "config.json"
    if existing.exists() and json.loads(existing.read_text()).get("speculators_model_type") != EAGLE3_SPECULATORS_TYPE:
        raise SpecxConfigError(f"{out} already holds another checkpoint; choose an empty --out folder.")
    k = num_speculative_tokens or _proposal_tokens(cfg)
    if not 1 <= k <= 64:
        raise SpecxConfigError(f"--num-speculative-tokens must be in [1, 64], got {k}")
    signature = _target_signature(cfg, src, target)
    out.mkdir(parents=True, exist_ok=True)
    for w in weights:  # relative links: DIR and EAGLE3_DIR may move together (a repository, a mounted volume)
        link = out / w.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(w, out.resolve()))
    spec = dict(cfg["speculators_config"], algorithm=EAGLE3_SPECULATORS_TYPE)
    spec["proposal_methods"] = [dict(m, speculative_tokens=k) for m in spec["proposal_methods"]]
    (out / "config.json").write_text(json.dumps(dict(cfg, speculators_model_type=EAGLE3_SPECULATORS_TYPE,
                                                     speculators_config=spec), indent=2))
    kept = json.loads((out / SPECX_CONFIG_NAME).read_text()) if (out / SPECX_CONFIG_NAME).exists() else {}
    specx = SpecxConfig(drafter="eagle3", target=signature, num_speculative_tokens=k,
                        tree=kept.get("tree", {}), early_stop=kept.get("early_stop", {}), lookup=kept.get("lookup", {}),
                        training={**kept.get("training", {}), "attached_to": os.path.relpath(src, out.resolve())})
    (out / SPECX_CONFIG_NAME).write_text(json.dumps(specx.validate().to_dict(), indent=2))
    return out


def _speculators_config(src: Path) -> dict:
    from vllm_specx.checkpoint import SpecxConfigError

    try:
        cfg = json.loads((src / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise SpecxConfigError(f"{src}/config.json cannot be read ({e}): give an EAGLE-3 drafter folder.") from e
    kind = cfg.get("speculators_model_type")
    if kind != "eagle3" or "speculators_config" not in cfg or "transformer_layer_config" not in cfg:
        raise SpecxConfigError(
            f"{src} is not an EAGLE-3 drafter in the speculators format (speculators_model_type {kind!r}); attach "
            "reads what vLLM serves with method='eagle3' from such a folder. A specx EDD drafter needs no attach.")
    return cfg


def _proposal_tokens(cfg: dict) -> int:
    methods = cfg["speculators_config"].get("proposal_methods") or [{}]
    return int(methods[0].get("speculative_tokens", 3))


def _target_signature(cfg: dict, src: Path, target: str | None):
    """The target the drafter was trained for: --target, else the checkpoint's verifier when it is a local folder."""
    from vllm_specx.checkpoint import SpecxConfigError, load_specx_config

    if target is None and (src / "specx_config.json").exists():
        return load_specx_config(src).target  # this project's own EAGLE-3 export records it
    from vllm_specx.models import resolve_target
    from vllm_specx.training.export import target_signature

    path = resolve_target(target) if target else cfg["speculators_config"].get("verifier", {}).get("name_or_path", "")
    if not path or not (Path(path) / "config.json").exists():
        raise SpecxConfigError(f"the target of {src} is not a local folder ({path!r}); pass --target with the "
                               "served model's HF folder.")
    return target_signature(path)
