"""Gated delta rule: chunked forward vs mlx-lm's token loop and the reference; hand
backward vs mx.vjp of the reference; packed segments vs separate runs."""

import mlx.core as mx
import pytest
from mlx_lm.models.gated_delta import gated_delta_ops

from gradcheck import Rng, assert_all_close, assert_close
from mesp_mlx.ops.gated_delta import (gated_delta, gated_delta_backward, gated_delta_forward,
                                      gated_delta_ref)
from mesp_mlx.ops.l2norm import normalize_qk

DK, DV = 8, 12
NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dstate")


def _case(T, Hk=2, Hv=4, B=2, dtype=mx.float32, seed=0, g_lo=0.3):
    """Inputs as the DeltaNet layer makes them: unit k, q scaled by Dk^-½, g in (0, 1]."""
    rng = Rng(seed)
    q, k = normalize_qk(rng.normal((B, T, Hk, DK)), rng.normal((B, T, Hk, DK)),
                        inv_scale=DK ** -0.5, eps=1e-6)
    v = rng.normal((B, T, Hv, DV))
    g = rng.uniform((B, T, Hv), g_lo, 1.0)
    beta = rng.uniform((B, T, Hv))
    state = rng.normal((B, Hv, DV, DK), std=0.5)
    dy, dstate = rng.normal((B, T, Hv, DV)), rng.normal((B, Hv, DV, DK))
    cast = lambda a: a.astype(dtype)
    return (cast(q), cast(k), cast(v), g, cast(beta)), state, cast(dy), dstate


def _ref_grads(inputs, state, dy, dstate, segments=None):
    fn = lambda q, k, v, g, b, s: gated_delta_ref(q, k, v, g, b, s, segments)
    (y, S), grads = mx.vjp(fn, [*inputs, state], [dy, dstate])
    return y, S, grads


def _ours(inputs, state, dy, dstate, chunk, segments=None):
    y, S, states = gated_delta_forward(*inputs, state, chunk=chunk, segments=segments,
                                       keep_states=True)
    grads = gated_delta_backward(dy, *inputs, states, chunk=chunk, segments=segments,
                                 d_final_state=dstate)
    return y, S, grads


@pytest.mark.parametrize("T,chunk", [(1, 4), (5, 16), (16, 16), (37, 16), (37, 64), (37, 1)])
@pytest.mark.parametrize("Hk,Hv", [(2, 4), (3, 3)])
def test_forward_and_backward(T, chunk, Hk, Hv):
    inputs, state, dy, dstate = _case(T, Hk, Hv)
    y_ref, S_ref, grads_ref = _ref_grads(inputs, state, dy, dstate)
    y, S, grads = _ours(inputs, state, dy, dstate, chunk)
    assert_all_close(("y", "final state"), (y, S), (y_ref, S_ref))
    assert_all_close(NAMES, grads, grads_ref)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_matches_mlx_lm(dtype):
    """The reference is mlx-lm's training-mode loop; the chunked forward matches it
    (bf16 inputs with fp32 g and state, as the layer passes them)."""
    inputs, state, _, _ = _case(37, dtype=dtype)
    y_lm, S_lm = gated_delta_ops(*inputs, state)
    y_ref, S_ref = gated_delta_ref(*inputs, state)
    assert_all_close(("y ref", "state ref"), (y_ref, S_ref), (y_lm, S_lm))
    y, S = gated_delta(*inputs, state, chunk=16)
    assert_all_close(("y", "state"), (y, S), (y_lm, S_lm))
    y0, S0 = gated_delta(*inputs, chunk=16)                     # no initial state: zeros
    assert_all_close(("y (zero state)", "state (zero state)"), (y0, S0),
                     gated_delta_ops(*inputs))


def test_bf16_matches_fp32_truth():
    inputs, state, dy, dstate = _case(37, dtype=mx.bfloat16)
    f32 = [a.astype(mx.float32) for a in inputs]
    y_ref, S_ref, grads_ref = _ref_grads(f32, state, dy.astype(mx.float32), dstate)
    y, S, grads = _ours(inputs, state, dy, dstate, 16)
    like = lambda refs, gots: [r.astype(o.dtype) for r, o in zip(refs, gots)]
    assert_all_close(("y", "state"), (y, S), like((y_ref, S_ref), (y, S)))
    assert [a.dtype for a in grads] == [a.dtype for a in (*inputs, state)]
    assert_all_close(NAMES, grads, like(grads_ref, grads))


SEGMENTS = [[0] * 10 + [1] * 6 + [2] * 21,       # a start on the chunk boundary (t = 16)
            [0] * 3 + [1] * 30 + [2] * 4]


def test_segments_are_separate_runs():
    """A packed row gives each example the outputs and gradients of its own run from a
    zero state (the initial state belongs to the first example); dg = 0 at each start."""
    inputs, state, dy, dstate = _case(37, seed=3)
    seg = mx.array(SEGMENTS, mx.int32)
    y, S, grads = _ours(inputs, state, dy, dstate, 16, seg)
    for b, row in enumerate(SEGMENTS):
        bounds = [0] + [t for t in range(1, 37) if row[t] != row[t - 1]] + [37]
        for i, (t0, t1) in enumerate(zip(bounds, bounds[1:])):
            part = [a[b:b + 1, t0:t1] for a in inputs]
            s0 = state[b:b + 1] if i == 0 else mx.zeros_like(state[b:b + 1])
            ds = dstate[b:b + 1] if t1 == 37 else mx.zeros_like(dstate[b:b + 1])
            y_r, S_r, g_r = _ref_grads(part, s0, dy[b:b + 1, t0:t1], ds)
            got = [a[b:b + 1, t0:t1] for a in grads[:5]] + [grads[5][b:b + 1]]
            if i > 0:
                g_r[3][:, 0] = 0.0          # the start's decay is forced to 0: no dg
            assert_close(f"y[{b}, {t0}:{t1}]", y[b:b + 1, t0:t1], y_r)
            if t1 == 37:
                assert_close(f"final state [{b}]", S[b:b + 1], S_r)
            if i == 0:
                assert_close(f"dstate [{b}]", got[5], g_r[5])
            assert_all_close([f"{n}[{b}, {t0}:{t1}]" for n in NAMES[:5]], got[:5], g_r[:5])


def test_segments_match_the_reference():
    """Same packed row through mx.vjp of the reference (g forced to 0 at starts)."""
    inputs, state, dy, dstate = _case(37, seed=4)
    seg = mx.array(SEGMENTS, mx.int32)
    y_ref, S_ref, grads_ref = _ref_grads(inputs, state, dy, dstate, seg)
    y, S, grads = _ours(inputs, state, dy, dstate, 16, seg)
    assert_all_close(("y", "final state"), (y, S), (y_ref, S_ref))
    assert_all_close(NAMES, grads, grads_ref)


def test_zero_decay_cuts_the_state():
    """g = 0 (an underflowed exp) is a cut: values and gradients as the reference's,
    except dg = 0 there (a caller's chain through g = exp(…) multiplies by g = 0)."""
    inputs, state, dy, dstate = _case(37, seed=5)
    q, k, v, g, beta = inputs
    zero = mx.zeros(g.shape, mx.bool_)
    zero[:, 7] = True
    zero[0, 20, 1] = True
    g = mx.where(zero, 0.0, g)
    y_ref, S_ref, grads_ref = _ref_grads((q, k, v, g, beta), state, dy, dstate)
    y, S, grads = _ours((q, k, v, g, beta), state, dy, dstate, 16)
    assert_all_close(("y", "final state"), (y, S), (y_ref, S_ref))
    assert mx.all(mx.where(zero, grads[3], 0.0) == 0).item()
    grads_ref[3] = mx.where(zero, 0.0, grads_ref[3])
    assert_all_close(NAMES, grads, grads_ref)


def test_states_layout():
    """Stored: the start state of each chunk, [B, H, N, Dv, Dk] fp32, the first the initial."""
    inputs, state, _, _ = _case(37)
    y, S, states = gated_delta_forward(*inputs, state, chunk=16, keep_states=True)
    assert states.shape == (2, 4, 3, DV, DK) and states.dtype == mx.float32
    assert mx.array_equal(states[:, :, 0], state).item()
    _, S16, _ = gated_delta_forward(*(a[:, :16] for a in inputs), state, chunk=16)
    assert_close("state at t = 16", states[:, :, 1], S16)
    assert gated_delta_forward(*inputs, state, chunk=16)[2] is None
    with pytest.raises(ValueError, match="power of two"):
        gated_delta_forward(*inputs, state, chunk=12)
