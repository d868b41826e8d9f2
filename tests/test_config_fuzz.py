"""Fuzz the specx_config.json parser: any mutation is either a valid config or a SpecxConfigError
(never another exception, never a silently accepted bad value)."""

import copy
import json
import random

import pytest

from vllm_specx.checkpoint import SpecxConfig, SpecxConfigError, TargetSignature, load_specx_config

VALID = SpecxConfig(drafter="edd", target=TargetSignature("LlamaForCausalLM", 49152, 576, 30, "smollm2"),
                    early_stop={"path": "early_stop", "kind": "mlp", "threshold": 0.3}).validate().to_dict()
ODD_VALUES = [None, True, False, 0, -1, 1, 3.5, float("nan"), "", "edd", "x" * 300, [], [1], {}, {"a": 1},
              2**70, "../escape", "/abs/path", "early_stop"]


def _paths(d, prefix=()):
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


def _mutate(cfg: dict, rng: random.Random) -> dict:
    cfg = copy.deepcopy(cfg)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(list(_paths(cfg)) or [()])
        parent = cfg
        for k in path[:-1]:
            parent = parent[k]
        op = rng.random()
        if op < 0.5 and path:
            parent[path[-1]] = rng.choice(ODD_VALUES)
        elif op < 0.75 and path:
            parent.pop(path[-1], None)
        else:
            parent[rng.choice(["extra", "Drafter", "num_speculative_token"])] = rng.choice(ODD_VALUES)
        if not isinstance(cfg, dict):
            break
    return cfg


@pytest.mark.parametrize("seed", range(4))
def test_mutated_configs_parse_or_fail_cleanly(tmp_path, seed):
    rng = random.Random(seed)
    accepted = rejected = 0
    for i in range(300):
        cfg = _mutate(VALID, rng)
        folder = tmp_path / f"c{i}"
        folder.mkdir()
        (folder / "specx_config.json").write_text(json.dumps(cfg))
        try:
            parsed = load_specx_config(folder)
        except SpecxConfigError as e:
            assert str(e)  # names the problem
            rejected += 1
            continue
        accepted += 1
        # whatever was accepted is well-typed
        assert parsed.drafter in ("edd", "eagle3") and type(parsed.num_speculative_tokens) is int
        assert all(type(getattr(parsed.target, n)) is int and getattr(parsed.target, n) > 0
                   for n in ("vocab_size", "hidden_size", "num_hidden_layers"))
        if parsed.early_stop:
            assert isinstance(parsed.early_stop["path"], str) and not parsed.early_stop["path"].startswith(("/", ".."))
    assert rejected > 50 and accepted > 5  # the fuzzer reaches both outcomes


def test_non_json_and_non_object_files(tmp_path):
    for i, text in enumerate(["{not json", "[]", "3", '"edd"', ""]):
        folder = tmp_path / f"f{i}"
        folder.mkdir()
        (folder / "specx_config.json").write_text(text)
        with pytest.raises(SpecxConfigError):
            load_specx_config(folder)
