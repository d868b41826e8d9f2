"""The EAGLE-3 baseline's training-time-test unroll equals drafting it slot by slot with a KV cache."""

import torch

from vllm_specx.core.edd import random_block_starts
from vllm_specx.core.eagle3 import Eagle3ArchConfig, Eagle3Drafter


def _drafter(seed=0):
    cfg = Eagle3ArchConfig(vocab_size=50, hidden_size=16, target_hidden_size=16, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, intermediate_size=24, aux_layer_ids=(0, 1, 2))
    g = torch.Generator().manual_seed(seed)
    d = Eagle3Drafter(cfg, torch.randn(50, 16, generator=g), torch.randn(50, 16, generator=g))
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return d


def _slot_by_slot(d: Eagle3Drafter, tokens, aux, starts):
    """What vLLM does: verified slots cache KV from target features; a drafting block appends KV
    computed from the drafter's own previous output. Returns the pre-norm output per slot."""
    s = tokens.shape[0]
    outs = []
    for slot in range(s - 1):
        b = int(starts[slot])
        keys, vals = [], []
        hidden = None
        for t in range(slot + 1):  # rebuild the cache as seen by this query
            if t <= b:
                h_in = d.combine(aux[t])
            else:
                h_in = hidden
            q, k, v, res = d._qkv(d.embed(tokens[t + 1])[None, None], h_in[None, None], torch.tensor([[t]]))
            keys.append(k)
            vals.append(v)
            if t >= b:  # run the drafter at slot t to get the input of slot t+1
                k_all, v_all = torch.cat(keys, 2), torch.cat(vals, 2)
                hidden = d._finish(q, k_all, v_all, res, torch.ones(1, 1, t + 1, dtype=torch.bool))[0, 0]
        outs.append(hidden)
    return torch.stack(outs)


def test_unrolled_blocks_equal_slot_by_slot_drafting():
    torch.manual_seed(0)
    d = _drafter()
    s = 14
    tokens = torch.randint(0, 50, (2, s))
    aux = torch.randn(2, s, 48)
    starts = random_block_starts(2, s, 1, 5, torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast = d.forward_blocks(tokens, aux, starts, max_depth=5)
        for row in range(2):
            ref = _slot_by_slot(d, tokens[row], aux[row], starts[row])
            torch.testing.assert_close(fast[row], ref, rtol=1e-4, atol=1e-4)


def test_too_few_passes_is_detected():
    """Negative control: with fewer unroll passes than the block depth, deep slots are wrong."""
    d = _drafter()
    s = 12
    tokens = torch.randint(0, 50, (1, s))
    aux = torch.randn(1, s, 48)
    starts = torch.zeros(1, s, dtype=torch.long)  # one block: depths 0..s-2
    with torch.no_grad():
        full = d.forward_blocks(tokens, aux, starts, max_depth=s)
        short = d.forward_blocks(tokens, aux, starts, max_depth=2)
        ref = _slot_by_slot(d, tokens[0], aux[0], starts[0])
    torch.testing.assert_close(full[0], ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(short[0, 3:], ref[3:], atol=1e-3)
