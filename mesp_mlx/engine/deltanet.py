"""The gated DeltaNet block (Qwen3.5, Qwen3-Next linear attention): forward,
recompute and hand-derived backward of a BlockSpec whose mixer is `b.delta`.

Letters: B batch, T tokens, Hk/Hv key/value heads, Dk/Dv their dims, K conv kernel,
C = 2·Hk·Dk + Hv·Dv conv channels, c the recurrence chunk (EngineOptions.delta_chunk),
P a piece of T (EngineOptions.delta_piece, a multiple of c).
The mixer of a = N_ai(x) (mlx-lm's GatedDeltaNet in training mode, no cache):
    u = in_proj_qkv(a) [B,T,C];  z = in_proj_z(a) [B,T,Hv,Dv];  b̃, ã = in_proj_b(a), in_proj_a(a) [B,T,Hv]
    q, k, v = split(silu(causal_conv(u, w)))          depthwise, zero history, no bias
    q', k' = normalize_qk(q, k)                      q' = Dk^-½ q/|q|, k' = k/|k|
    g = exp(−exp(A_log) softplus(ã + dt_bias)),  β = σ(b̃)
    y = gated_delta(q', k', v, g, β)                 the recurrence (ops/gated_delta.py)
    r1 = out_proj(rms_norm(y) w ⊙ silu(z))           then h = x + r1 and the MLP (block_parts)
Backward, each line the chain rule of one above (each op's math is in ops/):
    dn = out_proj'(dr1);  dy, dz = gated_rmsnorm'(dn)
    dq', dk', dv, dg, dβ = gated_delta'(dy)         from the chunk-start states
    dã, db̃ = delta_gates'(dg, dβ);  dq, dk = normalize_qk'(dq', dk')
    du = causal_conv'([dq | dk | dv]);  da = Σ in_proj'(du, dz, db̃, dã);  dx = dh + N_ai'(da)
Phases, as the attention block's (block.py):
  1. per token chunk: u, z, b̃, ã for all T;
  2. per piece, in order: conv (reading the K − 1 rows of u before the piece),
     normalize, gates and the recurrence from the carried state → y for all T; the
     recompute keeps the state before each piece and the last piece's chunk-start
     states ([B, Hv, ·, Dv, Dk] fp32; every chunk's with delta_states "chunks");
  3. per token chunk: r1, h, the MLP forward and backward; dh over G, dy over y, dz over z;
  4. per piece, in reverse: conv/normalize/gates recomputed (and the piece's forward
     again from its start state, for its chunk-start states), the recurrence backward
     with the state gradient of the piece after it, the conv backward (its first K − 1
     rows belong to the piece before: carried) → du over u, dã over ã, db̃ over b̃;
  5. per token chunk: the in-projections' backward; dx over dh.
Stored for all T: x, u → du, z → dz, y → dy, b̃, ã and one state per piece; a piece's
chunk-start states, its recurrence's C×C terms (𝒯, Γ, Δ), q', k', v and the conv's
pre-activation exist for one piece at a time. Why pieces: at T 4096 (Qwen3.5-0.8B) the
chunk-start states of all T are 64 MB and the recurrence's temporaries over all T
several hundred MB; a piece of 128 tokens holds 1/32 of either.
Packed rows: a packed example starting at t zeroes the state before t (g_t set to 0,
the op's cut, whose dg_t = 0 is the gradient of a gate that multiplies a zero state)
and the conv taps that would read the example before (causal_conv's segments).
Qwen3-Next (`grouped`): in_proj_qkvz emits [q, k, v, z] and in_proj_ba [b̃, ã] per key
head; they are regrouped into the layout above and back.
"""

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..ops.causal_conv import causal_conv, causal_conv_backward
from ..ops.delta_gates import delta_gates, delta_gates_backward
from ..ops.gated_delta import gated_delta_backward, gated_delta_forward
from ..ops.gated_rmsnorm import gated_rmsnorm, gated_rmsnorm_backward
from ..ops.l2norm import normalize_qk, normalize_qk_backward
from .block_parts import (_frozen, has_lora, lin, lin_bwd, mlp_kept_bytes, norm, norm_bwd,
                          put, rows, second_half, second_half_backward, take, token_spans)
from .spec import BlockSpec, DeltaSpec

CHUNK = 64          # recurrence chunk c (EngineOptions.delta_chunk's default)
PIECE = 128         # tokens per piece (EngineOptions.delta_piece's default)


# ------------------------------------------------------------ pieces of T
def pieces(d: DeltaSpec, opt, T: int):
    """[(t0, t1)]: pieces of about opt.delta_piece tokens, each a whole number of
    recurrence chunks and at least K − 1 long (the conv history it hands back)."""
    c = opt.delta_chunk
    n = c * max(1, -(-max(opt.delta_piece, d.kernel - 1) // c))
    return [(t, min(T, t + n)) for t in range(0, T, n)]


def _chunks_of(opt, n: int) -> int:
    """Chunks of a piece of n tokens (a piece shorter than c runs as one chunk)."""
    return -(-n // min(opt.delta_chunk, 1 << max(n - 1, 0).bit_length()))


def state_count(d: DeltaSpec, opt, T: int) -> int:
    """[B, Hv, Dv, Dk] states the recompute keeps over T: every chunk's start state
    (opt.delta_states "chunks"), or each piece's start state and the last piece's
    chunk-start states ("pieces": the other pieces' are recomputed in the backward)."""
    plist = pieces(d, opt, T)
    if opt.delta_states == "chunks" or len(plist) == 1:
        return sum(_chunks_of(opt, t1 - t0) for t0, t1 in plist)
    t0, t1 = plist[-1]
    return len(plist) - 1 + _chunks_of(opt, t1 - t0)


def state_bytes(d: DeltaSpec, opt, B: int, T: int) -> int:
    """Bytes of the states the recompute keeps over T (fp32)."""
    return 4 * B * d.Hv * d.Dv * d.Dk * state_count(d, opt, T)


def _starts(packing):
    """Bool [B, T]: a packed example starts at t > 0 (None: no packing)."""
    if packing is None:
        return None
    seg = packing.segments
    new = seg[:, 1:] != seg[:, :-1]
    return mx.concatenate([mx.zeros_like(new[:, :1]), new], axis=1)


# ------------------------------------------------------------ projections
def _in_proj(d: DeltaSpec, a, at=None):
    """u [B,Tc,C], z [B,Tc,Hv·Dv], b̃, ã [B,Tc,Hv] of a token chunk."""
    if not d.grouped:
        return tuple(lin(m, a, at) for m in d.proj)
    qkvz, ba = (lin(m, a, at) for m in d.proj)
    B, T, _ = a.shape
    r = d.Hv // d.Hk
    q, k, v, z = mx.split(qkvz.reshape(B, T, d.Hk, -1),
                          [d.Dk, 2 * d.Dk, 2 * d.Dk + r * d.Dv], axis=-1)
    u = mx.concatenate([t.reshape(B, T, -1) for t in (q, k, v)], axis=-1)
    bt, at_ = mx.split(ba.reshape(B, T, d.Hk, -1), [r], axis=-1)
    return u, z.reshape(B, T, -1), bt.reshape(B, T, -1), at_.reshape(B, T, -1)


def _in_proj_bwd(paths, d: DeltaSpec, du, dz, db, da, a, flat, need_dx, at):
    """Σ dx of the in-projections from the gradients of u, z, b̃, ã (a chunk)."""
    grads = (du, dz, db, da)
    if d.grouped:
        B, T, _ = du.shape
        kd = d.Hk * d.Dk
        per = lambda t: t.reshape(B, T, d.Hk, -1)                  # noqa: E731
        dq, dk, dv = mx.split(du, [kd, 2 * kd], axis=-1)
        grads = (mx.concatenate([per(dq), per(dk), per(dv), per(dz)], -1).reshape(B, T, -1),
                 mx.concatenate([per(db), per(da)], -1).reshape(B, T, -1))
    dxs = [lin_bwd(paths, m, g, a, flat, need_dx, at) for m, g in zip(d.proj, grads)]
    return sum(dxs[1:], dxs[0]) if need_dx else None


def _inputs(b: BlockSpec, x, spans):
    """Phase 1: u, z, b̃, ã for all T, one token chunk at a time."""
    T = x.shape[1]
    bufs = [None] * 4
    for t0, t1 in spans:
        parts = _in_proj(b.delta, norm(b.attn_in, x[:, t0:t1]), (t0, T))
        bufs = [put(buf, p, t0, t1, T, 1) for buf, p in zip(bufs, parts)]
        mx.eval(*bufs)
    return bufs


# ------------------------------------------------------------ the recurrence
def _mix(d: DeltaSpec, u, ta, tb, t0, t1, seg, starts, keep_conv=False):
    """Tokens t0…t1: (q, k, q', k', v, g, β) and, with keep_conv, what the conv
    backward reads: (window of u, its segments, history rows h0, the pre-activation p
    and σ(p) over the window). The conv reads the K − 1 rows of u before t0."""
    m = d.module
    h0 = min(d.kernel - 1, t0)
    uw = u[:, t0 - h0:t1]
    sw = None if seg is None else seg[:, t0 - h0:t1]
    p = causal_conv(uw, m.conv1d.weight, segments=sw)
    sig = mx.sigmoid(p) if keep_conv else None
    c = (p * sig if keep_conv else nn.silu(p))[:, h0:]       # nn.silu's own ops
    B, n, _ = c.shape
    kd = d.Hk * d.Dk
    q, k, v = mx.split(c, [kd, 2 * kd], axis=-1)
    q, k = q.reshape(B, n, d.Hk, d.Dk), k.reshape(B, n, d.Hk, d.Dk)
    qn, kn = normalize_qk(q, k, inv_scale=d.Dk ** -0.5, eps=d.qk_eps)
    g, beta = delta_gates(ta[:, t0:t1], tb[:, t0:t1], m.A_log, m.dt_bias)
    if starts is not None:
        g = mx.where(starts[:, t0:t1, None], 0.0, g)
    conv = (uw, sw, h0, p, sig) if keep_conv else None
    return conv, q, k, qn, kn, v.reshape(B, n, d.Hv, d.Dv), g, beta


def _conv_backward(d: DeltaSpec, dc, conv):
    """d(window of u) from dc = dL/d silu(p) of the piece's tokens (history rows: 0);
    p and σ(p) from the recompute, so the conv and σ run once per piece."""
    uw, sw, h0, p, sig = conv
    if h0:
        dc = mx.pad(dc, [(0, 0), (h0, 0), (0, 0)])
    pf, sf = p.astype(mx.float32), sig.astype(mx.float32)
    dp = dc.astype(mx.float32) * sf * (1 + pf * (1 - sf))
    return causal_conv_backward(dp, uw, d.module.conv1d.weight, segments=sw)[0]


def _recurrence(d: DeltaSpec, u, ta, tb, opt, packing, keep=False):
    """Phase 2: (y [B, T, Hv, Dv], states). With keep, states = (the state before each
    piece (None: zeros), {piece: its chunk-start states [B, Hv, N, Dv, Dk]} for the last
    piece, or every piece with opt.delta_states "chunks"); else None."""
    T = u.shape[1]
    seg, starts = (None, None) if packing is None else (packing.segments, _starts(packing))
    plist = pieces(d, opt, T)
    y = S = None
    before, chunk_states = [], {}
    for i, (t0, t1) in enumerate(plist):
        want = keep and (i == len(plist) - 1 or opt.delta_states == "chunks")
        _, _, _, qn, kn, v, g, beta = _mix(d, u, ta, tb, t0, t1, seg, starts)
        if keep:
            before.append(S)
        yp, S, st = gated_delta_forward(qn, kn, v, g, beta, S, chunk=opt.delta_chunk,
                                        keep_states=want)
        y = put(y, yp, t0, t1, T, 1)
        if want:
            chunk_states[i] = st
        mx.eval(y, S, *([st] if want else []))
    return y, ((before, chunk_states) if keep else None)


def _recurrence_backward(d: DeltaSpec, dy, u, ta, tb, states, opt, packing):
    """Phase 4: (du over u's buffer, dã over ã's, db̃ over b̃'s), pieces in reverse;
    states as _recurrence keeps them (a piece without its chunk-start states runs its
    forward again from its start state)."""
    m = d.module
    before, chunk_states = states
    T = u.shape[1]
    seg, starts = (None, None) if packing is None else (packing.segments, _starts(packing))
    dS = carry = None
    plist = pieces(d, opt, T)
    for i in reversed(range(len(plist))):
        t0, t1 = plist[i]
        conv, q, k, qn, kn, v, g, beta = _mix(d, u, ta, tb, t0, t1, seg, starts,
                                              keep_conv=True)
        st = chunk_states.pop(i, None)
        if st is None:                            # recomputed from the piece's start
            st = gated_delta_forward(qn, kn, v, g, beta, before[i], chunk=opt.delta_chunk,
                                     keep_states=True)[2]
        before[i] = None
        dqn, dkn, dv, dg, dbeta, dS = gated_delta_backward(
            dy[:, t0:t1], qn, kn, v, g, beta, st, chunk=opt.delta_chunk, d_final_state=dS)
        del st
        dta, dtb = delta_gates_backward(dg, dbeta, ta[:, t0:t1], tb[:, t0:t1],
                                        m.A_log, m.dt_bias)
        dq, dk = normalize_qk_backward(dqn, dkn, q, k, inv_scale=d.Dk ** -0.5,
                                       eps=d.qk_eps)
        B, n = dq.shape[:2]
        dc = mx.concatenate([dq.reshape(B, n, -1), dk.reshape(B, n, -1),
                             dv.reshape(B, n, -1)], axis=-1)
        duw = _conv_backward(d, dc, conv)
        h0 = conv[2]
        du = duw[:, h0:]
        if carry is not None:                     # the taps of the piece after this one
            r = carry.shape[1]
            du = mx.concatenate([du[:, :n - r], du[:, n - r:] + carry], axis=1)
        carry = duw[:, :h0] if h0 else None
        del conv, q, k, qn, kn, v, g, beta, dqn, dkn, dv, dg, dbeta, dq, dk, dc, duw
        u = put(u, du, t0, t1, T, 1)
        ta, tb = put(ta, dta, t0, t1, T, 1), put(tb, dtb, t0, t1, T, 1)
        mx.eval(u, ta, tb, dS, *([] if carry is None else [carry]))
    return u, ta, tb


# ------------------------------------------------------------ the output
def _out_in(d: DeltaSpec, y, z):
    """out_proj's input n = rms_norm(y) w ⊙ silu(z), [B, Tc, Hv·Dv] (a chunk)."""
    B, n = y.shape[:2]
    o = gated_rmsnorm(y, z.reshape(B, n, d.Hv, d.Dv), d.module.norm.weight, d.norm_eps)
    return o.reshape(B, n, -1)


def _out_in_bwd(d: DeltaSpec, dn, y, z):
    """(dy [B,Tc,Hv,Dv], dz [B,Tc,Hv·Dv]) from dL/dn of a chunk (n = _out_in(y, z))."""
    B, T = y.shape[:2]
    dy, dz = gated_rmsnorm_backward(dn.reshape(B, T, d.Hv, d.Dv), y,
                                    z.reshape(B, T, d.Hv, d.Dv), d.module.norm.weight,
                                    d.norm_eps)
    return dy, dz.reshape(B, T, -1)


# ------------------------------------------------------------ the block
@dataclass
class DeltaKept:
    """What a DeltaNet block's forward kept so that its backward skips phases 1-2
    (EngineOptions.activation_budget): u, z, b̃, ã, y, the chunk-start states, and
    per token chunk (r1 if N_ao, h, gate, up, r2 if N_mo, σ(gate) with extras)."""
    inputs: list
    y: mx.array
    states: tuple
    rows: list = field(default_factory=list)

    def take(self):
        out = (self.inputs, self.y, self.states, self.rows)
        self.inputs = self.y = self.states = self.rows = None
        return out


class _Defaults:
    delta_chunk, delta_piece, delta_states = CHUNK, PIECE, "pieces"


def kept_bytes(b: BlockSpec, B: int, T: int, itemsize: int, opt=None) -> int:
    """Bytes of a DeltaNet block's DeltaKept at [B, T] (the default chunks and pieces
    without opt): u, z, y, b̃, ã, the states, and the MLP half's rows."""
    d = b.delta
    per_token = d.conv_dim + 2 * d.Hv * d.Dv + 2 * d.Hv
    per_token += _frozen(b.down).shape[0] if b.attn_out is not None else 0
    return (B * T * per_token * itemsize + state_bytes(d, opt or _Defaults, B, T)
            + mlp_kept_bytes(b, B, T, itemsize))


def block_forward(b: BlockSpec, x, opt, keep: bool = False, packing=None,
                  extras: bool = False):
    """The block's output (and with keep, the DeltaKept its backward reads)."""
    B, T, _ = x.shape
    spans = token_spans(b, opt, B, T)
    inputs = _inputs(b, x, spans)
    u, z, tb, ta = inputs
    y, states = _recurrence(b.delta, u, ta, tb, opt, packing, keep=keep)
    kept = DeltaKept(inputs, y, states) if keep else None

    def out_proj(t0, t1, at):
        return lin(b.delta.out, _out_in(b.delta, y[:, t0:t1], z[:, t0:t1]), at)
    out = second_half(b, x, spans, out_proj, kept.rows if keep else None, extras)
    return (out, kept) if keep else out


def block_backward(paths, b: BlockSpec, x, g, flat, opt, need_dx=True,
                   kept: Optional[DeltaKept] = None, packing=None):
    """Recompute the block from x (or take `kept`) and backprop G = dL/dout; returns
    dL/dx (LoRA gradients added into `flat`; G's buffer reused for dh, then dx)."""
    d = b.delta
    B, T, _ = x.shape
    spans = token_spans(b, opt, B, T)
    kept_rows = None
    if kept is None:
        u, z, tb, ta = _inputs(b, x, spans)
        y, states = _recurrence(d, u, ta, tb, opt, packing, keep=True)
    else:
        (u, z, tb, ta), y, states, kept_rows = kept.take()

    # phase 3: dh over G's buffer, dy over y's, dz over z's
    cut = take if len(spans) > 1 else rows
    dh = g
    for t0, t1 in spans:
        at = (t0, T)
        xc, yc, zc, gc = rows(x, t0, t1, 1), cut(y, t0, t1, 1), cut(z, t0, t1, 1), \
            cut(dh, t0, t1, 1)
        mx.eval(yc, zc, gc)
        row = None if kept_rows is None else kept_rows.pop(0)
        dhc, dn = second_half_backward(paths, b, d.out, xc, gc, _out_in(d, yc, zc), flat, at,
                                       row)
        del gc, row
        dyc, dzc = _out_in_bwd(d, dn, yc, zc)
        del dn, yc, zc
        dh = put(dh, dhc, t0, t1, T, 1)
        y, z = put(y, dyc, t0, t1, T, 1), put(z, dzc, t0, t1, T, 1)
        mx.eval(dh, y, z, *flat.values())
    dy, dz = y, z
    del y, z, dhc, dyc, dzc

    if not need_dx and not has_lora(d.proj):
        return dh                                           # unused by the caller

    # phase 4: the recurrence and the conv backward, pieces in reverse
    du, dta, dtb = _recurrence_backward(d, dy, u, ta, tb, states, opt, packing)
    del dy, u, ta, tb, states

    # phase 5: the in-projections' backward per chunk; dx over dh's buffer
    for t0, t1 in spans:
        at = (t0, T)
        xc = rows(x, t0, t1, 1)
        da = _in_proj_bwd(paths, d, du[:, t0:t1], dz[:, t0:t1], dtb[:, t0:t1],
                          dta[:, t0:t1], norm(b.attn_in, xc), flat, need_dx, at)
        if need_dx:
            dhc = cut(dh, t0, t1, 1)
            mx.eval(dhc)
            dh = put(dh, dhc + norm_bwd(b.attn_in, da, xc), t0, t1, T, 1)
            del dhc
        del da
        mx.eval(*([dh] if need_dx else []), *flat.values())
    return dh
