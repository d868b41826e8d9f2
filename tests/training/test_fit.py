"""The fit stage on synthetic records: both drafters learn, training resumes exactly, exports load."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from vllm_specx.checkpoint import TargetSignature
from vllm_specx.core.eagle3 import Eagle3ArchConfig
from vllm_specx.core.edd import EddArchConfig
from vllm_specx.training import fit as F
from vllm_specx.training.export import export_eagle3

V, H = 48, 32


def _records(n=24, seq=40, n_layers=1, seed=0):
    """A 'target' whose next token is (x + 3) mod V, with hidden states that encode the current token."""
    g = torch.Generator().manual_seed(seed)
    code = torch.randn(V, H, generator=g) * 4
    recs = []
    for _ in range(n):
        start = int(torch.randint(0, V, (1,), generator=g))
        tokens = (start + 3 * torch.arange(seq)) % V
        hidden = code[tokens] + 0.1 * torch.randn(seq, H, generator=g)
        nxt = (tokens + 3) % V
        ids = torch.stack([nxt, (nxt + 1) % V, (nxt + 2) % V], -1)
        lp = torch.log(torch.tensor([0.9, 0.05, 0.05])).expand(seq, 3)
        recs.append({"tokens": tokens, "hidden": hidden.repeat(1, n_layers).half(), "topk_ids": ids,
                     "topk_lp": lp.half(), "prompt_len": 4})
    return recs


def _weights(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, H, generator=g), torch.randn(V, H, generator=g) * 0.3


def _cfg(**kw):
    base = dict(epochs=15, lr=1e-2, batch_tokens=400, max_seq_len=64, max_block=4, val_fraction=0.2, save_every=5)
    base.update(kw)
    return F.TrainConfig(**base)


def _edd():
    arch = EddArchConfig(vocab_size=V, hidden_size=H, target_hidden_size=H, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=64)
    embed, head = _weights()
    return lambda recs: F.build_edd(arch, embed, head, recs, seed=0)


def _eagle3():
    arch = Eagle3ArchConfig(vocab_size=V, hidden_size=H, target_hidden_size=H, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, intermediate_size=64, aux_layer_ids=(0, 1, 2))
    embed, head = _weights()
    return lambda recs: F.build_eagle3(arch, embed, head, recs, seed=0)


@pytest.mark.parametrize("kind,n_layers", [("edd", 1), ("eagle3", 3)])
def test_drafter_learns_the_target(tmp_path, kind, n_layers):
    build = _edd() if kind == "edd" else _eagle3()
    train, val = F.split_records(_records(n_layers=n_layers), _cfg())
    drafter = build(train)
    before = F.evaluate_drafter(drafter, val, depth=4)
    report = F.train_drafter(drafter, train, val, _cfg(), tmp_path, kind)
    losses = [e for e in report["train"]["loss_curve"]]
    assert losses[-1] < 0.5 * losses[0]
    assert report["val_top1_by_depth"][0] > max(0.4, before["val_top1_by_depth"][0] + 0.3)  # chance: 1/48
    assert report["val_mean_accept_len_chain"] > before["val_mean_accept_len_chain"] + 0.3
    assert (tmp_path / f"train_report_{kind}.json").exists()


def test_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    build = _edd()
    train, val = F.split_records(_records(), _cfg())
    steps_per_epoch = len(F._batches(train, 400, 64, random.Random(0)))
    cfg = _cfg(epochs=2, save_every=steps_per_epoch)
    full = build(train)
    F.train_drafter(full, train, val, cfg, tmp_path / "a", "edd")

    real_save = torch.save

    def save_then_crash(*args, **kwargs):  # the process dies right after the first checkpoint
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        F.train_drafter(build(train), train, val, cfg, tmp_path / "b", "edd")
    monkeypatch.setattr(torch, "save", real_save)
    state = torch.load(tmp_path / "b" / "train_state_edd.pt", weights_only=False)
    assert state["step"] == steps_per_epoch
    resumed = build(train)
    F.train_drafter(resumed, train, val, cfg, tmp_path / "b", "edd")
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_eagle3_export_uses_vllm_names(tmp_path):
    build = _eagle3()
    drafter = build(_records(n=4, n_layers=3))
    target = TargetSignature(architecture="LlamaForCausalLM", vocab_size=V, hidden_size=H, num_hidden_layers=6)
    out = export_eagle3(drafter, target, tmp_path / "e3", num_speculative_tokens=4)
    names = set(load_file(str(out / "model.safetensors")))
    assert "fc.weight" in names and "midlayer.self_attn.q_proj.weight" in names and "norm.weight" in names
    assert not any("embed" in n or "lm_head" in n for n in names)  # shared with the target, as in training
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["speculators_config"]["algorithm"] == "eagle3"
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    assert cfg["transformer_layer_config"]["num_aux_hidden_states"] == 3


def test_early_stop_examples_condition_on_an_accepted_prefix(tmp_path):
    """Depth-d examples exist exactly for blocks whose first d drafts were all accepted."""
    from vllm_specx.training.early_stop_data import collect_early_stop_examples

    recs = _records(n=6)
    drafter = _edd()(recs)
    train, val = F.split_records(recs, _cfg(val_fraction=0.5))
    F.train_drafter(drafter, train, val, _cfg(epochs=12), tmp_path, "edd")
    k = 3
    feats, labels = collect_early_stop_examples(drafter, recs[:2], k=k, max_offsets=1)
    depth = feats[:, 4]
    # brute force over the same blocks (offset 0: blocks start at slots 0, k, 2k, ...)
    expected = {d: 0 for d in range(k)}
    positives = 0
    with torch.no_grad():
        for r in recs[:2]:
            tokens, hidden, _, _, mask = F._collate([r], [0], 10**9)
            s = tokens.shape[1]
            starts = (torch.arange(s) // k * k)[None]
            pred = drafter.logits(drafter.forward_blocks(tokens, hidden, starts))[0].argmax(-1)
            for b in range(0, s - 2, k):
                for d in range(k):
                    q = b + d
                    if q >= s - 2 or not mask[0, q]:
                        break
                    expected[d] += 1
                    if pred[q] != tokens[0, q + 2]:
                        break
                    positives += 1
    assert {d: int((depth == d).sum()) for d in range(k)} == expected
    assert int(labels.sum()) == positives
    assert 0 < positives < labels.numel()  # both classes present: a real test of the prefix rule


def test_each_record_source_keeps_its_own_split():
    """Fine-tuning on old + new records (--extra-records) validates on the old run's held-out records."""
    old, new = _records(n=30, seed=0), _records(n=20, seed=5)
    cfg = _cfg()
    train, val, val_parts = F.split_record_sources([old], cfg)
    ids = lambda recs: [id(r) for r in recs]  # noqa: E731
    ref_train, ref_val = F.split_records(old, cfg)
    assert ids(train) == ids(ref_train) and ids(val) == ids(ref_val) and ids(val_parts[0]) == ids(val)
    train2, val2, (val_old, val_new) = F.split_record_sources([old, new], cfg)
    assert ids(val_old) == ids(val) and ids(val_new) == ids(F.split_records(new, cfg)[1])
    assert set(ids(train2)) | set(ids(val2)) == set(ids(old + new)) and not set(ids(train2)) & set(ids(val2))


@pytest.mark.parametrize("draft_vocab", [None, 24])
def test_eagle3_checkpoints_load_for_the_training_stages(tmp_path, draft_vocab):
    """An exported EAGLE-3 drafter (full head, or its own reduced head + d2t) loads back with the same
    logits, also under another trainer's tensor names (`layers.0.*`, `t2d`); the early-stop stage then
    trains its decision model and switches it on in specx_config.json."""
    from safetensors.torch import save_file

    from vllm_specx.checkpoint import load_specx_config
    from vllm_specx.training.early_stop_data import train_decision_model
    from vllm_specx.training.export import load_eagle3

    recs = _records(n=6, n_layers=3)
    drafter = _eagle3()(recs)
    embed, head = _weights()
    if draft_vocab:
        from vllm_specx.core.eagle3 import Eagle3Drafter

        drafter.cfg.draft_vocab_size = draft_vocab
        reduced = Eagle3Drafter(drafter.cfg, embed, head)
        reduced.load_state_dict(drafter.state_dict(), strict=False)
        reduced.d2t.copy_(torch.arange(0, 2 * draft_vocab, 2) - torch.arange(draft_vocab))  # even target ids
        drafter = reduced
    target = TargetSignature(architecture="LlamaForCausalLM", vocab_size=V, hidden_size=H, num_hidden_layers=6)
    out = export_eagle3(drafter, target, tmp_path / "e3", num_speculative_tokens=3, dtype=torch.float32)
    tokens, hidden, _, _, _ = F._collate(recs[:1], [0], 10**9)
    starts = torch.zeros_like(tokens)
    with torch.no_grad():
        expected = drafter.logits(drafter.forward_blocks(tokens, hidden, starts))
        for names in ("ours", "layers.0"):
            if names == "layers.0":  # rename the tensors as the speculators library writes them
                state = load_file(str(out / "model.safetensors"))
                state = {k.replace("midlayer.", "layers.0."): v for k, v in state.items()}
                save_file({**state, "t2d": torch.ones(V, dtype=torch.bool)}, str(out / "model.safetensors"))
            loaded = load_eagle3(out, embed, head)
            got = loaded.logits(loaded.forward_blocks(tokens, hidden, starts))
            torch.testing.assert_close(got, expected)
    if draft_vocab:
        assert torch.isinf(got[..., 1::2]).all() and torch.isfinite(got[..., ::2]).all()
    train, val = F.split_records(recs, _cfg(val_fraction=0.5))
    report = train_decision_model(loaded, train, val, k=3, out_dir=out)
    assert report["examples"] > 0
    assert load_specx_config(out).early_stop["kind"] == "mlp"
