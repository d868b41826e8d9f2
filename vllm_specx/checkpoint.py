"""Drafter checkpoints: `speculators` format (config.json with `speculators_config`) + `specx_config.json`.

A checkpoint folder holds:
  config.json           speculators format; `speculators_model_type` = "specx_edd", "eagle3" (a drafter vLLM
                        runs alone) or "specx_eagle3" (an EAGLE-3 drafter with specx's parts: `attach.py`)
  model.safetensors     the drafter's own tensors (embedding and LM head come from the target)
  specx_config.json     vllm-specx settings (validated by `SpecxConfig`), incl. the target it was trained for
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SPECX_CONFIG_NAME = "specx_config.json"
SPECX_FORMAT_VERSION = 1
EDD_SPECULATORS_TYPE = "specx_edd"
EAGLE3_SPECULATORS_TYPE = "specx_eagle3"  # an EAGLE-3 drafter with specx's parts (`vllm-specx attach`)
VOCAB_MODES = ("full", "fixed", "speculative")


class SpecxConfigError(ValueError):
    """A malformed or inconsistent vllm-specx configuration; the message names the fix."""


@dataclass
class TargetSignature:
    """What a drafter must match in the served model."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    name_or_path: str = ""


@dataclass
class SpecxConfig:
    drafter: str  # "edd" | "eagle3"
    target: TargetSignature
    format_version: int = SPECX_FORMAT_VERSION
    num_speculative_tokens: int = 5
    vocab_mode: str = "full"  # SpecVocab switch: full | fixed | speculative
    vocab: dict[str, Any] = field(default_factory=dict)  # subset-head tensors and sizes (see vllm_adapter.vocab_head)
    tree: dict[str, Any] = field(default_factory=dict)
    early_stop: dict[str, Any] = field(default_factory=dict)
    lookup: dict[str, Any] = field(default_factory=dict)  # prompt-lookup candidates (lookup_choice.LookupCandidates)
    training: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> SpecxConfig:
        if self.format_version != SPECX_FORMAT_VERSION:
            raise SpecxConfigError(
                f"specx_config.json has format_version {self.format_version}; this vllm-specx reads "
                f"{SPECX_FORMAT_VERSION}. Re-export the drafter with this version's `vllm-specx train`."
            )
        if self.drafter not in ("edd", "eagle3"):
            raise SpecxConfigError(f"specx_config.json: drafter must be 'edd' or 'eagle3', got {self.drafter!r}")
        if self.vocab_mode not in VOCAB_MODES:
            raise SpecxConfigError(f"specx_config.json: vocab_mode must be one of {VOCAB_MODES}, got {self.vocab_mode!r}")
        if not _is_int(self.num_speculative_tokens) or not 1 <= self.num_speculative_tokens <= 64:
            raise SpecxConfigError("specx_config.json: num_speculative_tokens must be an integer in [1, 64]")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
            value = getattr(self.target, name)
            if not _is_int(value) or value <= 0:
                raise SpecxConfigError(f"specx_config.json: target.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.target.architecture, str) or not isinstance(self.target.name_or_path, str):
            raise SpecxConfigError("specx_config.json: target.architecture and target.name_or_path must be strings")
        self._validate_early_stop()
        self._validate_tree()
        self._validate_lookup()
        self._validate_vocab()
        return self

    def _validate_vocab(self) -> None:
        vocab = self.vocab
        if not isinstance(vocab, dict):
            raise SpecxConfigError("specx_config.json: vocab must be an object")
        if self.vocab_mode != "full" and not vocab:
            raise SpecxConfigError(f"specx_config.json: vocab_mode {self.vocab_mode!r} needs a 'vocab' section "
                                   "(written by `vllm-specx train --stages vocab`), or set vocab_mode to 'full'")
        path = vocab.get("path", "vocab/vocab.safetensors")
        if not isinstance(path, str) or not path or Path(path).is_absolute() or ".." in path:
            raise SpecxConfigError(f"specx_config.json: vocab.path must be a file name inside the drafter folder, got {path!r}")
        for name, lo, hi in (("num_candidates", 1, self.target.vocab_size), ("return_topk", 1, 64),
                             ("rank", 1, 1 << 16), ("fixed_size", 1, self.target.vocab_size),
                             ("max_batch", 1, 1 << 20)):
            value = vocab.get(name, lo)
            if not _is_int(value) or not lo <= value <= hi:
                raise SpecxConfigError(f"specx_config.json: vocab.{name} must be an integer in [{lo}, {hi}], got {value!r}")

    def _validate_tree(self) -> None:
        tree = self.tree
        if not isinstance(tree.get("enabled", False), bool):
            raise SpecxConfigError("specx_config.json: tree.enabled must be true or false")
        sib = tree.get("max_siblings", 3)
        if isinstance(sib, bool) or not isinstance(sib, int) or not 1 <= sib <= 16:
            raise SpecxConfigError(f"specx_config.json: tree.max_siblings must be an integer in [1, 16], got {sib!r}")
        thr = tree.get("threshold", 0.0)
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0.0 <= thr <= 1.0:
            raise SpecxConfigError(f"specx_config.json: tree.threshold must be a number in [0, 1], got {thr!r}")
        children = tree.get("expand_children", 2)
        if isinstance(children, bool) or not isinstance(children, int) or not 0 <= children <= 16:
            raise SpecxConfigError("specx_config.json: tree.expand_children (children drafted under each runner-up, "
                                   f"0 = none) must be an integer in [0, 16], got {children!r}")
        if not isinstance(tree.get("branch_decision", True), bool):
            raise SpecxConfigError("specx_config.json: tree.branch_decision (the decision model estimates the children "
                                   "of expanded runner-ups) must be true or false")

    def _validate_lookup(self) -> None:
        lk = self.lookup
        if not lk:
            return
        allowed = ("enabled", "min_n", "first_accept", "deeper_accept", "preempt_expected", "shared_calibration",
                   "report", "command")
        unknown = set(lk) - set(allowed)
        if unknown:
            raise SpecxConfigError(f"specx_config.json: unknown lookup keys {sorted(unknown)}; allowed: {', '.join(allowed)}")
        if not isinstance(lk.get("enabled", False), bool):
            raise SpecxConfigError("specx_config.json: lookup.enabled must be true or false")
        first, deeper = lk.get("first_accept"), lk.get("deeper_accept")
        ok = (isinstance(first, list) and isinstance(deeper, list) and 1 <= len(first) == len(deeper) <= 32
              and all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p <= 1.0
                      for p in first + deeper))
        if not ok:
            raise SpecxConfigError("specx_config.json: lookup.first_accept and lookup.deeper_accept must be lists "
                                   "of equal length (1-32) of probabilities, one per matched n-gram length; fit them "
                                   "with `vllm-specx train --stages lookup`")
        preempt = lk.get("preempt_expected", 1.0)
        if isinstance(preempt, bool) or not isinstance(preempt, (int, float)) or not 0.0 < preempt <= 64.0:
            raise SpecxConfigError("specx_config.json: lookup.preempt_expected (expected accepted lookup tokens above "
                                   f"which the drafter's head is skipped) must be a number in (0, 64], got {preempt!r}")
        shared = lk.get("shared_calibration", None)
        if shared is not None and (isinstance(shared, bool) or not isinstance(shared, (int, float))
                                   or not 0.0 <= shared < 1.0):
            raise SpecxConfigError("specx_config.json: lookup.shared_calibration (decay of the engine-wide accepted / "
                                   f"expected ratio, or null for none) must be a number in [0, 1) or null, got {shared!r}")
        min_n = lk.get("min_n", 1)
        if not _is_int(min_n) or not 1 <= min_n <= len(first):
            raise SpecxConfigError(f"specx_config.json: lookup.min_n must be an integer in [1, {len(first)}], got {min_n!r}")
        if lk.get("enabled", False) and not self.early_stop:
            raise SpecxConfigError("specx_config.json: lookup needs the early_stop section (lookup chains compete with "
                                   "the drafter's by the early-stop model's accept probabilities); add it with "
                                   "`vllm-specx train --stages early-stop` or set lookup.enabled to false")

    def _validate_early_stop(self) -> None:
        es = self.early_stop
        if not es:
            return
        if not isinstance(es.get("path"), str) or not es["path"] or Path(es["path"]).is_absolute() or ".." in es["path"]:
            raise SpecxConfigError("specx_config.json: early_stop.path must name the decision model's folder inside "
                                   f"the drafter folder (e.g. 'early_stop'), got {es.get('path')!r}")
        threshold = es.get("threshold", 0.0)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise SpecxConfigError(f"specx_config.json: early_stop.threshold must be a number in [0, 1], got {threshold!r}")
        for flag in ("enabled", "online_calibration", "step_payoff", "skip_forward", "skip_prefill"):
            if not isinstance(es.get(flag, True), bool):
                raise SpecxConfigError(f"specx_config.json: early_stop.{flag} must be true or false")
        if es.get("skip_prefill", False) and not es.get("skip_forward", True):
            raise SpecxConfigError("specx_config.json: early_stop.skip_prefill skips the drafter's forward on prefill "
                                   "steps too, so it needs skip_forward; set skip_forward to true or drop skip_prefill")
        if "cost_model" in es and not isinstance(es["cost_model"], str):
            raise SpecxConfigError("specx_config.json: early_stop.cost_model must be a file name in the drafter folder")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "specx_config.json") -> SpecxConfig:
        if not isinstance(data, dict):
            raise SpecxConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SpecxConfigError(f"{source}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        for required in ("drafter", "target"):
            if required not in data:
                raise SpecxConfigError(f"{source}: missing required key {required!r}")
        target = data["target"]
        if not isinstance(target, dict):
            raise SpecxConfigError(f"{source}: 'target' must be an object")
        tknown = {f.name for f in fields(TargetSignature)}
        if set(target) - tknown or not {"architecture", "vocab_size", "hidden_size", "num_hidden_layers"} <= set(target):
            raise SpecxConfigError(
                f"{source}: 'target' needs architecture, vocab_size, hidden_size, num_hidden_layers "
                f"(optional name_or_path); got keys {sorted(target)}"
            )
        for key in ("vocab", "tree", "early_stop", "lookup", "training"):
            if key in data and not isinstance(data[key], dict):
                raise SpecxConfigError(f"{source}: {key!r} must be an object")
        try:
            cfg = cls(**{**data, "target": TargetSignature(**target)})
        except TypeError as e:
            raise SpecxConfigError(f"{source}: {e}") from e
        return cfg.validate()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_specx_config(folder: str | Path) -> SpecxConfig:
    path = Path(folder) / SPECX_CONFIG_NAME
    if not path.exists():
        raise SpecxConfigError(
            f"{path} is missing: {folder} is not a vllm-specx drafter checkpoint. "
            "Export one with `vllm-specx train` or point `model` at a folder that has it."
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpecxConfigError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt, re-export it.") from e
    return SpecxConfig.from_dict(data, source=str(path))


def edd_speculators_config(arch: dict[str, Any], target: TargetSignature, num_speculative_tokens: int) -> dict:
    """config.json for an EDD drafter in the `speculators` layout."""
    return {
        "architectures": ["SpecxEddForCausalLM"],
        "speculators_model_type": EDD_SPECULATORS_TYPE,
        "speculators_version": "0.3.0",
        "speculators_config": {
            "algorithm": EDD_SPECULATORS_TYPE,
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": num_speculative_tokens}],
            "verifier": {"name_or_path": target.name_or_path or "unknown", "architectures": [target.architecture]},
        },
        "transformer_layer_config": {
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": arch["vocab_size"],
            "hidden_size": arch["hidden_size"],
            "intermediate_size": arch["intermediate_size"],
            "num_hidden_layers": 1,
            "num_attention_heads": arch["num_attention_heads"],
            "num_key_value_heads": arch["num_key_value_heads"],
            "head_dim": arch["head_dim"],
            "rms_norm_eps": arch["rms_norm_eps"],
            "rope_theta": arch["rope_theta"],
            "max_position_embeddings": arch["max_position_embeddings"],
            "tie_word_embeddings": False,
        },
        "target_hidden_size": arch["target_hidden_size"],
        "eagle_aux_hidden_state_layer_ids": [arch["target_layer_id"]],
        "draft_vocab_size": arch["vocab_size"],
    }


def update_edd_pretrained_config(config_dict: dict, pre_trained_config: dict) -> None:
    """vLLM speculators-algorithm hook: speculators config.json -> the HF config vLLM builds the model from."""
    pre_trained_config["architectures"] = ["SpecxEddForCausalLM"]
    pre_trained_config["target_hidden_size"] = config_dict.get("target_hidden_size", pre_trained_config.get("hidden_size"))
    pre_trained_config["eagle_aux_hidden_state_layer_ids"] = config_dict["eagle_aux_hidden_state_layer_ids"]
    pre_trained_config["draft_vocab_size"] = pre_trained_config["vocab_size"]


def update_specx_eagle3_pretrained_config(config_dict: dict, pre_trained_config: dict) -> None:
    """vLLM speculators-algorithm hook for `specx_eagle3`: vLLM's own `eagle3` conversion, then specx's class
    (the same layers and weights, with specx's parts)."""
    from vllm.transformers_utils.configs.speculators.algos import SUPPORTED_SPECULATORS_TYPES

    SUPPORTED_SPECULATORS_TYPES["eagle3"](config_dict=config_dict, pre_trained_config=pre_trained_config)
    arch = pre_trained_config.get("architectures")
    if arch != ["Eagle3LlamaForCausalLM"]:
        raise SpecxConfigError(f"specx attaches to EAGLE-3 drafters with Llama layers; this one builds {arch}. "
                               "Serve it with vLLM's own method='eagle3'.")
    pre_trained_config["architectures"] = ["SpecxEagle3ForCausalLM"]
