"""Preference tuning (DPO, ORPO) on the exact engine, at about one SFT step's memory.

    loss, grads = preference_value_and_grad(model, chosen, rejected, "dpo", beta=0.1)

chosen, rejected: (inputs, targets, mask), [B, T_c] and [B, T_r]; row i of both is
pair i, mask 1 on the completion's targets. Every objective (objectives.py) is a
function of the per-row log-probabilities Lᵢ = −Σₜ mᵢₜ ℓᵢₜ (ℓ the token CE), so
  ∇loss = Σᵢ cᵢ ∇Lᵢ = ∇ Σᵢₜ wᵢₜ ℓᵢₜ,   wᵢₜ = −cᵢ mᵢₜ,   cᵢ = ∂loss/∂Lᵢ,
the engine's weighted token sum (step.py `weights`), exact with any method.
Schedule (mesp, mebp): 0. DPO without `reference`: L̃ of both sides, forward only
with every LoRA scale at 0 (the frozen model, no copy); 1. the shorter side S: a
forward and its head, ℓ_S and the unweighted dℓ/dh_S (B·T·D, kept), so L_S;
2. the other side G, one gradient pass whose head gives ℓ and the unweighted dℓ/dh
together, then c from (L_S, L_G), then dh = w ⊙ dℓ/dh; 3. side S, one gradient
pass from w ⊙ dℓ/dh_S (its head is not run again), added into G's gradients.
Cost: two SFT steps and one forward of S's blocks (plus the reference forwards).
Memory: one side's step, plus G's gradient tree while S's pass runs (never both
sides' checkpoints); where that tree waits is a named choice, `park_grads`: "memory",
or "disk" (a temporary file, written once and read back tensor by tensor into S's
gradients: the step's peak is then one side's). Each side keeps its dropout
masks across its passes. autodiff: the objective written out through the model's
own forward (the reference).
"""

import math
from contextlib import contextmanager
from typing import NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .backprop import Clock, forward_head, run
from .batch import check_batch, vocab_sizes
from .checkpoints import KINDS, open_checkpoints
from .lora_layers import lora_layers, set_dropout_keys
from .objectives import Side, coefficients, objective
from .plan import EngineOptions
from .stream import is_streamed
from .walk import row_logprobs

EXACT = ("autodiff", "mebp", "mesp")


class PreferenceResult(NamedTuple):
    loss: mx.array                    # scalar: the objective, mean over pairs
    grads: Optional[dict]             # like model.trainable_parameters() (None: forward only)
    chosen: Side                      # per-pair log-probabilities (and reference) [B]
    rejected: Side
    rewards: tuple                    # (reward_c [B], reward_r [B]) of the objective


def preference_value_and_grad(model, chosen, rejected, objective="dpo", beta=0.1,
                              method="mesp", reference=None):
    """(loss, grads) of a preference objective ("dpo", "orpo") over B pairs.

    reference: (L̃_c, L̃_r), two [B] arrays of the reference model's log-probabilities
    (DPO; None: this model with its adapters at zero, computed here)."""
    res = preference_step(model, chosen, rejected, objective, beta, method, reference)
    return res.loss, res.grads


def preference_step(model, chosen, rejected, objective="dpo", beta=0.1, method="mesp",
                    reference=None, options: Optional[EngineOptions] = None,
                    grad=True, stats: Optional[dict] = None,
                    park_grads: Optional[str] = None) -> PreferenceResult:
    """preference_value_and_grad with the per-pair figures; grad=False: forward only;
    stats: if a dict, each phase's seconds and the MLX peak after it (mesp, mebp);
    park_grads: "memory" or "disk" (None: as options.checkpoints, in its directory)."""
    obj = _check(objective, beta, method, reference, model)
    sides = [_side(model, chosen, "chosen"), _side(model, rejected, "rejected")]
    Bc, Br = sides[0][0].shape[0], sides[1][0].shape[0]
    if Bc != Br:
        raise ValueError(f"chosen and rejected must hold the same pairs: {Bc} and {Br} rows")
    ns = [m.sum(axis=1) for _, _, m in sides]
    clock = Clock(stats)
    refs = _reference(model, sides, obj, reference, method, options)
    clock.lap("reference")
    keys = _side_keys(model) if grad else (None, None)
    if method == "autodiff":
        return _autodiff(model, sides, ns, refs, obj, beta, keys, grad)
    if not grad:
        logps = [row_logprobs(model, *s, options, method) for s in sides]
        return _result(obj, beta, logps, ns, refs, None)
    opt = options or EngineOptions()
    park = park_grads or opt.checkpoints
    if park not in KINDS:
        raise ValueError(f"park_grads must be one of {', '.join(KINDS)}, got {park!r}")
    return _exact(model, sides, ns, refs, obj, beta, method, opt, keys, clock, park)


def _check(name, beta, method, reference, model):
    obj = objective(name)
    if method == "mezo":
        raise ValueError("method 'mezo' estimates the gradient of the SFT loss only; a "
                         "preference objective needs an exact method: mesp, mebp or "
                         "autodiff")
    if method not in EXACT:
        raise ValueError(f"unknown method {method!r}; supported: {', '.join(EXACT)}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if reference is not None and not obj.reference:
        raise ValueError(f"{name} uses no reference model; pass reference=None")
    if method == "autodiff" and is_streamed(model):
        raise ValueError("a model with streamed weights runs with method mesp or mebp; "
                         "autodiff needs every weight resident")
    return obj


def _side(model, side, name):
    if not (isinstance(side, (tuple, list)) and len(side) == 3):
        raise ValueError(f"{name} must be (inputs, targets, mask), [B, T] arrays")
    x, y, m = side
    m = check_batch(x, y, m, vocab_sizes(model)).astype(mx.float32)
    empty = [i for i, n in enumerate(m.sum(axis=1).tolist()) if n == 0]
    if empty:
        raise ValueError(f"{name} row {empty[0]} has no completion target (its mask is "
                         "all 0): every pair needs at least one target on each side")
    return x, y, m


@contextmanager
def adapters_off(model):
    """Every LoRA layer's scale at 0 for the duration: the frozen base model."""
    layers = [m for _, m in lora_layers(model)]
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield model
    finally:
        for m, s in zip(layers, scales):
            m.scale = s


def _reference(model, sides, obj, reference, method, options):
    if not obj.reference:
        return [None, None]
    if reference is not None:
        refs = [mx.array(r).astype(mx.float32) for r in reference]
        B = sides[0][0].shape[0]
        if len(refs) != 2 or any(r.shape != (B,) for r in refs):
            raise ValueError(f"reference must be (ref_chosen, ref_rejected), two [{B}] "
                             "arrays of log-probabilities")
        return refs
    with adapters_off(model):
        return [row_logprobs(model, *s, options, method) for s in sides]


def _side_keys(model):
    """One dropout key per side (None, None without dropout), from MLX's global RNG."""
    if not any(m.dropout > 0 and m.training for _, m in lora_layers(model)):
        return None, None
    seed = mx.random.randint(0, 2**31 - 1, ()).item()
    k = mx.random.split(mx.random.key(seed))
    return k[0], k[1]


def _result(obj, beta, logps, ns, refs, grads, loss=None) -> PreferenceResult:
    c, r = (Side(lp, n, ref) for lp, n, ref in zip(logps, ns, refs))
    loss = obj.loss(c, r, beta) if loss is None else loss
    rewards = (obj.reward(c, beta), obj.reward(r, beta))
    mx.eval(loss, *rewards)
    return PreferenceResult(loss, grads, c, r, rewards)


def _exact(model, sides, ns, refs, obj, beta, method, options, keys, clock, park):
    S = min((0, 1), key=lambda k: sides[k][0].size)         # the side run twice
    G = 1 - S
    set_dropout_keys(model, keys[S])
    logps = [None, None]
    ce_S, g_S = forward_head(model, sides[S][0], sides[S][1], method, options)
    logps[S] = -(ce_S * sides[S][2]).sum(axis=1)
    clock.lap("forward_short")
    coef = {}

    def weights_G(ce):                                       # ℓ [B, T] of side G
        logps[G] = -(ce * sides[G][2]).sum(axis=1)
        c, r = (Side(lp, n, ref) for lp, n, ref in zip(logps, ns, refs))
        coef["loss"], *coef["c"] = coefficients(obj, c, r, beta)
        return -coef["c"][G][:, None] * sides[G][2]

    flat = {}
    set_dropout_keys(model, keys[G])
    _, grads = run(model, *sides[G], method, options, clock.sub("long"),
                   weights=weights_G, into=flat)
    del grads                                                # `flat` alone holds them
    clock.lap("gradient_long")
    set_dropout_keys(model, keys[S])
    w_S = -coef["c"][S][:, None] * sides[S][2]
    head = (mx.sum(w_S * ce_S), g_S * w_S[..., None].astype(g_S.dtype))
    del g_S
    with open_checkpoints(park, options.checkpoint_dir,
                          sum(g.nbytes for g in flat.values())) as parked:
        if park == "disk":
            for k in list(flat):
                parked.put(k, flat.pop(k))
        _, grads = run(model, *sides[S], method, options, clock.sub("short"), into=flat,
                       head=head)
        if park == "disk":
            del grads                                        # `flat` alone holds them
            grads = _unpark(model, flat, parked)
    clock.lap("gradient_short")
    set_dropout_keys(model, None)
    return _result(obj, beta, logps, ns, refs, grads, coef["loss"])


def _unpark(model, flat, parked):
    """S's gradients plus G's read back from disk, one tensor at a time."""
    for k in flat:
        flat[k] = flat[k] + parked.pop(k)
        mx.eval(flat[k])
    return tree_map_with_path(lambda p, _: flat[p], model.trainable_parameters())


def _autodiff(model, sides, ns, refs, obj, beta, keys, grad):
    def logp(side, key):
        x, y, m = side
        set_dropout_keys(model, key)
        ce = nn.losses.cross_entropy(model(x).astype(mx.float32), y)
        return -(ce * m).sum(axis=1)

    def loss_fn(model):
        lc, lr = logp(sides[0], keys[0]), logp(sides[1], keys[1])
        return obj.loss(Side(lc, ns[0], refs[0]), Side(lr, ns[1], refs[1]), beta), lc, lr

    if grad:
        (loss, lc, lr), grads = nn.value_and_grad(model, loss_fn)(model)
    else:
        (loss, lc, lr), grads = loss_fn(model), None
    set_dropout_keys(model, None)
    mx.eval(loss, lc, lr, grads)
    return _result(obj, beta, [lc, lr], ns, refs, grads, loss)
