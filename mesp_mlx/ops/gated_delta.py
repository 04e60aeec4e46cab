"""Gated delta rule (Qwen3.5 DeltaNet): chunked forward, hand backward, reference.

Letters: B batch, T tokens, Hk key heads, H value heads (value head h reads key head
h // (H/Hk), mlx-lm's mx.repeat), Dk key dim, Dv value dim, C chunk, N = ⌈T/C⌉ chunks.
Per head, state S [Dv, Dk] (mlx-lm's layout, [B, H, Dv, Dk]); mlx-lm's recurrence:
    S ← g_t S;   δ_t = β_t (v_t − S k_t);   S ← S + δ_t k_tᵀ;   y_t = S q_t
One chunk (rows i, j its tokens, S the state before it):
    L = cumsum(log g),  Γ_ij = exp(L_i − L_j) (j ≤ i),  γ_i = exp(L_i)
    ρ_j = Γ_{C−1,j},  γ̄ = γ_{C−1}   (decay to the chunk end, of the start state)
    A = Γ ⊙ KKᵀ (j < i),  P = Γ ⊙ QKᵀ (j ≤ i),  𝒯 = (I + diag(β) A)⁻¹         [C, C]
    U = V − γ ⊙ KSᵀ,  Δ = 𝒯 (β ⊙ U)   (row i is δ_i)                          [C, Dv]
    Y = γ ⊙ QSᵀ + P Δ,   S' = γ̄ S + Δᵀ (ρ ⊙ K)
Only S' depends on the previous chunk, so one loop carries S (Δ = 𝒯βV − 𝒯β(γ⊙K) Sᵀ)
and every other term is batched over chunks. Backward, dS' the end-state gradient:
    dΔ = Pᵀ dY + (ρ⊙K) dS'ᵀ,  dX = 𝒯ᵀ dΔ,  dU = dV = β ⊙ dX,  dN = −dX Δᵀ
    dA = β ⊙ dN (j < i),  dP = dY Δᵀ (j ≤ i),  dβ = rowsum(dX ⊙ U) + rowsum(dN ⊙ A)
    dS = γ̄ dS' + (γ⊙dY)ᵀ Q − (γ⊙dU)ᵀ K                (the reverse loop)
    dQ = γ ⊙ dY S + (Γ⊙dP) K
    dK = −(γ⊙dU) S + (Γ⊙dP)ᵀ Q + (Γ⊙dA + (Γ⊙dA)ᵀ) K + ρ ⊙ Δ dS'
    dL_i = Σ_j E_ij − Σ_j E_ji + dγ_i γ_i − dρ_i ρ_i (+ Σ dρ⊙ρ + dγ̄ γ̄ at i = C−1),
           E = dP ⊙ P + dA ⊙ A (= Γ ⊙ dΓ);   d log g = reverse cumsum(dL),  dg = d log g / g
Decays multiply in log space: exp(L_i − L_j) ≤ 1 for j ≤ i, nothing overflows, and
L_i − L_j is summed over its own tokens (a [C, C] cumsum, no cancellation); the
backward returns dg. C is a power of two (𝒯), at most the next one ≥ T; the last chunk is
padded with tokens that leave the state as it is (g = 1, β = 0, q = k = v = 0).
Cuts: a packed example starting at t (segments [B, T], like attention), or g_t = 0,
zero the state before token t: Γ_ij and γ_i are 0 across a cut and dg_t = 0 there, the
same values and gradients as g_t forced to 0. (mlx-lm's optional mask, left padding in
batched generation, is not taken: training passes none.)
Stored: the N chunk start states only ([B, H, N, Dv, Dk], fp32); Γ, 𝒯, Δ are recomputed
in the backward. All math in fp32; y returns in q's dtype, the final state in fp32.
"""

from typing import NamedTuple

import mlx.core as mx


class _Chunks(NamedTuple):
    Q: mx.array         # [B, H, N, C, Dk]
    K: mx.array         # [B, H, N, C, Dk]
    V: mx.array         # [B, H, N, C, Dv]
    beta: mx.array      # [B, H, N, C]
    Gam: mx.array       # Γ [B, H, N, C, C], 0 above the diagonal and across cuts
    gam: mx.array       # γ [B, H, N, C]
    P: mx.array         # Γ ⊙ QKᵀ [B, H, N, C, C]
    A: mx.array         # Γ ⊙ KKᵀ [B, H, N, C, C], strictly lower
    Tinv: mx.array      # 𝒯 [B, H, N, C, C]


def _unit_lower_inverse(M):
    """(I + M)⁻¹ for strictly lower triangular M [..., n, n] (n a power of two), by 2×2
    blocks: the diagonal blocks recursively, the lower one −I₂₂ M₂₁ I₁₁ (matmuls only)."""
    n = M.shape[-1]
    if n == 1:
        return mx.ones(M.shape, M.dtype)
    h = n // 2
    inner = _unit_lower_inverse(mx.stack([M[..., :h, :h], M[..., h:, h:]]))
    I11, I22 = inner[0], inner[1]
    I21 = -((I22 @ M[..., h:, :h]) @ I11)
    top = mx.concatenate([I11, mx.zeros(I11.shape, M.dtype)], axis=-1)
    return mx.concatenate([top, mx.concatenate([I21, I22], axis=-1)], axis=-2)


def _to_chunks(x, H, C):
    """[B, T, h, ...] (h divides H) -> [B, H, N, C, ...], zero-padded along T."""
    B, T, h = x.shape[:3]
    if h != H:
        x = mx.repeat(x, H // h, axis=2)
    x = mx.moveaxis(x, 2, 1)
    pad = -T % C
    if pad:
        x = mx.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
    return x.reshape(B, H, -1, C, *x.shape[3:])


def _from_chunks(x, T, h=None):
    """[B, H, N, C, ...] -> [B, T, h, ...], summing the H/h value heads of each key head."""
    B, H = x.shape[:2]
    x = mx.moveaxis(x.reshape(B, H, -1, *x.shape[4:])[:, :, :T], 1, 2)
    if h is not None and h != H:
        x = x.reshape(B, T, h, H // h, *x.shape[3:]).sum(axis=3)
    return x


def _chunk_size(chunk, T):
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    return min(chunk, 1 << max(T - 1, 0).bit_length())


def _cuts(g, segments):
    """Bool [B, T, H]: the state is zeroed before this token."""
    cut = g == 0
    if segments is not None:
        new = segments[:, 1:] != segments[:, :-1]
        new = mx.concatenate([mx.zeros_like(new[:, :1]), new], axis=1)
        cut = cut | new[:, :, None]
    return cut


def _prepare(q, k, v, g, beta, segments, chunk):
    """Chunked fp32 inputs and the state-independent chunk terms (module docstring)."""
    H, T = v.shape[2], v.shape[1]
    C = _chunk_size(chunk, T)
    cut_t = _cuts(g, segments)
    lg = mx.where(cut_t, 0.0, mx.log(mx.where(cut_t, 1.0, g.astype(mx.float32))))
    Q, K, V, b = (_to_chunks(x.astype(mx.float32), H, C) for x in (q, k, v, beta))
    lgc = _to_chunks(lg, H, C)                                      # [B, H, N, C]
    L = mx.cumsum(lgc, axis=-1)
    cut = _to_chunks(cut_t, H, C)
    seg = mx.cumsum(cut.astype(mx.int32), axis=-1)
    causal = mx.tril(mx.ones((C, C), mx.bool_))
    keep = causal & (seg[..., :, None] == seg[..., None, :])
    strict = mx.tril(mx.ones((C, C), mx.bool_), -1)
    # L_i − L_j as its own sum Σ_{j<t≤i} log g_t, not a difference of two cumsums:
    # with strong decays |L| reaches ~1e3 within a chunk, and the difference would
    # keep only |L|·ε of relative precision (fp32: 1e-4 against the token loop)
    Lij = mx.cumsum(mx.where(strict, lgc[..., :, None], 0.0), axis=-2)
    Gam = mx.exp(mx.where(keep, Lij, -mx.inf))
    gam = mx.where(seg == 0, mx.exp(L), 0.0)
    A = mx.where(strict, Gam * (K @ K.swapaxes(-1, -2)), 0.0)
    P = Gam * (Q @ K.swapaxes(-1, -2))
    Tinv = _unit_lower_inverse(b[..., :, None] * A)
    return _Chunks(Q, K, V, b, Gam, gam, P, A, Tinv)


def gated_delta_forward(q, k, v, g, beta, state=None, *, chunk=64, segments=None,
                        keep_states=False):
    """(y [B, T, H, Dv], final state [B, H, Dv, Dk] fp32, start states of the chunks
    [B, H, N, Dv, Dk] when keep_states else None). q, k: [B, T, Hk, Dk]; g, beta: [B, T, H]."""
    B, T, H, Dv = v.shape
    c = _prepare(q, k, v, g, beta, segments, chunk)
    S = (mx.zeros((B, H, Dv, q.shape[-1]), mx.float32) if state is None
         else state.astype(mx.float32))
    Tb = c.Tinv * c.beta[..., None, :]                              # 𝒯 diag(β)
    U0, W = Tb @ c.V, Tb @ (c.gam[..., None] * c.K)                 # Δ = U0 − W Sᵀ
    R = c.Gam[..., -1, :, None] * c.K                               # ρ ⊙ K
    starts, deltas = [], []
    for n in range(c.Q.shape[2]):
        starts.append(S)
        D = U0[:, :, n] - W[:, :, n] @ S.swapaxes(-1, -2)           # [B, H, C, Dv]
        S = c.gam[:, :, n, -1, None, None] * S + D.swapaxes(-1, -2) @ R[:, :, n]
        deltas.append(D)
    S0 = mx.stack(starts, axis=2)
    D = mx.stack(deltas, axis=2)
    Y = c.gam[..., None] * (c.Q @ S0.swapaxes(-1, -2)) + c.P @ D
    return _from_chunks(Y, T).astype(q.dtype), S, (S0 if keep_states else None)


def gated_delta(q, k, v, g, beta, state=None, *, chunk=64, segments=None):
    """(y, final state): gated_delta_forward without the stored states."""
    y, S, _ = gated_delta_forward(q, k, v, g, beta, state, chunk=chunk, segments=segments)
    return y, S


def _state_grads(c, dY, W, R, dS_end):
    """Reverse loop: dS' per chunk [B, H, N, Dv, Dk] and the initial-state gradient."""
    const = ((c.gam[..., None] * dY).swapaxes(-1, -2) @ c.Q
             - dY.swapaxes(-1, -2) @ (c.P @ W))                      # [B, H, N, Dv, Dk]
    dS, ends = dS_end, []
    for n in reversed(range(c.Q.shape[2])):
        ends.append(dS)
        dS = (c.gam[:, :, n, -1, None, None] * dS
              - (dS @ R[:, :, n].swapaxes(-1, -2)) @ W[:, :, n] + const[:, :, n])
    return mx.stack(ends[::-1], axis=2), dS


def _log_decay_grad(c, dA, dP, dgam, drho):
    """d log g [B, H, N, C] from the decay factors Γ, γ, ρ (module docstring)."""
    E = dP * c.P + dA * c.A                                         # Γ ⊙ dΓ
    rho = c.Gam[..., -1, :]
    dL = E.sum(-1) - E.sum(-2) + dgam * c.gam - drho * rho
    last = mx.arange(dL.shape[-1]) == dL.shape[-1] - 1
    dL = dL + mx.where(last, (drho * rho).sum(-1, keepdims=True), 0.0)
    return mx.cumsum(dL, axis=-1, reverse=True)


def _input_grads(c, S, dY, dS1, R):
    """(dQ, dK, dV, dβ, d log g) of every chunk, chunk layout (module docstring)."""
    C = c.Q.shape[3]
    KS, QS = c.K @ S.swapaxes(-1, -2), c.Q @ S.swapaxes(-1, -2)     # [B, H, N, C, Dv]
    U = c.V - c.gam[..., None] * KS
    D = c.Tinv @ (c.beta[..., None] * U)                            # Δ
    dX = c.Tinv.swapaxes(-1, -2) @ (c.P.swapaxes(-1, -2) @ dY + R @ dS1.swapaxes(-1, -2))
    dU = c.beta[..., None] * dX
    dN = -(dX @ D.swapaxes(-1, -2))
    dA = mx.where(mx.tril(mx.ones((C, C), mx.bool_), -1), c.beta[..., None] * dN, 0.0)
    dP = dY @ D.swapaxes(-1, -2)                    # (j > i is masked by Γ and P below)
    dQK, dKK = c.Gam * dP, c.Gam * dA
    DdS = D @ dS1                                                   # [B, H, N, C, Dk]
    rho = c.Gam[..., -1, :, None]
    dQ = c.gam[..., None] * (dY @ S) + dQK @ c.K
    dK = (-(c.gam[..., None] * dU) @ S + dQK.swapaxes(-1, -2) @ c.Q
          + (dKK + dKK.swapaxes(-1, -2)) @ c.K + rho * DdS)
    dgam = (dY * QS).sum(-1) - (dU * KS).sum(-1)
    dgam_end = (dS1 * S).sum((-2, -1), keepdims=True)[..., 0]      # ⟨dS', S⟩ [B, H, N, 1]
    dgam = dgam + mx.where(mx.arange(C) == C - 1, dgam_end, 0.0)
    dlg = _log_decay_grad(c, dA, dP, dgam, (c.K * DdS).sum(-1))
    dbeta = (dX * U).sum(-1) + (dN * c.A).sum(-1)
    return dQ, dK, dU, dbeta, dlg


def gated_delta_backward(dy, q, k, v, g, beta, states, *, chunk=64, segments=None,
                         d_final_state=None):
    """(dq, dk, dv, dg, dbeta, d initial state) from the chunk start states of
    gated_delta_forward(..., keep_states=True); same chunk and segments."""
    T, H, Hk = v.shape[1], v.shape[2], q.shape[2]
    c = _prepare(q, k, v, g, beta, segments, chunk)
    dY = _to_chunks(dy.astype(mx.float32), H, c.Q.shape[3])
    W = (c.Tinv * c.beta[..., None, :]) @ (c.gam[..., None] * c.K)
    R = c.Gam[..., -1, :, None] * c.K
    S = states                                                      # [B, H, N, Dv, Dk]
    dS_end = (mx.zeros(S.shape[:2] + S.shape[3:], mx.float32) if d_final_state is None
              else d_final_state.astype(mx.float32))
    dS1, dS0 = _state_grads(c, dY, W, R, dS_end)
    dQ, dK, dV, dbeta, dlg = _input_grads(c, S, dY, dS1, R)
    cut = _cuts(g, segments)
    dg = mx.where(cut, 0.0, _from_chunks(dlg, T) / mx.where(cut, 1.0, g.astype(mx.float32)))
    return (_from_chunks(dQ, T, Hk).astype(q.dtype), _from_chunks(dK, T, Hk).astype(k.dtype),
            _from_chunks(dV, T).astype(v.dtype), dg.astype(g.dtype),
            _from_chunks(dbeta, T).astype(beta.dtype), dS0)


def gated_delta_ref(q, k, v, g, beta, state=None, segments=None):
    """(y, final state): mlx-lm's token loop (gated_delta_ops), a segment start
    multiplying that token's g by 0."""
    B, T, Hk, Dk = q.shape
    H, Dv = v.shape[2:]
    if segments is not None:
        keep = mx.concatenate([mx.ones((B, 1), mx.bool_),
                               segments[:, 1:] == segments[:, :-1]], axis=1)
        g = g * keep[:, :, None].astype(g.dtype)
    S = mx.zeros((B, H, Dv, Dk), mx.float32) if state is None else state
    qr, kr = (mx.repeat(x, H // Hk, axis=2) for x in (q, k))
    ys = []
    for t in range(T):
        S = S * g[:, t, :, None, None]
        kt = kr[:, t, :, None, :]
        delta = (v[:, t] - (S * kt).sum(-1)) * beta[:, t, :, None]
        S = S + kt * delta[..., None]
        ys.append((S * qr[:, t, :, None, :]).sum(-1).astype(q.dtype))
    return mx.stack(ys, axis=1), S
