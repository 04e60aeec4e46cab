"""Never a silently wrong gradient: check a ModelSpec against the model itself.

The first time a model meets mesp or mebp (and again when its LoRA layers, dtype
or the needed length change), we run the model's own forward once with every
block replaced by a probe that records the mask the model hands it and returns
its input. That gives, for free, (1) each layer's real mask, (2) the embedding
and head as the model computes them. Then, per distinct layer kind, the spec's
block forward must equal the mlx-lm block on a random input of T_c tokens, with
T_c > every sliding window (so the window is exercised). Cost: one block per
kind at T_c, the embedding and a 2-token head. With streamed weights (stream.py)
each checked block's weights are read for its check, and the embedding/head check
runs over the first T_c vocabulary rows (never the whole table).
"""

import mlx.core as mx

from .block import _frozen, block_forward, causal_mask, layer_mask
from .links import BlockLinks
from .spec import ModelSpec
from .stream import RESIDENT
from ..errors import SpecMismatchError

TOL = {mx.float32: 1e-4, mx.bfloat16: 3e-2, mx.float16: 1e-2}   # max err / max |ref|


class _Probe:
    """Stands in for a block: records the mask, returns the input unchanged."""

    def __init__(self, blk, io):
        self._blk, self._io, self.mask = blk, io, None

    def __getattr__(self, name):          # e.g. llama reads layer.use_sliding
        return getattr(self._blk, name)

    def __call__(self, x, *args, **kwargs):
        self.mask = self._io.mask_of(args, kwargs)
        return self._io.stand_in(x)


def _probe_masks(model, spec: ModelSpec, T: int, V: int):
    """(masks the model builds at T tokens, model logits of 2 tokens) with probe blocks."""
    layers = spec.inner.layers
    saved = list(layers)
    probes = [_Probe(b, s.io) for b, s in zip(saved, spec.blocks)]
    layers[:] = probes
    try:
        ids = (mx.arange(T) % V)[None]
        spec.inner(ids)
        masks = [p.mask for p in probes]
        logits = model(ids[:, :2])
        mx.eval(logits)
    finally:
        layers[:] = saved
    return masks, logits


def _as_bool(mask, T):
    if mask is None:
        return mx.ones((T, T), mx.bool_) if T == 1 else None
    if isinstance(mask, str):
        return causal_mask(T)
    return mask.astype(mx.bool_) if mask.dtype == mx.bool_ else mask > -1e30


def _rel_err(a, b) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    scale = max(mx.abs(b).max().item(), 1e-30)
    return mx.abs(a - b).max().item() / scale


def _needed_T(spec: ModelSpec, T: int) -> int:
    windows = [b.window for b in spec.blocks if b.window is not None]
    return max(8, min(max(windows) + 2, T)) if windows else 8


def _kind(b) -> tuple:
    """What makes two blocks compute differently (one check per distinct kind)."""
    r = b.rope
    rope = None if r is None else (r.dims, r.traditional, r.base, r.scale, r.mscale,
                                   None if r.freqs is None else r.freqs.sum().item())
    d = b.delta
    delta = None if d is None else (d.Hk, d.Hv, d.Dk, d.Dv, d.kernel, d.grouped)
    return (b.mixer, delta, b.window, b.mask_array, rope, b.softcap, b.act, b.residual,
            b.attn_in is None, b.attn_out is None, b.mlp_in is None, b.mlp_out is None,
            b.q_norm is None, b.v_norm is None, b.qk_norm_full, b.q_gate,
            b.kv_from is None, b.tail is None, b.hd, b.H, b.K)


def verify_spec(model, spec: ModelSpec, method: str, T: int, opt, weights=None) -> None:
    """Raise SpecMismatchError if the spec (mesp) or the masks (mebp) differ from the
    model's own computation; remembered on the model until its structure changes."""
    Tc = _needed_T(spec, T)
    dtype = spec.norm.w.dtype if spec.norm.w is not None else mx.float32
    key = (method, str(dtype), len(spec.paths), spec.first)   # changes with LoRA layers
    done = getattr(model, "_mesp_verified", {})
    if done.get(key, 0) >= Tc:
        return
    weights = weights or RESIDENT
    V = min(spec.head.shape[0], max(Tc, 2))          # vocabulary rows the checks use
    with weights.vocab_prefix(V):
        masks, ref_logits = _probe_masks(model, spec, Tc, V)
        if method == "mesp":
            _check_head(spec, ref_logits, dtype)
    name = spec.family
    for i, (b, m) in enumerate(zip(spec.blocks, masks)):
        want, got = _as_bool(m, Tc), _as_bool(layer_mask(b, Tc), Tc)
        if (want is None) != (got is None) or (want is not None and
                                               not mx.array_equal(want, got).item()):
            raise SpecMismatchError(
                f"{name} layer {i}: the attention mask mlx-lm builds differs from the "
                f"per-block engine's (window {b.window}); {method} would give wrong "
                "gradients. Use method='autodiff' (--method autodiff), exact for any model")
    if method == "mesp":
        _check_blocks(spec, Tc, dtype, opt, weights)
    done = dict(done)
    done[key] = Tc
    object.__setattr__(model, "_mesp_verified", done)


def _check_blocks(spec: ModelSpec, Tc: int, dtype, opt, weights):
    seen = set()
    D = spec.head.shape[1]
    x = mx.random.normal((1, Tc, D), key=mx.random.key(1234)).astype(dtype)
    for i, b in enumerate(spec.blocks):
        if _kind(b) in seen:
            continue
        seen.add(_kind(b))
        side, kv = _random_links(b, Tc, dtype)
        with weights.block(b):
            ref, _ = b.run(x, layer_mask(b, Tc), side, kv)
            links = None if side is None and kv is None else \
                BlockLinks(None, i, b.kv_from, side, kv)
            err = _rel_err(block_forward(b, x, opt, links=links), ref)
        if not err <= TOL.get(dtype, 3e-2):
            raise SpecMismatchError(
                f"{spec.family} layer {i}: the per-block engine's forward differs from the "
                f"model's own (relative error {err:.2g}); mesp would give wrong gradients. "
                "Use method='mebp' or 'autodiff' (--method autodiff), exact for any model")


def _random_links(b, Tc: int, dtype):
    """A random per-layer input and shared K, V where the block reads them."""
    side = kv = None
    if b.tail is not None and b.tail.gate is not None:
        P = _frozen(b.tail.gate).shape[0]
        side = mx.random.normal((1, Tc, P), key=mx.random.key(7)).astype(dtype)
    if b.kv_from is not None:
        k1, k2 = mx.random.split(mx.random.key(8))
        kv = tuple(mx.random.normal((1, b.K, Tc, b.hd), key=k).astype(dtype)
                   for k in (k1, k2))
    return side, kv


def _check_head(spec: ModelSpec, ref_logits, dtype):
    ids = (mx.arange(2) % spec.head.shape[0])[None]
    z = spec.logits(spec.norm(spec.embed_ids(ids)))
    err = _rel_err(z, ref_logits)
    if not err <= TOL.get(dtype, 3e-2):
        raise SpecMismatchError(
            f"{spec.family}: the engine's embedding/head differ from the model's own "
            f"(relative error {err:.2g}); use method='autodiff' (--method autodiff)")
