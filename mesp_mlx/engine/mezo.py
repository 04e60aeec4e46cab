"""MeZO: zeroth-order SPSA on the LoRA parameters, forward passes only.

Letters: θ the d trainable LoRA values, z ~ N(0, I_d), ε perturbation size,
η learning rate, λ weight decay (Malladi et al. 2023, Algorithm 1).
  L± = L(θ ± εz)                  two forward passes, no autodiff graph
  p  = (L+ − L−) / (2ε)           projected gradient ≈ zᵀ∇L (exact for a quadratic)
  ĝ  = p · z                      the gradient estimate: E[ĝ] = ∇L + O(ε²)
  θ ← θ − η (p · z + λ θ)         the MeZO-SGD update (no optimizer state)
Seed trick: z is never stored. Each tensor's z is regenerated when needed by
`mx.random.normal(shape, key=k_i)`, k_i split from the step seed per tensor.

Exact restore. MLX arrays are immutable, so perturbing "in place" means
swapping a module's lora_a/lora_b for θ + εz. We swap one block right before
it runs and put the original arrays back right after: θ itself is never
rewritten, so θ + εz − 2εz + εz rounding (which drifts measurably in bf16)
never happens, and the only extra memory is one block's perturbed LoRA
tensors (≈ 0.7 MB for a Qwen2.5-0.5B block in fp32). The update is computed
per tensor in fp32 and cast once. The forward is inference: block by block
with an evaluation barrier, then the chunked loss head (`loss_head_value`).
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from ..ops.dequant_matmul import tile_barriers
from .batch import check_batch, vocab_sizes
from .block import block_forward
from .links import StepLinks
from .lora_layers import step_dropout
from .plan import EngineOptions, cache_policy
from .stream import weight_source
from .walk import head_mean, model_spec, walk

MEZO_LR = 1e-4         # MeZO paper, LoRA: lr 1e-4 or 5e-5
MEZO_EPS = 1e-2        # MeZO paper, LoRA: ε = 1e-2
ESTIMATE_EPS = 1e-3    # mezo_gradient_estimate's default (smaller O(ε²) bias)


class Perturbation:
    """z for each trainable tensor of `model`, regenerated from `seed` on demand."""

    def __init__(self, model, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"MeZO seed must be an int in [0, 2**64), got {seed!r}")
        self.seed = seed
        self.names = [k for k, _ in tree_flatten(model.trainable_parameters())]
        if not self.names:
            raise ValueError("the model has no trainable parameters: apply_lora first")
        keys = mx.random.split(mx.random.key(seed), max(len(self.names), 2))
        self.keys = {n: keys[i] for i, n in enumerate(self.names)}

    def z(self, name: str, shape) -> mx.array:
        """This tensor's direction, fp32 (the same array every call)."""
        return mx.random.normal(shape, mx.float32, key=self.keys[name])


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


@contextmanager
def perturbed(module, prefix: str, pert: Perturbation, c: float):
    """Inside the block, `module`'s trainable tensors are θ + c·z (fp32 math,
    cast to θ's dtype); on exit the original arrays are put back untouched.
    prefix: the module's path in the model (names of pert's keys)."""
    orig = tree_flatten(module.trainable_parameters())
    if c == 0 or not orig:
        yield
        return
    mods = dict(module.named_modules())
    for k, v in orig:
        new = (v.astype(mx.float32) + c * pert.z(_join(prefix, k), v.shape)).astype(v.dtype)
        mx.eval(new)
        _set(mods, k, new)
    try:
        yield
    finally:
        for k, v in orig:
            _set(mods, k, v)


def _set(mods, name, value):
    path, _, attr = name.rpartition(".")
    setattr(mods[path], attr, value)


@dataclass
class SPSA:
    """One two-sided estimate: p = (L+ − L−) / (2ε) along z(seed)."""
    p: float
    loss_plus: float
    loss_minus: float
    eps: float
    seed: int

    @property
    def loss(self) -> float:
        """(L+ + L−) / 2 = L(θ) + O(ε²): the step's reported loss (no third pass)."""
        return 0.5 * (self.loss_plus + self.loss_minus)


def spsa(loss_at: Callable[[float], float], eps: float, seed: int) -> SPSA:
    """loss_at(c) = L(θ + c·z) as a float; evaluated at +ε then −ε."""
    if not eps > 0 or eps != eps or eps == float("inf"):
        raise ValueError(f"MeZO eps must be a positive finite number, got {eps!r}")
    plus, minus = loss_at(eps), loss_at(-eps)
    return SPSA((plus - minus) / (2 * eps), plus, minus, eps, seed)   # float64 difference


def lm_loss_at(model, inputs, targets, mask, pert: Perturbation,
               options: Optional[EngineOptions] = None, stats: Optional[dict] = None):
    """c ↦ L(θ + c·z) for a LoRA model of any supported family, forward only,
    inference memory (the generic block forward of block.py).

    Blocks below the lowest LoRA block are run once and their output is reused.
    """
    opt = options or EngineOptions()
    spec = model_spec(model, "mesp", inputs.shape[1], opt)
    weights = weight_source(model)                  # streamed: one block's W0 at a time
    h0 = spec.embed_ids(inputs)
    mx.eval(h0)
    links = StepLinks(spec, inputs, h0)           # sources below spec.first: kept
    plain = lambda i, b, h: block_forward(b, h, opt, links=links.forward(i, b))
    h0 = walk(spec, h0, plain, weights, stop=spec.first)

    def loss_at(c: float) -> float:
        t0 = time.perf_counter()
        h = walk(spec, h0, plain, weights, start=spec.first,
                 around=lambda i, b: perturbed(b.module, spec.paths[id(b.module)], pert, c))
        loss = head_mean(spec, h, targets, mask, opt).item()
        if stats is not None:
            stats["forward_s"] = stats.get("forward_s", 0.0) + time.perf_counter() - t0
        return loss
    return loss_at


def estimate_tree(model, pert: Perturbation, p: float):
    """ĝ = p · z, shaped like model.trainable_parameters() (θ's dtypes), lazy."""
    return tree_map_with_path(lambda k, v: (p * pert.z(k, v.shape)).astype(v.dtype),
                              model.trainable_parameters())


def apply_update(model, pert: Perturbation, p: float, lr: float, weight_decay: float = 0.0):
    """θ ← θ − lr·(p·z + λ·θ), tensor by tensor in fp32, z regenerated."""
    mods = dict(model.named_modules())
    for k, v in tree_flatten(model.trainable_parameters()):
        t = v.astype(mx.float32)
        new = (t - lr * (p * pert.z(k, v.shape) + weight_decay * t)).astype(v.dtype)
        mx.eval(new)
        _set(mods, k, new)


def fresh_seed() -> int:
    """A step seed drawn from MLX's global RNG (so mx.random.seed fixes it)."""
    return mx.random.randint(0, 2**31 - 1, ()).item()


def _spsa_lm(model, inputs, targets, mask, eps, seed, options, stats):
    mask = check_batch(inputs, targets, mask, vocab_sizes(model))
    step_dropout(model)                 # one dropout mask for both forward passes
    pert = Perturbation(model, seed)
    with tile_barriers():               # outside any transform: evaluate per W0 tile
        res = spsa(lm_loss_at(model, inputs, targets, mask, pert, options, stats), eps,
                   seed)
    if stats is not None:
        stats.update(seed=seed, projected_grad=res.p, loss_plus=res.loss_plus,
                     loss_minus=res.loss_minus)
    return pert, res


def _done(options):
    if cache_policy(options or EngineOptions()) in ("block", "step", "always"):
        mx.clear_cache()


def mezo_gradient_estimate(model, inputs, targets, mask=None, eps: float = ESTIMATE_EPS,
                           seed: int = 0, *, options: Optional[EngineOptions] = None,
                           stats: Optional[dict] = None):
    """MeZO's gradient *estimate* p·z (one random direction, not the gradient),
    a tree like model.trainable_parameters(); the parameters are left exactly
    as they were. Compare it with mesp_mlx.value_and_grad's exact gradient."""
    pert, res = _spsa_lm(model, inputs, targets, mask, eps, seed, options, stats)
    g = estimate_tree(model, pert, res.p)
    mx.eval(g)
    _done(options)
    return g


def value_and_grad(model, inputs, targets, mask=None, eps: float = ESTIMATE_EPS,
                   seed: Optional[int] = None, options=None, stats=None):
    """(loss, gradient estimate) for engine.value_and_grad(method="mezo"):
    loss = (L+ + L−)/2, a fresh seed from MLX's global RNG unless given."""
    seed = fresh_seed() if seed is None else seed
    pert, res = _spsa_lm(model, inputs, targets, mask, eps, seed, options, stats)
    g = estimate_tree(model, pert, res.p)
    mx.eval(g)
    _done(options)
    return mx.array(res.loss, mx.float32), g


def mezo_step(model, inputs, targets, mask=None, lr: float = MEZO_LR,
              eps: float = MEZO_EPS, weight_decay: float = 0.0, seed: Optional[int] = None,
              options: Optional[EngineOptions] = None, stats: Optional[dict] = None) -> SPSA:
    """One MeZO-SGD training step in place: two forward passes, then
    θ ← θ − lr·(p·z + wd·θ). Peak ≈ forward-only inference + LoRA parameters."""
    if not lr >= 0 or not weight_decay >= 0:
        raise ValueError(f"MeZO lr and weight decay must be >= 0, got {lr}, {weight_decay}")
    seed = fresh_seed() if seed is None else seed
    pert, res = _spsa_lm(model, inputs, targets, mask, eps, seed, options, stats)
    apply_update(model, pert, res.p, lr, weight_decay)
    _done(options)
    return res
