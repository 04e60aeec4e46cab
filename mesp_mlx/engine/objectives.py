"""Preference objectives as functions of per-sequence log-probabilities.

Letters: B pairs; for each side (chosen c, rejected r) of pair i:
  Lᵢ = Σₜ mᵢₜ log p(yᵢₜ | yᵢ<ₜ)    the completion's log-probability   [B]
  nᵢ = Σₜ mᵢₜ                       its target count                   [B]
  L̃ᵢ                                the reference model's Lᵢ (DPO)      [B]
  DPO   z = β((L_c − L̃_c) − (L_r − L̃_r)),   loss = −meanᵢ log σ(zᵢ)
        reward = β(L − L̃)
  ORPO  l̄ = L/n,  odds = l̄ − log(1 − e^l̄),
        loss = meanᵢ(−l̄_c) − β meanᵢ log σ(odds_c − odds_r),   reward = β l̄
Each loss is written plainly; `coefficients` differentiates it w.r.t. the [B]
log-probabilities (a few scalars per pair), which is all the engine needs:
∇loss = Σᵢ (c_c,ᵢ ∇L_c,ᵢ + c_r,ᵢ ∇L_r,ᵢ). A new objective (CPO, SimPO, ...) is one
more table row; the reports' reward accuracy is mean(reward_c > reward_r) and the
margin mean(reward_c − reward_r).
"""

from dataclasses import dataclass, replace
from typing import Callable, Optional

import mlx.core as mx


@dataclass(frozen=True)
class Side:
    """One side of a batch of pairs: L [B], n [B] and the reference's L [B] (or None)."""
    logp: mx.array
    n: mx.array
    ref: Optional[mx.array] = None


@dataclass(frozen=True)
class Objective:
    loss: Callable          # (chosen: Side, rejected: Side, beta) -> mean over pairs
    reward: Callable        # (side: Side, beta) -> [B] implicit reward, for reports
    reference: bool         # needs the reference model's log-probabilities


def _log_sigmoid(x):
    return -mx.logaddexp(0.0, -x)


def dpo_loss(c: Side, r: Side, beta: float):
    z = beta * ((c.logp - c.ref) - (r.logp - r.ref))
    return -mx.mean(_log_sigmoid(z))


def dpo_reward(s: Side, beta: float):
    return beta * (s.logp - s.ref)


def _log_odds(s: Side):
    lbar = s.logp / s.n
    return lbar - mx.log(-mx.expm1(lbar))      # log(p̄ / (1 − p̄)), p̄ = e^l̄


def orpo_loss(c: Side, r: Side, beta: float):
    nll = -mx.mean(c.logp / c.n)
    return nll - beta * mx.mean(_log_sigmoid(_log_odds(c) - _log_odds(r)))


def orpo_reward(s: Side, beta: float):
    return beta * s.logp / s.n


OBJECTIVES = {
    "dpo": Objective(dpo_loss, dpo_reward, reference=True),
    "orpo": Objective(orpo_loss, orpo_reward, reference=False),
}


def objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown preference objective {name!r}; supported: "
                         f"{', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def coefficients(obj: Objective, c: Side, r: Side, beta: float):
    """(loss, ∂loss/∂L_c [B], ∂loss/∂L_r [B]), fp32."""
    def f(lc, lr):
        return obj.loss(replace(c, logp=lc), replace(r, logp=lr), beta)

    loss, (gc, gr) = mx.value_and_grad(f, argnums=(0, 1))(c.logp.astype(mx.float32),
                                                          r.logp.astype(mx.float32))
    mx.eval(loss, gc, gr)
    return loss, gc, gr
