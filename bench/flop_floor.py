"""Multiply-adds of one training step, autodiff against mesp's minimal schedule, counted
from a real architecture's shapes: the time ratio no kernel can beat at equal kernel
speed, since the minimal schedule keeps only each block's input.

    python -m bench.flop_floor                                  # Qwen2.5 0.5B/1.5B/3B
    python -m bench.flop_floor --models Qwen2.5-3B --seq-lens 256 1024

Per token, with P the projections of a block (d_in·d_out each) and A = 2·T·H·hd the
attention products QKᵀ and PV (the full T×T square, as both paths run it on the CPU):
  forward        ΣP + A
  backward       ΣP + 2A         frozen W0: one product per projection (dx = g W0), no dW;
                                 dP, dV, dQ, dK
  mesp recompute ΣP − down + A   q/k/v, o (for h), gate and up; down_proj's output is
                                 never needed (only its input m)
  mesp backward  + A/2           QKᵀ again for P, the minimal schedule keeps no P
  head           2·V·D           logits and dh, the same in both
autodiff = L·(forward + backward) + head; mesp = that + L·(recompute + A/2).
LoRA (r ≪ D), norms and elementwise ops are left out: they add the same to both sides
but for the recompute's exp, which makes the measured ratio higher, not lower.
"""

import argparse
import sys

from bench.common import command, git_commit
from mesp_mlx.models.configs import config_for

MODELS = ("Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-3B")


def per_token(cfg: dict, T: int) -> dict:
    """Multiply-adds per token of each part (a GQA block with a GLU MLP)."""
    D, F = cfg["hidden_size"], cfg["intermediate_size"]
    H = cfg["num_attention_heads"]
    K = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or D // H
    q, kv, o, glu, down = D * H * hd, 2 * D * K * hd, H * hd * D, 2 * D * F, F * D
    proj, attn = q + kv + o + glu + down, 2 * T * H * hd
    return {"forward": proj + attn, "backward": proj + 2 * attn,
            "recompute": proj - down + attn, "p_again": attn / 2,
            "head": 2 * cfg["vocab_size"] * D, "L": cfg["num_hidden_layers"],
            "projections": proj}


def floor(cfg: dict, T: int) -> dict:
    """{"autodiff", "mesp"} multiply-adds per token and their ratio."""
    p = per_token(cfg, T)
    ad = p["L"] * (p["forward"] + p["backward"]) + p["head"]
    me = ad + p["L"] * (p["recompute"] + p["p_again"])
    return {"autodiff": ad, "mesp": me, "ratio": me / ad,
            "recompute_share": p["recompute"] / p["forward"]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--seq-lens", nargs="*", type=int, default=[256, 1024])
    a = ap.parse_args(argv)
    print("| model | T | autodiff M MAC/token | mesp minimal M MAC/token | recompute / forward "
          "| mesp / autodiff |\n|---|---:|---:|---:|---:|---:|")
    for name in a.models:
        cfg = config_for(name)
        for T in a.seq_lens:
            f = floor(cfg, T)
            print(f"| {name} | {T} | {f['autodiff'] / 1e6:.0f} | {f['mesp'] / 1e6:.0f} | "
                  f"{f['recompute_share']:.2f} | **{f['ratio']:.3f}** |")
    commit, dirty = git_commit()
    print(f"\nBaseline: autodiff (one forward and one backward per block, nothing "
          f"recomputed). Counted from the shapes in mesp_mlx.models.configs at commit "
          f"{commit}{' with uncommitted changes' if dirty else ''}; no device involved. "
          f"Command: `{command(__spec__.name, argv or [])}`.")


if __name__ == "__main__":
    sys.exit(main())
