"""What every block kind shares: projections, token-chunk buffers and the MLP half.

A block is a token mixer (softmax attention in block.py, gated DeltaNet in
deltanet.py, the short conv in short_conv.py) followed by the same pre/sandwich-norm
MLP and, in gemma4, a tail:
    m_in = N_mi(h);  g, u = proj(m_in);  m = act(g) ⊙ u;  r2 = down(m);  h2 = h + α N_mo(r2)
    tail:  c = gate_t(h2);  n = gelu(c) ⊙ e;  r3 = proj_t(n);  out = s (h2 + N_t(r3))
    backward:  dn3 = s G;  dn = proj_t'(N_t'(dn3));  dc = gelu'(dn) ⊙ e
               dh2 = dn3 + gate_t'(dc);  dr2 = N_mo'(α dh2);  dm = down'(dr2)
               dg, du = act'(dm);  dh = dh2 + N_mi'(proj'(dg, du))
(out = h2 without a tail; e the block's per-layer input, a constant.)
Everything here is position-wise, so it runs over token chunks (`token_spans`: the
widest chunk tensor, T_c × F, holds about opt.token_chunk_bytes), one evaluation per
chunk, LoRA gradients summed over chunks into `flat` under mlx-lm's names.
"""

from typing import Callable, NamedTuple, Optional

import mlx.core as mx

from .lora_layers import LoRALinear
from ..ops.frozen import FrozenWeight
from ..ops.geglu import geglu, geglu_backward, geglu_saving
from ..ops.lora_linear import lora_linear, lora_linear_backward
from ..ops.rmsnorm import rmsnorm_backward
from ..ops.swiglu import swiglu, swiglu_backward, swiglu_from_saved, swiglu_saving
from ..ops.xielu import xielu, xielu_backward
from .spec import BlockSpec, Fused, Norm, Tail


class Act(NamedTuple):
    """A GLU activation's ops: m = act(gate) ⊙ up, its backward, and what a
    recompute can hand from the forward to the backward (`saved`, e.g. σ(gate))."""
    forward: Callable            # (a, u) -> m
    saving: Callable             # (a, u) -> (m, saved or None)
    backward: Callable           # (dm, a, u, saved or None) -> (da, du)
    from_saved: Optional[Callable] = None   # (a, u, saved) -> m; None: nothing to keep


def _geglu_act(approx: bool) -> Act:
    """GeGLU: the recompute's fp32 tanh (or Φ) goes to the backward; kept blocks
    keep nothing extra for it (from_saved None: their backward recomputes it once)."""
    return Act(lambda a, u: geglu(a, u, approx), lambda a, u: geglu_saving(a, u, approx),
               lambda d, a, u, s: geglu_backward(d, a, u, approx, s))


ACTS = {"silu": Act(swiglu, swiglu_saving, swiglu_backward, swiglu_from_saved),
        "gelu_tanh": _geglu_act(True), "gelu": _geglu_act(False)}


def xielu_act(module) -> Act:
    """Apertus's ungated xIELU, m = xielu(up) (u is None): its frozen α_p, α_n, β, ε
    are read from `module` (the block's XieLU) when the block runs."""
    p = lambda: (module.alpha_p, module.alpha_n, module.beta, module.eps)  # noqa: E731
    fwd = lambda a, _: xielu(a, *p())                                     # noqa: E731
    return Act(fwd, lambda a, u: (fwd(a, u), None),
               lambda d, a, u, _: (xielu_backward(d, a, *p()), None))


def act_of(b: BlockSpec) -> Act:
    """The block's activation: a name in ACTS or an Act of its own."""
    return b.act if isinstance(b.act, Act) else ACTS[b.act]


def gated(b: BlockSpec) -> bool:
    """Whether the MLP is a GLU (gate and up) rather than up alone."""
    return isinstance(b.gate_up, Fused) or len(b.gate_up) == 2


# ------------------------------------------------------------ projections
def _frozen(mod) -> FrozenWeight:
    return FrozenWeight.of(mod.linear if isinstance(mod, LoRALinear) else mod)


def lin(mod, x, at=None):
    """Forward of a frozen or LoRA projection; at = (t0, T) when x is a token chunk
    (the chunk's rows of the dropout mask)."""
    if isinstance(mod, LoRALinear):
        return lora_linear(x, FrozenWeight.of(mod.linear), mod.lora_a, mod.lora_b,
                           mod.scale, mod.linear.get("bias"), mod.drop_multiplier(x, at))
    return lora_linear(x, FrozenWeight.of(mod), bias=mod.get("bias"))


def lin_bwd(paths, mod, g, x, flat, need_dx=True, at=None):
    """dx of a projection; LoRA grads are added into `flat` under mlx-lm's names."""
    if not isinstance(mod, LoRALinear):
        return FrozenWeight.of(mod).gW(g) if need_dx else None
    dx, dA, dB = lora_linear_backward(g, x, FrozenWeight.of(mod.linear), mod.lora_a,
                                      mod.lora_b, mod.scale, mod.drop_multiplier(x, at),
                                      need_dx)
    p = paths[id(mod)]
    _acc(flat, p + ".lora_a", dA)
    _acc(flat, p + ".lora_b", dB)
    return dx


def _acc(flat, key, d):
    flat[key] = d if key not in flat else flat[key] + d


def proj(p, x, at=None):
    """Outputs of separate projections, or the parts of one fused projection."""
    if isinstance(p, Fused):
        y = lin(p.module, x, at)
        cuts = [sum(p.sizes[:i + 1]) for i in range(len(p.sizes) - 1)]
        return mx.split(y, cuts, axis=-1)
    return [lin(m, x, at) for m in p]


def proj_bwd(paths, p, grads, x, flat, need_dx=True, at=None):
    """Σ dx over the projections (a fused one: one backward of [g1 | g2 | …])."""
    if isinstance(p, Fused):
        return lin_bwd(paths, p.module, mx.concatenate(grads, axis=-1), x, flat, need_dx,
                       at)
    dxs = [lin_bwd(paths, m, g, x, flat, need_dx, at) for m, g in zip(p, grads)]
    return sum(dxs[1:], dxs[0]) if need_dx else None


def has_lora(p) -> bool:
    mods = (p.module,) if isinstance(p, Fused) else p
    return any(isinstance(m, LoRALinear) for m in mods)


def norm(n: Optional[Norm], x):
    return x if n is None else n(x)


def norm_bwd(n: Optional[Norm], dy, x):
    return dy if n is None else rmsnorm_backward(dy, x, n.w, n.eps)


def scaled(t, a):
    return t if a == 1.0 else t * a


# ------------------------------------------------------------ token chunks
def block_width(b: BlockSpec) -> int:
    """F, the MLP width (down_proj's input)."""
    return _frozen(b.down).shape[1]


MERGE_TAIL = 4   # a last chunk under 1/4 of the rows joins the chunk before it


def spans(T: int, n: int):
    """[(t0, t1)] chunks of n rows over T, a tail shorter than n / MERGE_TAIL merged
    into the chunk before (≤ 1.25 n rows): one pass fewer over every weight, which
    on the CPU's quantized path is one dequantization fewer (T 256 at F 4864: 215 +
    41 rows were two passes), for at most a quarter more chunk memory."""
    cuts = list(range(0, T, n))
    if len(cuts) > 1 and (T - cuts[-1]) * MERGE_TAIL < n:
        cuts.pop()
    return [(t, T if i + 1 == len(cuts) else cuts[i + 1]) for i, t in enumerate(cuts)]


def token_spans(b: BlockSpec, opt, B: int, T: int):
    """[(t0, t1)]: token chunks whose widest tensor, [B, T_c, F] in fp32, holds about
    opt.token_chunk_bytes (one chunk when T is short; see `spans` for the tail)."""
    F = block_width(b)
    return spans(T, max(1, opt.token_chunk_bytes // (4 * B * F)))


def rows(a, t0, t1, axis):
    return a[(slice(None),) * axis + (slice(t0, t1),)]


def take(a, t0, t1, axis):
    """A copy of rows t0…t1 (a token-axis slice), so that writing the chunk's result
    into `a` afterwards (`put`) reuses a's buffer instead of copying all of it."""
    return mx.contiguous(rows(a, t0, t1, axis))


def put(buf, part, t0, t1, T, axis):
    """Rows t0…t1 of an all-T result: `part` itself if it spans T, else written into
    buf (allocated on first use; MLX updates a sole-owner buffer in place)."""
    if t1 - t0 == T:
        return part
    if buf is None:
        shape = list(part.shape)
        shape[axis] = T
        buf = mx.zeros(shape, part.dtype)
    buf[(slice(None),) * axis + (slice(t0, t1),)] = part
    return buf


# ------------------------------------------------------------ the MLP half
def mlp_half(b: BlockSpec, h, at=None, saving=False):
    """m_in, gate, up, m = act(gate) ⊙ up: the MLP up to (not through) down_proj
    (ungated: up None, m = act(gate)); saving: m is (m, what the act's backward
    reuses, e.g. σ(gate))."""
    m_in = norm(b.mlp_in, h)
    gate, up = proj(b.gate_up, m_in, at) if gated(b) else (proj(b.gate_up, m_in, at)[0],
                                                          None)
    act = act_of(b)
    return m_in, gate, up, (act.saving if saving else act.forward)(gate, up)


def _keeps_r2(b: BlockSpec) -> bool:
    return b.mlp_out is not None or b.tail is not None


def mlp_forward(b: BlockSpec, h, at=None, saving=False, side=None):
    """(out, (gate, up, r2 if N_mo or a tail, saved)): the block's output of a chunk
    (h2 = h + α N_mo(r2), through the tail if any, with side the chunk's rows of e)
    and what a kept block hands its backward (saved only when `saving`)."""
    _, gate, up, m = mlp_half(b, h, at, saving=saving)
    m, sig = m if saving else (m, None)
    r2 = lin(b.down, m, at)
    out = h + scaled(norm(b.mlp_out, r2), b.residual)
    if b.tail is not None:
        out = tail_forward(b.tail, out, side, at)
    return out, (gate, up, r2 if _keeps_r2(b) else None, sig)


def mlp_backward(paths, b: BlockSpec, h, g, flat, at, kept=None, side=None):
    """dL/dh of a chunk's MLP half (and tail), G = dL/dout: recompute from h, or take
    the forward's (gate, up, r2, saved) from `kept` (saved None: recomputed)."""
    act = act_of(b)
    if kept is None:
        m_in, gate, up, (m, saved) = mlp_half(b, h, at, saving=True)
        r2 = lin(b.down, m, at) if _keeps_r2(b) else None
    else:
        gate, up, r2, saved = kept
        m_in = norm(b.mlp_in, h)
        m, saved = ((act.from_saved(gate, up, saved), saved) if saved is not None
                    else act.saving(gate, up))
    if b.tail is not None:
        g = tail_backward(paths, b.tail, h + scaled(norm(b.mlp_out, r2), b.residual), g,
                          side, flat, at)
    dr2 = scaled(g, b.residual)
    if b.mlp_out is not None:
        dr2 = norm_bwd(b.mlp_out, dr2, r2)
    dm = lin_bwd(paths, b.down, dr2, m, flat, at=at)
    dgate, dup = act.backward(dm, gate, up, saved)
    del m, dm, dr2, gate, up, r2, saved
    return g + norm_bwd(b.mlp_in, proj_bwd(paths, b.gate_up, [dgate, dup], m_in, flat,
                                           at=at), h)


def residual(b: BlockSpec, x, r1):
    """h = x + α N_ao(r1): the residual after any token mixer (r1 its output projection)."""
    return x + scaled(norm(b.attn_out, r1), b.residual)


def side_rows(links, t0, t1):
    """Rows t0…t1 of the block's per-layer input (None without one)."""
    return None if links is None or links.side is None else links.side[:, t0:t1]


def second_half(b: BlockSpec, x, spans, mixer_out, kept_rows=None, extras=False,
                links=None):
    """The block's output, a token chunk at a time, after any token mixer:
    r1 = mixer_out(t0, t1, at) (the mixer's output projection of the chunk),
    h = residual(x, r1), out = the MLP half of h (and the tail). kept_rows: a list
    that receives each chunk's (r1 if N_ao, h, gate, up, r2, saved) for a Kept
    (saved, e.g. σ(gate), only with extras)."""
    T = x.shape[1]
    saving = kept_rows is not None and extras and act_of(b).from_saved is not None
    out = None
    for t0, t1 in spans:
        at = (t0, T)
        r1 = mixer_out(t0, t1, at)
        h = residual(b, x[:, t0:t1], r1)
        oc, mlp = mlp_forward(b, h, at, saving=saving, side=side_rows(links, t0, t1))
        out = put(out, oc, t0, t1, T, 1)
        kept = []
        if kept_rows is not None:
            kept_rows.append((r1 if b.attn_out is not None else None, h, *mlp))
            kept = [a for a in kept_rows[-1] if a is not None]
        del r1, h, oc, mlp
        if len(spans) > 1 or kept_rows is not None:
            mx.eval(out, *kept)
    return out


def second_half_backward(paths, b: BlockSpec, out, x, g, u, flat, at, row=None,
                         side=None):
    """A token chunk's backward from G = dL/dout down to the input u of the mixer's
    output projection `out`: recompute r1 = out(u) and h = residual(x, r1) (or take
    them from `row`, a kept chunk), backprop the MLP half (and tail), then N_ao and
    `out`; returns (dL/dh, dL/du)."""
    if row is None:
        r1 = lin(out, u, at)
        h = residual(b, x, r1)
        dh = mlp_backward(paths, b, h, g, flat, at, side=side)
    else:
        r1, h, *mlp = row
        dh = mlp_backward(paths, b, h, g, flat, at, kept=tuple(mlp), side=side)
    del h
    dr1 = norm_bwd(b.attn_out, scaled(dh, b.residual), r1)
    return dh, lin_bwd(paths, out, dr1, u, flat, at=at)


def tail_forward(t: Tail, h2, e, at=None):
    """out = s (h2 + N_t(proj_t(gelu(gate_t(h2)) ⊙ e))), or s h2 without a gate."""
    if t.gate is not None:
        h2 = h2 + norm(t.norm, lin(t.proj, geglu(lin(t.gate, h2, at), e), at))
    return h2 * t.s()


def tail_backward(paths, t: Tail, h2, g, e, flat, at):
    """dL/dh2 from G = dL/dout (the tail's c, n, r3 recomputed from h2)."""
    dn3 = g * t.s()
    if t.gate is None:
        return dn3
    c = lin(t.gate, h2, at)
    n = geglu(c, e)
    dr3 = dn3 if t.norm is None else norm_bwd(t.norm, dn3, lin(t.proj, n, at))
    dc, _ = geglu_backward(lin_bwd(paths, t.proj, dr3, n, flat, at=at), c, e)
    return dn3 + lin_bwd(paths, t.gate, dc, h2, flat, at=at)


def mlp_kept_bytes(b: BlockSpec, B: int, T: int, itemsize: int) -> int:
    """Bytes a kept block holds for its MLP half: h, gate, up (and r2 if N_mo or a
    tail)."""
    D = _frozen(b.down).shape[0]
    per_token = D + (2 if gated(b) else 1) * block_width(b) + (D if _keeps_r2(b) else 0)
    return B * T * per_token * itemsize


def sig_bytes(b: BlockSpec, B: int, T: int, itemsize: int) -> int:
    """Bytes of σ(gate) a kept block may also keep (SwiGLU only: B·T·F)."""
    return B * T * block_width(b) * itemsize if act_of(b).from_saved is not None else 0
