"""EDD core: the training block mask reproduces, position for position, what drafting computes
with one KV slot per position (the layout the vLLM model uses)."""

import torch

from vllm_specx.core.edd import (
    EddArchConfig, EddDrafter, block_attention_mask, init_weights_, random_block_starts,
)


def _drafter(seed=0):
    cfg = EddArchConfig(vocab_size=50, hidden_size=32, target_hidden_size=24, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, intermediate_size=48, rope_theta=10000.0)
    g = torch.Generator().manual_seed(seed)
    d = EddDrafter(cfg, torch.randn(50, 32, generator=g), torch.randn(50, 32, generator=g))
    init_weights_(d, seed)
    return d.double()


def _incremental_draft(d, tokens, hidden, b, steps):
    """Simulate the KV-slot drafting loop: slots 0..b hold soft prompts; each draft step writes the
    embedding of its input token into the next slot and queries with the following token."""
    ctx = [d.context_from_target(hidden[:, i]) for i in range(b + 1)]  # slot contents z_0..z_b
    outs = []
    for j in range(steps):
        slot = b + j
        if j > 0:
            ctx.append(d.embed(tokens[:, slot]))  # draft token x_slot now occupies its slot
        q = d.embed(tokens[:, slot + 1])[:, None]
        context = torch.stack(ctx, dim=1)
        pos = torch.arange(slot + 1)[None]
        mask = torch.ones(1, 1, slot + 1, dtype=torch.bool)
        outs.append(d.layer(q, torch.tensor([[slot + 1]]), context, pos, mask)[:, 0])
    return torch.stack(outs, dim=1)


def test_block_training_equals_incremental_drafting():
    d = _drafter()
    s, b, steps = 14, 5, 6
    tokens = torch.randint(0, 50, (1, s))
    hidden = torch.randn(1, s, 24, dtype=torch.double)
    starts = torch.arange(s)[None].clone()
    starts[0, b : b + steps] = b  # one drafting block of `steps` queries starting at slot b
    blocked = d.forward_blocks(tokens, hidden, starts)[:, b : b + steps]
    incremental = _incremental_draft(d, tokens, hidden, b, steps)
    torch.testing.assert_close(blocked, incremental)


def test_wrong_mask_is_detected():
    """Control: letting block queries see soft prompts of later slots changes the result."""
    d = _drafter(1)
    s, b, steps = 12, 3, 5
    tokens = torch.randint(0, 50, (1, s))
    hidden = torch.randn(1, s, 24, dtype=torch.double)
    leaky = torch.arange(s)[None]  # every query treated as a block start (sees its own slot's soft prompt)
    out = d.forward_blocks(tokens, hidden, leaky)[:, b + 1 : b + steps]
    incremental = _incremental_draft(d, tokens, hidden, b, steps)[:, 1:]
    assert not torch.allclose(out, incremental)


def test_block_mask_shape_and_rows():
    starts = torch.tensor([[0, 0, 2, 2, 2]])
    m = block_attention_mask(starts, 5)[0].int()
    # query 3 (block start 2): soft prompts 0..2, draft embeddings 3
    assert m[3].tolist() == [1, 1, 1, 0, 0] + [0, 0, 0, 1, 0]
    assert m[0].tolist() == [1, 0, 0, 0, 0] + [0] * 5


def test_random_block_starts_are_valid():
    g = torch.Generator().manual_seed(0)
    st = random_block_starts(3, 40, 1, 8, g)
    pos = torch.arange(40)
    assert (st <= pos).all() and (pos - st < 8).all()
    assert (st[:, 1:] >= st[:, :-1]).all()
