"""topk_lm_head: Triton kernel vs torch reference, normaliser, tie rule, dispatch.

Without a GPU the kernel runs in Triton's interpreter (see conftest.py), which is slow per
program, so the default grid is a handful of shapes chosen to cover every axis once:
batch 1..64, vocab 32k..262k, hidden 576..8192, fp32/bf16/fp16, int32/int64 ids, several
candidate tiles and hidden chunks. The kernel reads only the C candidate rows, so a large
vocabulary is cheap as long as C is small; for the largest heads the weight is an
overlapping-rows view (distinct rows in O(V) memory, see `make_weight`).
The full grid is `-m slow`; realistic GPU sizes are `-m gpu`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_specx.kernels import topk_lm_head as tlh

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

requires_triton_path = pytest.mark.skipif(
    not tlh.triton_path_available(DEVICE),
    reason="triton not installed, or TRITON_INTERPRET=1 was not set before the kernel module was imported",
)


# ------------------------------------------------------------------------------- helpers


def make_weight(vocab: int, hidden: int, dtype: torch.dtype, *, seed: int, overlapping: bool = False):
    """[V, H] LM head with N(0, 1/H) entries, so logits are O(1) like a trained head.

    overlapping=True returns an as_strided view whose row v is the window
    buffer[v * 16 : v * 16 + H] of one random buffer: every row is distinct, the row stride
    (16) differs from H, and memory is O(16 V + H) instead of O(V H), which lets the tests
    use 262k x 8192 heads.
    """
    g = torch.Generator().manual_seed(seed)
    if not overlapping:
        return (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dtype).to(DEVICE)
    row_stride = 16
    buffer = (torch.randn(vocab * row_stride + hidden, generator=g) / hidden**0.5).to(dtype).to(DEVICE)
    return buffer.as_strided((vocab, hidden), (row_stride, 1))


def make_inputs(batch, vocab, hidden, num_cand, dtype, *, seed, id_dtype=torch.int64, overlapping=False):
    g = torch.Generator().manual_seed(seed + 1)
    weight = make_weight(vocab, hidden, dtype, seed=seed, overlapping=overlapping)  # [V, H]
    hidden_states = (3.0 * torch.randn(batch, hidden, generator=g)).to(dtype).to(DEVICE)  # [B, H]
    # Duplicate-free candidates per row, always including the last row of the head.
    largest = torch.tensor([vocab - 1])
    rows = [torch.cat([largest, torch.randperm(vocab - 1, generator=g)[: num_cand - 1]]) for _ in range(batch)]
    cand = torch.stack(rows)  # [B, C]
    return hidden_states, weight, cand.to(id_dtype).to(DEVICE)


def exact_subset_logits(hidden, weight, cand_ids):
    """[B, C] float64 logits of the candidates (-inf for padding), the ground truth.
    Gathers before upcasting, one row at a time: weight may be a 262k x 8192 view."""
    safe_ids = cand_ids.long().clamp_min(0)
    logits = torch.stack([weight[safe_ids[b]].double() @ hidden[b].double() for b in range(hidden.shape[0])])
    return logits.masked_fill(cand_ids < 0, float("-inf"))


def assert_topk_matches(got, ref, hidden, weight, cand_ids, k, atol=2e-4):
    """Robust to accumulation-order rounding: values must match the reference, and every
    returned id must (a) be a candidate, (b) be unique, (c) carry its own exact logprob."""
    got_ids, got_lp, got_lse = (t.cpu() for t in got)
    ref_ids, ref_lp, ref_lse = (t.cpu() for t in ref)
    batch = hidden.shape[0]
    assert got_ids.shape == (batch, k) and got_ids.dtype == torch.int64
    assert got_lp.shape == (batch, k) and got_lp.dtype == torch.float32
    assert got_lse.shape == (batch,) and got_lse.dtype == torch.float32

    torch.testing.assert_close(got_lse, ref_lse, atol=atol, rtol=1e-5)
    torch.testing.assert_close(got_lp, ref_lp, atol=atol, rtol=1e-5)
    assert torch.equal(got_ids < 0, ref_ids < 0)

    exact = exact_subset_logits(hidden.cpu(), weight.cpu(), cand_ids.cpu())  # [B, C] fp64
    exact_lse = torch.logsumexp(exact, dim=-1)  # [B]
    torch.testing.assert_close(got_lse.double(), exact_lse, atol=atol, rtol=1e-5)
    cand_cpu = cand_ids.cpu().long()
    for b in range(batch):
        ids = got_ids[b][got_ids[b] >= 0]
        assert ids.unique().numel() == ids.numel(), "duplicate ids in top-k"
        pos_of = {int(v): j for j, v in enumerate(cand_cpu[b]) if v >= 0}
        assert all(int(v) in pos_of for v in ids), "returned id is not a candidate"
        own = torch.tensor([exact[b, pos_of[int(v)]] for v in ids], dtype=torch.float64)
        torch.testing.assert_close(got_lp[b, : ids.numel()].double(), own - exact_lse[b], atol=atol, rtol=1e-5)
        # Where the reference values are well separated the ids must agree exactly.
        lp = ref_lp[b, : ids.numel()]
        gaps = (lp[:-1] - lp[1:]).abs()
        separated = torch.ones(ids.numel(), dtype=torch.bool)
        separated[:-1] &= gaps > 10 * atol
        separated[1:] &= gaps > 10 * atol
        assert torch.equal(ids[separated], ref_ids[b, : ids.numel()][separated])


# ---------------------------------------------------------------- kernel vs reference

# (batch, vocab, hidden, num_cand, k, dtype, id dtype, overlapping weight, block_c, block_h)
# block_c / block_h None = the dispatcher's defaults; small values force several candidate
# tiles and hidden chunks, with ragged last ones.
DEFAULT_GRID = [
    (1, 32003, 576, 300, 8, torch.float32, torch.int64, False, None, None),
    (7, 49152, 1000, 513, 10, torch.bfloat16, torch.int32, False, 128, 256),
    (64, 128256, 4096, 40, 4, torch.float16, torch.int64, True, None, None),
    (3, 151936, 2048, 257, 32, torch.bfloat16, torch.int64, True, 16, 512),
    (2, 262144, 8192, 150, 16, torch.bfloat16, torch.int32, True, 32, 1024),
]


def _ids(grid):
    return [f"B{b}-V{v}-H{h}-C{c}-k{k}-{str(dt).split('.')[-1]}" for b, v, h, c, k, dt, *_ in grid]


@requires_triton_path
@pytest.mark.parametrize("batch,vocab,hidden,num_cand,k,dtype,id_dtype,overlapping,block_c,block_h",
                         DEFAULT_GRID, ids=_ids(DEFAULT_GRID))  # fmt: skip
def test_triton_matches_reference(batch, vocab, hidden, num_cand, k, dtype, id_dtype, overlapping, block_c, block_h):
    h, w, cand = make_inputs(batch, vocab, hidden, num_cand, dtype, seed=batch + hidden, id_dtype=id_dtype,
                             overlapping=overlapping)  # fmt: skip
    got = tlh.topk_lm_head_triton(h, w, cand, k, block_c=block_c, block_h=block_h)
    ref = tlh.topk_lm_head_reference(h, w, cand, k)
    assert_topk_matches(got, ref, h, w, cand, k)


SLOW_GRID = [
    (batch, vocab, hidden, 2048 if DEVICE == "cuda" else 96, k, dtype, torch.int64, vocab * hidden > 2**27, None, None)
    for batch in (1, 5, 64)
    for vocab, hidden in ((32000, 576), (49152, 960), (128256, 4096), (151936, 3584), (262144, 8192))
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    for k in (1, 8)
]


@pytest.mark.slow
@requires_triton_path
@pytest.mark.parametrize("batch,vocab,hidden,num_cand,k,dtype,id_dtype,overlapping,block_c,block_h",
                         SLOW_GRID, ids=_ids(SLOW_GRID))  # fmt: skip
def test_triton_matches_reference_full_grid(batch, vocab, hidden, num_cand, k, dtype, id_dtype, overlapping, block_c,
                                            block_h):  # fmt: skip
    h, w, cand = make_inputs(batch, vocab, hidden, num_cand, dtype, seed=7, id_dtype=id_dtype, overlapping=overlapping)
    got = tlh.topk_lm_head_triton(h, w, cand, k, block_c=block_c, block_h=block_h)
    ref = tlh.topk_lm_head_reference(h, w, cand, k)
    assert_topk_matches(got, ref, h, w, cand, k)


# ------------------------------------------------------------------ edge cases and rules


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=requires_triton_path)])
def test_padding_and_fewer_candidates_than_k(use_triton):
    """-1 ids are ignored; missing top-k slots are (-1, -inf); an all-padding row has lse -inf."""
    h, w, cand = make_inputs(3, 1000, 64, 24, torch.float32, seed=3)
    cand[0, 5:] = -1  # row 0: 5 valid candidates < k
    cand[1, ::2] = -1  # row 1: padding interleaved with real ids, 12 valid
    cand[2, :] = -1  # row 2: nothing valid
    k = 8
    fn = tlh.topk_lm_head_triton if use_triton else tlh.topk_lm_head_reference
    ids, lp, lse = (t.cpu() for t in fn(h, w, cand, k, **({"block_c": 16} if use_triton else {})))
    assert (ids[0, :5] >= 0).all() and (ids[0, 5:] == -1).all()
    assert torch.isinf(lp[0, 5:]).all() and (lp[0, 5:] < 0).all()
    assert (ids[1] >= 0).all() and set(ids[1].tolist()) <= set(cand[1].cpu().tolist())
    assert (ids[2] == -1).all() and torch.isneginf(lp[2]).all() and torch.isneginf(lse[2])
    assert_topk_matches((ids[:2], lp[:2], lse[:2]), tlh.topk_lm_head_reference(h[:2], w, cand[:2], k),
                        h[:2], w, cand[:2], k)  # fmt: skip


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=requires_triton_path)])
def test_normaliser_is_the_softmax_over_the_subset(use_triton):
    """exp(topk_logprobs) sums to <= 1, and to 1 when k = C; lse = logsumexp of subset logits."""
    h, w, cand = make_inputs(4, 5000, 96, 37, torch.bfloat16, seed=11)
    fn = tlh.topk_lm_head_triton if use_triton else tlh.topk_lm_head_reference
    kwargs = {"block_c": 16, "block_h": 32, "merge_block": 2} if use_triton else {}  # multi-chunk merge
    exact = exact_subset_logits(h.cpu(), w.cpu(), cand.cpu())  # [B, C]

    _, lp_k, lse = (t.cpu() for t in fn(h, w, cand, 5, **kwargs))
    assert (lp_k.double().exp().sum(-1) <= 1 + 1e-5).all()
    torch.testing.assert_close(lse.double(), torch.logsumexp(exact, -1), atol=1e-4, rtol=1e-5)

    _, lp_all, _ = (t.cpu() for t in fn(h, w, cand, 37, **kwargs))  # k = C: the whole subset
    torch.testing.assert_close(lp_all.double().exp().sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0)
    expected = torch.log_softmax(exact, -1).sort(-1, descending=True).values
    torch.testing.assert_close(lp_all.double(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=requires_triton_path)])
@pytest.mark.parametrize("k", [2, 7])
def test_tie_rule_earlier_candidate_position_wins(use_triton, k):
    """Bit-identical logits (duplicated weight rows) come out in cand_ids order. With
    block_c=16, positions 3/9/12 share candidate tile 0 (k=2 cuts that tie group inside
    the tile) and 20/40 sit in tiles 1 and 2 (the merge pass must order across tiles)."""
    vocab, hidden = 500, 64
    w = make_weight(vocab, hidden, torch.float32, seed=5).cpu()
    h = torch.randn(1, hidden, generator=torch.Generator().manual_seed(6))
    # Make row 7 the clear argmax, then give it four twins.
    w[7] = 4.0 * h[0] / h[0].norm()
    twins = [123, 77, 300, 401]
    w[twins] = w[7].clone()
    tied_ids = [300, 7, 401, 123, 77]  # in the positions they will occupy
    cand = torch.randperm(vocab, generator=torch.Generator().manual_seed(8))[:48]
    cand = cand[~torch.isin(cand, torch.tensor(tied_ids))]
    for position, vocab_id in zip((3, 9, 12, 20, 40), tied_ids):
        cand = torch.cat([cand[:position], torch.tensor([vocab_id]), cand[position:]])
    cand, w, h = cand[None].to(DEVICE), w.to(DEVICE), h.to(DEVICE)
    fn = tlh.topk_lm_head_triton if use_triton else tlh.topk_lm_head_reference
    # merge_block=4 also splits the merge pass into chunks, so ties meet across chunks.
    ids, lp, _ = fn(h, w, cand, k, **({"block_c": 16, "merge_block": 4} if use_triton else {}))
    num_tied = min(k, len(tied_ids))
    assert ids[0, :num_tied].tolist() == tied_ids[:num_tied]
    assert (lp[0, :num_tied] == lp[0, 0]).all()
    if k > len(tied_ids):
        assert (lp[0, num_tied:] < lp[0, 0]).all()


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=requires_triton_path)])
@pytest.mark.parametrize("offset", [-300.0, 300.0])
def test_large_logits_with_an_empty_tile_stay_finite(use_triton, offset):
    """Logits around +-300 (exp over/underflows in fp32 without the max shift) and a
    candidate tile that is all padding (its partials must contribute exactly 0)."""
    vocab, hidden = 1000, 32
    w = make_weight(vocab, hidden, torch.float32, seed=12).cpu()
    w[:, 0] = offset  # hidden[:, 0] = 1 adds `offset` to every logit
    h = torch.randn(2, hidden, generator=torch.Generator().manual_seed(13))
    h[:, 0] = 1.0
    cand = torch.stack([torch.randperm(vocab, generator=torch.Generator().manual_seed(s))[:48] for s in (1, 2)])
    cand[:, 16:32] = -1  # with block_c=16: tile 1 of 3 is empty
    h, w, cand = h.to(DEVICE), w.to(DEVICE), cand.to(DEVICE)
    fn = tlh.topk_lm_head_triton if use_triton else tlh.topk_lm_head_reference
    ids, lp, lse = fn(h, w, cand, 4, **({"block_c": 16, "merge_block": 1} if use_triton else {}))
    assert torch.isfinite(lp).all() and torch.isfinite(lse).all()
    assert ((lse.cpu() - offset).abs() < 20).all()
    assert_topk_matches((ids, lp, lse), tlh.topk_lm_head_reference(h, w, cand, 4), h, w, cand, 4, atol=1e-3)


def test_reference_equals_full_vocab_baseline_when_subset_is_everything():
    h, w, _ = make_inputs(3, 2000, 80, 1, torch.float32, seed=2)
    all_ids = torch.arange(2000, device=DEVICE).expand(3, -1)
    ids, lp, lse = tlh.topk_lm_head_reference(h, w, all_ids, 10)
    full_ids, full_lp, full_lse = tlh.full_vocab_topk_reference(h, w, 10)
    torch.testing.assert_close(lse, full_lse, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lp, full_lp, atol=1e-4, rtol=1e-5)
    assert torch.equal(ids, full_ids)


def test_rejects_bad_shapes():
    h, w, cand = make_inputs(2, 100, 16, 8, torch.float32, seed=0)
    with pytest.raises(ValueError):
        tlh.topk_lm_head_reference(h[:, :8], w, cand, 2)
    with pytest.raises(ValueError):
        tlh.topk_lm_head_reference(h, w, cand[:1], 2)
    with pytest.raises(TypeError):
        tlh.topk_lm_head_reference(h, w, cand.float(), 2)
    with pytest.raises(ValueError):
        tlh.topk_lm_head_reference(h, w, cand, 0)


# ------------------------------------------------------------------------------ dispatch


def test_dispatch_falls_back_to_reference_without_triton_path(monkeypatch):
    """CPU tensors without the interpreter (or no triton at all) must use the reference."""
    monkeypatch.setattr(tlh, "TRITON_INTERPRETED", False)

    def must_not_run(*args, **kwargs):
        raise AssertionError("Triton path taken")

    monkeypatch.setattr(tlh, "topk_lm_head_triton", must_not_run)
    h, w, cand = make_inputs(2, 300, 32, 20, torch.float32, seed=1)
    h, w, cand = h.cpu(), w.cpu(), cand.cpu()
    assert not tlh.triton_path_available("cpu")
    got = tlh.topk_lm_head(h, w, cand, 3)
    ref = tlh.topk_lm_head_reference(h, w, cand, 3)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))

    monkeypatch.setattr(tlh, "HAS_TRITON", False)
    assert not tlh.triton_path_available("cuda")


def test_triton_entry_point_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(tlh, "TRITON_INTERPRETED", False)
    h, w, cand = make_inputs(1, 100, 16, 8, torch.float32, seed=0)
    with pytest.raises(RuntimeError):
        tlh.topk_lm_head_triton(h.cpu(), w.cpu(), cand.cpu(), 2)


@requires_triton_path
def test_dispatch_uses_triton_when_available(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("reference path taken")

    monkeypatch.setattr(tlh, "topk_lm_head_reference", must_not_run)
    h, w, cand = make_inputs(2, 300, 32, 20, torch.float32, seed=1)
    ids, lp, lse = tlh.topk_lm_head(h, w, cand, 3)
    assert ids.shape == (2, 3) and lse.shape == (2,)


# --------------------------------------------------------- compiled path, without a GPU

_AOT_SCRIPT = textwrap.dedent(
    """
    import re, subprocess, sys, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from vllm_specx.kernels import topk_lm_head as m

    target = GPUTarget("cuda", 90, 32)
    cuobjdump = triton.__path__[0] + "/backends/nvidia/bin/cuobjdump"

    def compile_kernel(fn, signature, constexprs, aligned):
        names = list(fn.arg_names)
        # Triton specialises args divisible by 16 at launch; mirror that for H % 16 == 0.
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                              options={"num_warps": 4})

    def registers(kernel):
        with open("k.cubin", "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", "k.cubin"],
                               capture_output=True, text=True, check=True).stdout
        return re.search(r"REG:(\\d+) STACK:(\\d+)", usage).groups()

    aligned = ["hidden_ptr", "weight_ptr", "cand_ptr", "part_val_ptr", "part_pos_ptr",
               "part_max_ptr", "part_sumexp_ptr", "H", "stride_hb", "stride_wv", "stride_cb"]
    for dtype in ("bf16", "fp16", "fp32"):
        for id_type in ("i32", "i64"):
            sig = dict(hidden_ptr="*" + dtype, weight_ptr="*" + dtype, cand_ptr="*" + id_type,
                       part_val_ptr="*fp32", part_pos_ptr="*i32", part_max_ptr="*fp32",
                       part_sumexp_ptr="*fp32", H="i32", V="i32", C="i32", stride_hb="i32",
                       stride_wv="i32", stride_cb="i32", num_tiles="i32", k_tile="i32",
                       BLOCK_C="constexpr", BLOCK_H="constexpr")
            block_c, block_h = m._default_blocks(2048, 4096)
            kernel = compile_kernel(m._candidate_tile_topk_kernel, sig,
                                    {"BLOCK_C": block_c, "BLOCK_H": block_h}, aligned)
            regs, stack = registers(kernel)
            wide_loads = len(re.findall(r"ld\\.global(?:\\.\\w+)*\\.v[24]", kernel.asm["ptx"]))
            print(dtype, id_type, "regs", regs, "stack", stack, "vector loads", wide_loads)
            assert int(stack) == 0, "register spills"
            assert wide_loads > 0, "weight loads were not vectorised"
    sig = dict(part_val_ptr="*fp32", part_pos_ptr="*i32", part_max_ptr="*fp32",
               part_sumexp_ptr="*fp32", cand_ptr="*i64", out_ids_ptr="*i64",
               out_logprobs_ptr="*fp32", out_lse_ptr="*fp32", C="i32", stride_cb="i32",
               num_tiles="i32", n_partials="i32", k="i32", BLOCK_T="constexpr", BLOCK_P="constexpr")
    compile_kernel(m._merge_tiles_kernel, sig, {"BLOCK_T": 128, "BLOCK_P": 1024}, [])
    print("ok")
    """
)


def test_triton_kernels_compile_for_hopper(tmp_path):
    """The interpreter does not type-check like the compiler does, and this machine may
    have no GPU: compile both kernels ahead of time for sm_90 (Triton's bundled ptxas),
    and check the gathered weight loads are vectorised and nothing spills."""
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(triton.__path__[0], "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton build has no NVIDIA backend / ptxas")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([repo_root, env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


# ------------------------------------------------------------------------------ real GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("vocab,hidden", [(49152, 576), (128256, 4096), (262144, 8192)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernel_realistic_sizes(batch, vocab, hidden, dtype):
    # Dense heads: 262144 x 8192 puts row offsets past 2**31 elements (int64 addressing).
    h, w, cand = make_inputs(batch, vocab, hidden, 2048, dtype, seed=batch)
    for k in (1, 8, 64):
        got = tlh.topk_lm_head(h, w, cand, k)
        ref = tlh.topk_lm_head_reference(h, w, cand, k)
        assert_topk_matches(got, ref, h, w, cand, k)


def test_interpreter_is_active_whenever_there_is_no_gpu():
    """Guards the suite itself: if a module imported the kernels before TRITON_INTERPRET was set, every
    interpreted test above would silently skip (this happened once)."""
    if torch.cuda.is_available() or not tlh.HAS_TRITON:
        pytest.skip("GPU present (compiled kernels) or triton not installed")
    assert tlh.TRITON_INTERPRETED and tlh.triton_path_available("cpu")


def test_serving_path_never_uses_the_interpreter(monkeypatch):
    from vllm_specx.core.spec_vocab import speculative_vocab_logprobs, svd_projection

    def must_not_run(*args, **kwargs):
        raise AssertionError("Triton interpreter used on the serving path")

    monkeypatch.setattr(tlh, "topk_lm_head_triton", must_not_run)
    h, w, _ = make_inputs(2, 300, 32, 20, torch.float32, seed=1)
    a, b = svd_projection(w.cpu(), 8)
    out = speculative_vocab_logprobs(h.cpu(), w.cpu(), a, b, 50, 4, compiled_kernel_only=True)
    assert int(torch.isfinite(out).sum()) == 2 * 4
