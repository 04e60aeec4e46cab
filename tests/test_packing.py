"""Packed rows: mesp on rows holding several examples = autodiff of the same examples
unpacked (one padded row each), loss and every LoRA gradient, for every family, in
the chunked and the fused attention path, with token chunks and query blocks that
cut through example boundaries. Tolerances: test_engine.compare (fp32)."""

import mlx.core as mx
import pytest

import mesp_mlx
from mesp_mlx.engine import block, packing
from mesp_mlx.models.configs import TINY
from mesp_mlx.engine.packing import Packing, check_segments
from mesp_mlx.engine.plan import EngineOptions
from helpers import compare, make

LENGTHS = [[5, 3, 4], [2, 6, 4]]   # two rows of T 13: 12 example positions + 1 pad
T = 13
F = 128                             # tiny intermediate size: token chunk = bytes / 4BF
CHUNKED = EngineOptions(token_chunk_bytes=4 * 2 * F * 5,       # 5-token chunks
                        attn_chunk_bytes=4 * 4 * T * 3,        # 3-query blocks
                        fused_attention=False)
FUSED = EngineOptions(token_chunk_bytes=4 * 2 * F * 5, fused_attention=True)


def examples(V=256, seed=3):
    """(inputs, targets, mask) per example, in row order, lengths LENGTHS."""
    key, out = mx.random.key(seed), []
    for n in sum(LENGTHS, []):
        key, k1, k2, k3 = mx.random.split(key, 4)
        m = (mx.random.uniform(shape=(n,), key=k3) > 0.2).astype(mx.float32)
        out.append((mx.random.randint(0, V, (n,), key=k1),
                    mx.random.randint(0, V, (n,), key=k2), m.at[0].add(1.0 - m[0])))
    return out


def unpacked(ex):
    """One right-padded row per example (mask 0 on the padding)."""
    W = max(len(x) for x, _, _ in ex)
    pad = lambda a, v=0: mx.concatenate([a, mx.full((W - len(a),), v, a.dtype)])
    return tuple(mx.stack([pad(e[i]) for e in ex]) for i in range(3))


def packed(ex):
    """The examples laid out in LENGTHS' rows, the tail one pad segment (mask 0)."""
    rows, i = [[], [], [], []], 0
    for lengths in LENGTHS:
        parts = [[], [], [], []]
        for s, n in enumerate(lengths):
            x, y, m = ex[i]
            for p, a in zip(parts, (x, y, m, mx.full((n,), s, mx.int32))):
                p.append(a)
            i += 1
        fill = T - sum(lengths)
        for p, a in zip(parts, (mx.zeros((fill,), mx.int32), mx.zeros((fill,), mx.int32),
                                mx.zeros((fill,)), mx.full((fill,), len(lengths),
                                                           mx.int32))):
            p.append(a)
        for r, p in zip(rows, parts):
            r.append(mx.concatenate(p))
    return tuple(mx.stack(r) for r in rows)


def _run_packed(model, opt, segments=None):
    x, y, m, seg = packed(examples())
    return mesp_mlx.value_and_grad(model, x, y, m, method="mesp", options=opt,
                                   segments=seg if segments is None else segments)


def _check(model, opt):
    loss_ref, g_ref = mesp_mlx.value_and_grad(model, *unpacked(examples()),
                                              method="autodiff")
    loss, g = _run_packed(model, opt)
    assert abs(loss.item() - loss_ref.item()) <= 1e-6 * abs(loss_ref.item()), \
        (loss.item(), loss_ref.item())
    compare(g, g_ref, mx.float32)


@pytest.mark.parametrize("family", list(TINY))
def test_packed_equals_unpacked_chunked(family):
    _check(make({}, family=family), CHUNKED)


@pytest.mark.parametrize("family", ["qwen2", "llama", "mistral", "gemma3_text", "phi3",
                                    "olmo2"])
def test_packed_equals_unpacked_fused(family):
    """mx.fast.scaled_dot_product_attention with the [B, 1, T, T] bool mask."""
    _check(make({}, family=family), FUSED)


def test_packed_with_activation_plan_and_partial_layers():
    """Blocks that keep their forward tensors (no recompute) and a first LoRA block
    above 0 see the same packing."""
    model = make(dict(num_hidden_layers=3), num_layers=2)
    _check(model, EngineOptions(token_chunk_bytes=4 * 2 * F * 5, fused_attention=False,
                                activation_budget=1 << 30))


def test_the_comparison_sees_a_leak(monkeypatch):
    """A token attending across a boundary makes _check fail: the tests above can."""
    monkeypatch.setattr(block, "_segments", lambda packing: None)
    with pytest.raises(AssertionError):
        _check(make({}, family="llama"), CHUNKED)


def _qk_packed_vs_alone(model):
    """max |q, k after RoPE of the packed rows − those of each example run alone|.
    (RoPE is relative, so the loss alone cannot see positions that fail to restart:
    q_i·k_j depends on i − j only. The restart keeps angles small and dynamic-NTK
    limits per example, and is checked here on the rotated q and k themselves.)"""
    spec = mesp_mlx.engine.walk.model_spec(model, "mesp", T, EngineOptions(verify=False))
    b = spec.blocks[0]
    x, _, _, seg = packed(examples())
    h = spec.embed_ids(x)
    pk = Packing.of(seg)
    q, k, _, _ = block.attention_inputs(b, h, block.token_spans(b, CHUNKED, 2, T), pk)
    err, t0 = 0.0, 0
    for r, lengths in enumerate(LENGTHS):
        t0 = 0
        for n in lengths:
            xa = h[r:r + 1, t0:t0 + n]
            qa, ka, _, _ = block.attention_inputs(b, xa, [(0, n)])
            err = max(err, mx.abs(q[r:r + 1, :, t0:t0 + n] - qa).max().item(),
                      mx.abs(k[r:r + 1, :, t0:t0 + n] - ka).max().item())
            t0 += n
    return err


def test_rope_restarts_in_each_packed_example(monkeypatch):
    model = make({}, family="llama")
    assert _qk_packed_vs_alone(model) <= 1e-5
    monkeypatch.setattr(packing.Packing, "rows", lambda self, t0, t1: mx.broadcast_to(
        mx.arange(t0, t1, dtype=mx.int32), (2, t1 - t0)))          # no restart
    assert _qk_packed_vs_alone(model) > 1e-2


def test_positions_restart_per_segment():
    p = Packing.of(mx.array([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]]))
    assert p.positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]
    keep = p.fused_mask()
    assert keep.shape == (2, 1, 6, 6)
    assert keep[0, 0].astype(mx.int32).tolist()[3] == [0, 0, 0, 1, 0, 0]


def test_segments_are_checked_and_need_mesp():
    model = make({})
    x, y, m, seg = packed(examples())
    for method in ("autodiff", "mebp", "mezo"):
        with pytest.raises(ValueError, match="mesp"):
            mesp_mlx.value_and_grad(model, x, y, m, method=method, segments=seg)
    with pytest.raises(ValueError, match="non-decreasing"):
        check_segments(seg[:, ::-1], seg.shape)
    with pytest.raises(ValueError, match="shape"):
        check_segments(seg[:, 1:], seg.shape)
    with pytest.raises(TypeError, match="integer"):
        check_segments(seg.astype(mx.float32), seg.shape)
