"""Analytic pre-flight estimate of one training step's MLX peak (any supported family).

Letters: L blocks (with LoRA), B batch, T tokens, D model, F MLP width,
H heads, K kv heads, d head dim, V vocab, s activation itemsize, r rank; hybrid
models (Qwen3.5) also: L_Δ gated DeltaNet layers of Hk/Hv key/value heads of Dk/Dv,
C = 2·Hk·Dk + Hv·Dv conv channels, S = Hv·Dv·Dk·4 bytes of one recurrent state.
Layers that differ (gemma4's double-wide MLPs and 512-wide global heads) count with the
widest F and d; LFM2's short-conv layers keep 5 D a token where attention keeps q, k,
v, o; cross-block inputs (gemma4's per-layer inputs, the K, V shared between blocks)
are held for the whole step: `link` bytes a token.
The peak includes the resident weights; coefficients were calibrated against
`mx.get_peak_memory()` of `mesp_mlx.value_and_grad` on small configs
(tests/test_memory.py states the tolerance per method).
"""

from dataclasses import dataclass, fields
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from ..engine.block import block_width, spans
from ..engine.block_parts import _frozen
from ..engine.families import READERS, family_of, language_model
from ..engine.plan import EngineOptions, head_tiles
from .footprint import runtime_bytes
from ..errors import MemoryBudgetError

MB = 1e6
OPT_STATE = {"sgd": 0, "adam": 2, "adamw": 2}   # fp32 state tensors per LoRA parameter (others: 2)


@dataclass
class Arch:
    """What the estimate needs to know about a model."""
    L: int
    D: int
    F: int
    H: int
    K: int
    V: int
    s: int                    # activation itemsize (4 fp32, 2 bf16)
    weight_bytes: int         # resident frozen weights (dense or quantized)
    lora_bytes: int           # LoRA parameters (fp32 A and B)
    quant_bits: Optional[int] = None
    head_dim: Optional[int] = None   # None: D / H (qwen2); qwen3, gemma, llama may differ
    n_delta: int = 0                 # gated DeltaNet layers (Qwen3.5); the rest attention
    Hk: int = 0                      # DeltaNet key heads
    Hv: int = 0                      # DeltaNet value heads
    Dk: int = 0                      # DeltaNet key head dim
    Dv: int = 0                      # DeltaNet value head dim
    q_gate: bool = False             # attention q_proj also emits an output gate
    n_conv: int = 0                  # short-conv layers (LFM2); the rest attention
    link: int = 0                    # bytes a token held for the step by links.py
    softcap: bool = False            # final logits c·tanh(z/c): two more [N, V] fp32

    @property
    def d(self) -> int:
        return self.head_dim or self.D // self.H

    @property
    def C(self) -> int:
        """DeltaNet conv channels (q, k, v)."""
        return 2 * self.Hk * self.Dk + self.Hv * self.Dv

    @property
    def S(self) -> int:
        """Bytes of one recurrent state [Hv, Dv, Dk] (fp32)."""
        return 4 * self.Hv * self.Dv * self.Dk


def _text_args(model):
    """The text model's ModelArgs (VLM wrappers such as gemma3 keep it inside)."""
    lm = model.language_model if "language_model" in model else model
    return lm.args, lm


def _lora_count(model, rank: int) -> int:
    """r (d_in + d_out) over every linear layer of every block (the default keys)."""
    from ..engine.lora_layers import block_linears
    from ..ops.frozen import FrozenWeight
    n = 0
    for blk in model.layers:
        for path in block_linears(blk):
            d_out, d_in = FrozenWeight.of(dict(blk.named_modules())[path]).shape
            n += rank * (d_in + d_out)
    return n


def _arch(model, weight_bytes, lora_bytes, s, bits) -> Arch:
    a, lm = _text_args(model)
    H = a.num_attention_heads
    K = getattr(a, "num_key_value_heads", None) or H
    hd = getattr(a, "head_dim", None) or a.hidden_size // H
    hybrid = {}
    if hasattr(a, "linear_num_value_heads"):         # Qwen3.5 / Qwen3-Next
        if getattr(a, "num_experts", 0) > 0:
            raise ValueError("the memory estimate does not model mixture-of-experts "
                             "blocks; pass no memory budget, or train with --method "
                             "autodiff")
        hybrid = dict(n_delta=sum(1 for b in lm.model.layers if b.is_linear),
                      Hk=a.linear_num_key_heads, Hv=a.linear_num_value_heads,
                      Dk=a.linear_key_head_dim, Dv=a.linear_value_head_dim, q_gate=True)
    F, (blocks, spec_extra) = a.intermediate_size, _blocks(model)
    if blocks is not None:               # the engine's own reading: widths, kinds, links
        attn = [b for b in blocks if b.mixer == "attention"]
        F = max(block_width(b) for b in blocks)
        hd = max((b.hd for b in attn), default=hd)
        K = max((b.K for b in attn), default=K)
        sources = {b.kv_from for b in blocks if b.kv_from is not None}
        link = sum(_frozen(b.tail.gate).shape[0] for b in blocks
                   if b.tail is not None and b.tail.gate is not None)
        link += sum(2 * blocks[i].K * blocks[i].hd for i in sources)
        hybrid.update(n_conv=sum(b.conv is not None for b in blocks), link=link * s,
                      softcap=spec_extra.get("final_softcap") is not None)
    return Arch(a.num_hidden_layers, a.hidden_size, F, H, K,
                a.vocab_size, s, weight_bytes, lora_bytes, bits, hd, **hybrid)


def _blocks(model):
    """(BlockSpecs, ModelSpec extras) of the family reader ((None, {}) where the
    engine does not run the family)."""
    lm = language_model(model)
    try:
        return READERS[family_of(model)](model, lm, lm.model)
    except (KeyError, AttributeError, ValueError):
        return None, {}


def arch_from_config(cfg: dict, dtype=mx.float32, quant_bits: Optional[int] = None,
                     rank: int = 8) -> Arch:
    """Arch of a config, built lazily (shapes only, nothing allocated)."""
    from ..models.configs import build_model
    s = mx.zeros((), dtype).itemsize
    q = {"group_size": 64, "bits": quant_bits} if quant_bits else None
    model = build_model(cfg, dtype=dtype, quantize=q, lazy=True)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return _arch(model, weights, 4 * _lora_count(model, rank), s, quant_bits)


def arch_from_model(model, rank: int = 8) -> Arch:
    """Arch of a built mlx-lm model; LoRA from its trainable parameters if applied."""
    from ..engine.families import OUT_OF_REACH, family_of
    fam = family_of(model)
    if fam in OUT_OF_REACH:
        raise ValueError(f"the memory estimate does not model {fam!r} ({OUT_OF_REACH[fam]}); "
                         "pass no memory budget, or train with --method autodiff")
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    lora = sum(v.nbytes for k, v in tree_flatten(model.parameters())
               if k.endswith((".lora_a", ".lora_b")))
    if lora == 0:   # estimate before apply_lora: every linear of every block
        lora = 4 * _lora_count(model, rank)
    _, lm = _text_args(model)
    embed = lm.model.embed_tokens
    bits = getattr(embed, "bits", None) if "scales" in embed else None
    from ..engine.stream import is_streamed, resident_weight_bytes, weight_source
    weights = total - lora
    if is_streamed(model):       # resident part + the largest block + one head tile
        ws = weight_source(model)
        weights = resident_weight_bytes(model) + ws.block_bytes() + ws.head_tile_bytes()
    norm = lm.model.norm if "norm" in lm.model else lm.model.embedding_norm   # lfm2
    return _arch(model, weights, lora, norm.weight.itemsize, bits)


@dataclass
class Estimate:
    """Bytes per component of one step's MLX peak, plus the measured runtime
    (this process's footprint outside MLX buffers: interpreter, libraries)."""
    method: str
    seq_len: int
    batch_size: int
    weights: int
    lora_params: int
    lora_grads: int
    optimizer_state: int
    checkpoints: int          # mebp/mesp: stored block inputs
    activations: int          # the method's working set at its peak (see _working_set)
    runtime: int = 0          # measured, not estimated (footprint.runtime_bytes)

    @property
    def mlx_bytes(self) -> int:
        """What `mx.get_peak_memory()` should read (everything but the runtime)."""
        return self.total_bytes - self.runtime

    @property
    def total_bytes(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self)
                   if f.name not in ("method", "seq_len", "batch_size"))

    def __str__(self):
        rows = [f"| component ({self.method}, T={self.seq_len}, B={self.batch_size}) | MB |",
                "|---|---:|"]
        for f in fields(self)[3:-1]:
            rows.append(f"| {f.name.replace('_', ' ')} | {getattr(self, f.name) / MB:.1f} |")
        rows += [f"| MLX peak (estimate) | {self.mlx_bytes / MB:.1f} |",
                 f"| runtime (measured: process outside MLX buffers) | {self.runtime / MB:.1f} |",
                 f"| **total** | **{self.total_bytes / MB:.1f}** |"]
        return "\n".join(rows)


def _layer_graph(a: Arch, N: int, T: int) -> int:
    # autodiff keeps per token ~8D + 2Kd + 6F (block input, norms, q/k/v, attention
    # output, residual, gate/up/silu/product) plus the H×T attention probs
    gate = 2 * a.H * a.d if a.q_gate else 0          # the output gate and its sigmoid
    return N * ((8 * a.D + 2 * a.K * a.d + gate + 6 * a.F) * a.s + a.H * T * 4)


STATES_PER_TOKEN = 3.2   # autodiff's token loop keeps ~this many [Hv, Dv, Dk] states a token
MEBP_STATES_PER_TOKEN = 2.2   # ... and one block under mx.vjp (mebp), before its ~2× transients


def _delta_graph(a: Arch, N: int, states: float = STATES_PER_TOKEN) -> int:
    """A DeltaNet layer under autodiff (mlx-lm's training path: a loop over T whose
    graph keeps `states` states a token, measured) plus the block's position-wise tensors."""
    per_token = (8 * a.D + 3 * a.C + 4 * a.Hv * a.Dv + 6 * a.F) * a.s
    return N * (per_token + int(states * a.S))


def _conv_graph(a: Arch, N: int) -> int:
    # a short-conv layer: ~8D + 5D (β, γ, ξ, β ⊙ ξ, the conv) + 6F a token, no probs
    return N * (13 * a.D + 6 * a.F) * a.s


def _layers_graph(a: Arch, N: int, T: int) -> int:
    return ((a.L - a.n_delta - a.n_conv) * _layer_graph(a, N, T)
            + a.n_delta * _delta_graph(a, N) + a.n_conv * _conv_graph(a, N))


def _full_head(a: Arch, N: int) -> int:
    # logits [N, V] in model dtype, their fp32 copy, softmax and dlogits (fp32); a
    # final softcap adds tanh's output and its gradient
    return N * a.V * (a.s + (5 if a.softcap else 3) * 4)


def _mesp_block(a: Arch, N: int, B: int, T: int, opt) -> int:
    """One block's recompute + backward (block.py): kept for all T are q, k, v and
    o (then do), plus dq, dk, dv in the attention backward; the rest lives for one
    token chunk (MLP: gate, up, σ(gate), the product and their gradients, ~5F + 6D
    per row alive at once, measured with swiglu's fused kernels; the LoRA products
    evaluated one projection at a time) or one attention query block
    (of scores, probs, dP, dS about 2.25 × attn_chunk_bytes alive at once, measured;
    held to 10% by tests/test_memory.py and bench/probes/estimate_check.py)."""
    qkvo = N * a.s * (2 * a.H * a.d + 2 * a.K * a.d)
    qkvo += N * a.s * a.H * a.d if a.q_gate else 0                  # the gate, then dz
    dqkv = N * a.s * (a.H * a.d + 2 * a.K * a.d) + N * a.H * 4      # + δ (fp32)
    attn = 9 * min(opt.attn_chunk_bytes, B * a.H * T * T * 4) // 4
    mlp = _mlp_chunk(a, B, T, opt)
    conv = N * a.s * 5 * a.D if a.n_conv else 0        # β, γ, ξ, p → dp, du (short_conv)
    return max(qkvo + max(mlp, dqkv + attn), conv + mlp)


def _mlp_chunk(a: Arch, B: int, T: int, opt) -> int:
    rows = B * max(t1 - t0 for t0, t1 in spans(T, max(1, opt.token_chunk_bytes
                                                       // (4 * B * a.F))))
    return rows * (5 * a.F + 6 * a.D) * 4


def _delta_pieces(a: Arch, T: int, opt):
    """(tokens of the widest piece, states the recompute keeps): deltanet.pieces and
    deltanet.state_count without a model."""
    c = opt.delta_chunk
    P = c * max(1, -(-opt.delta_piece // c))
    n, last = -(-T // P), T - P * (-(-T // P) - 1)
    chunks = lambda t: -(-t // min(c, 1 << max(t - 1, 0).bit_length()))  # noqa: E731
    if n == 1 or opt.delta_states == "chunks":
        states = (n - 1) * chunks(P) + chunks(last)
    else:
        states = n - 1 + chunks(last)
    return min(P, T), states


def _piece_bytes(a: Arch, P: int, opt) -> int:
    """A piece's recurrence + conv temporaries a token (measured on Qwen3.5-0.8B: the
    conv's p, σ(p) and gradients ~6C; the recurrence's [C_chunk, D] terms ~20 Hv·Dv,
    its C×C terms ~10 Hv·c, its per-chunk state terms ~3 S / c)."""
    c = min(opt.delta_chunk, 1 << max(P - 1, 0).bit_length())
    return P * ((6 * a.C + 20 * a.Hv * a.Dv + 10 * a.Hv * c) * 4 + 3 * a.S // c)


def _mesp_delta_block(a: Arch, N: int, B: int, T: int, opt) -> int:
    """A DeltaNet block's recompute + backward (deltanet.py): u, z, y (then du, dz, dy)
    and b̃, ã for all T, the kept states, and one piece's temporaries or one MLP chunk."""
    P, n_states = _delta_pieces(a, T, opt)
    all_T = N * a.s * (a.C + 2 * a.Hv * a.Dv + 2 * a.Hv)
    return all_T + B * n_states * a.S + max(_mlp_chunk(a, B, T, opt),
                                            B * _piece_bytes(a, P, opt))


def _working_set(a: Arch, method: str, B: int, T: int, fused_sdpa: bool,
                 checkpoints: str = "memory") -> tuple:
    """(checkpoints, activations) bytes for one step of `method`; checkpoints on
    "disk" leave one block input (and its read buffer) in memory."""
    N = B * T
    opt = EngineOptions()        # the engine's defaults: the tiles a step really uses
    attn_chunk = opt.attn_chunk_bytes
    if method == "autodiff":     # every block's graph + the full-logits head
        return 0, _layers_graph(a, N, T) + _full_head(a, N) + N * a.link
    x = N * a.D * a.s
    ckpt = a.L * x if checkpoints == "memory" else 2 * x   # block inputs kept by the forward
    dh = N * a.D * 4 + N * a.link    # gradient down the residual stream, links.py's inputs
    if method == "mebp":         # one block's graph + its vjp's transients (~2×) vs the full head
        graph = max(_layer_graph(a, N, T) if a.n_delta + a.n_conv < a.L else 0,
                    _delta_graph(a, N, MEBP_STATES_PER_TOKEN) if a.n_delta else 0,
                    _conv_graph(a, N) if a.n_conv else 0)
        return ckpt, dh + max(2 * graph, _full_head(a, N))
    if method == "mesp":         # hand backward of one block vs a [rows, vocab] head tile
        rows, vocab = head_tiles(opt, N, a.V)
        head = 9 * rows * vocab + N * a.D * 4 + 3 * rows * a.D * 4   # + h, a tile's hn, dhn
        block = _mesp_block(a, N, B, T, opt) if a.n_delta < a.L else 0     # incl. conv
        if a.n_delta:
            block = max(block, _mesp_delta_block(a, N, B, T, opt))
        return ckpt, dh + max(block, head)
    if method == "mezo":         # forward only: h0 + h, then one block's transients
        rows, vocab = head_tiles(opt, N, a.V)         # vs a loss-only head tile:
        head = 9 * rows * vocab + 2 * N * a.D * 4        # fp32 z, exp(z − μ) (~2.25×) + hn
        attn = 0 if fused_sdpa else 2 * min(attn_chunk, B * a.H * T * T * 4)
        block = N * (4 * a.D + 3 * a.F) * a.s + attn
        if a.n_delta:            # u, z, y for all T and a piece's forward temporaries
            P, _ = _delta_pieces(a, T, opt)
            block = max(block, N * a.s * (a.C + 2 * a.Hv * a.Dv)
                        + B * _piece_bytes(a, P, opt) // 3)
        return 0, 2 * N * a.D * a.s + N * a.link + max(block, head)
    raise ValueError(f"no memory estimate for method {method!r}; "
                     "supported: autodiff, mebp, mesp, mezo")


def estimate(arch: Arch, method: str, seq_len: int, batch_size: int = 1,
             optimizer: str = "adam", fused_sdpa: Optional[bool] = None,
             runtime: Optional[int] = None, checkpoints: str = "memory") -> Estimate:
    """Estimate one step's peak for `arch`; fused_sdpa: Metal's fused attention
    (no T×T scores in the forward), default: whether Metal is available;
    runtime: bytes outside MLX (default: measured once, footprint.runtime_bytes);
    checkpoints: "memory" or "disk" (EngineOptions.checkpoints)."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    if fused_sdpa is None:
        fused_sdpa = mx.metal.is_available()
    ckpt, act = _working_set(arch, method, batch_size, seq_len, fused_sdpa, checkpoints)
    grads = 0 if method == "mezo" else arch.lora_bytes   # MeZO: no gradients, no state
    states = 0 if method == "mezo" else OPT_STATE.get(optimizer.lower(), 2)  # unknown: 2
    return Estimate(method, seq_len, batch_size, arch.weight_bytes, arch.lora_bytes,
                    grads, states * arch.lora_bytes, ckpt, act,
                    runtime_bytes() if runtime is None else runtime)


@dataclass(frozen=True)
class Advice:
    """One way to fit: the memory CLI's flags that re-run it, and its text."""
    flags: tuple              # e.g. ("--max-seq-length", "496")
    text: str


SPARE = 0.01     # advice must fit with 1% of the budget to spare (the runtime is measured)


def _fits(arch, method, T, B, optimizer, budget, fused_sdpa, spare=SPARE,
          checkpoints="memory"):
    return estimate(arch, method, T, B, optimizer, fused_sdpa,
                    checkpoints=checkpoints).total_bytes <= budget * (1 - spare)


def _max_T(arch, method, T, B, optimizer, budget, fused_sdpa, checkpoints="memory") -> int:
    """Largest multiple of 16 below T that fits (0 if none)."""
    lo, hi = 0, (T - 1) // 16 * 16 + 16
    while hi - lo > 16:
        mid = (lo + hi) // 32 * 16
        lo, hi = (mid, hi) if _fits(arch, method, mid, B, optimizer, budget, fused_sdpa,
                                    checkpoints=checkpoints) else (lo, mid)
    return lo


def _suggestions(arch, arch_4bit, method, T, B, optimizer, budget, fused_sdpa,
                 checkpoints="memory") -> list:
    out = []
    if checkpoints == "memory" and method in ("mesp", "mebp") and _fits(
            arch, method, T, B, optimizer, budget, fused_sdpa, checkpoints="disk"):
        out.append(Advice(("--offload-checkpoints",), "--offload-checkpoints (training: "
                          "--offload-checkpoints DIR, block inputs in a temporary file)"))
    t = _max_T(arch, method, T, B, optimizer, budget, fused_sdpa, checkpoints)
    if t:
        out.append(Advice(("--max-seq-length", str(t)), f"--max-seq-length {t} "
                          f"(fits with {method})"))
    if B > 1 and _fits(arch, method, T, 1, optimizer, budget, fused_sdpa,
                       checkpoints=checkpoints):
        out.append(Advice(("--batch-size", "1"), "--batch-size 1"))
    if method not in ("mesp", "mezo") and _fits(arch, "mesp", T, B, optimizer, budget,
                                                fused_sdpa, checkpoints=checkpoints):
        out.append(Advice(("--method", "mesp"), f"--method mesp instead of {method}"))
    if optimizer != "sgd" and _fits(arch, method, T, B, "sgd", budget, fused_sdpa,
                                    checkpoints=checkpoints):
        out.append(Advice(("--optimizer", "sgd"), "--optimizer sgd (no optimizer state)"))
    q4 = ("--quantize", "4") if arch_4bit is not None else ()
    if q4 and _fits(arch_4bit, method, T, B, optimizer, budget, fused_sdpa,
                    checkpoints=checkpoints):
        out.append(Advice(q4, "a 4-bit model (e.g. the -4bit repository)"))
    if not out:                  # combine: 4-bit, mesp, sgd, batch 1, shorter T
        a = arch_4bit or arch
        for t in (T, _max_T(a, "mesp", T, 1, "sgd", budget, fused_sdpa, checkpoints)):
            if t and _fits(a, "mesp", t, 1, "sgd", budget, fused_sdpa,
                           checkpoints=checkpoints):
                out.append(Advice(q4 + ("--method", "mesp", "--optimizer", "sgd",
                                        "--batch-size", "1", "--max-seq-length", str(t)),
                                  f"together: {'a 4-bit model, ' if q4 else ''}--method "
                                  f"mesp, --optimizer sgd, --batch-size 1"
                                  + (f", --max-seq-length {t}" if t < T else "")))
                break
    return out


def quantized_4bit(arch: Arch) -> Arch:
    """Same shapes with 4-bit weights (group 64, scales and biases in the model
    dtype): an approximation where no config is at hand (norms stay dense)."""
    s = arch.s
    return Arch(**{**arch.__dict__, "quant_bits": 4,
                   "weight_bytes": int(arch.weight_bytes * (0.5 + 2 * s / 64) / s)})


def preflight(model, method: str, seq_len: int, batch_size: int,
              budget_bytes: Optional[int], optimizer: str = "adam", rank: int = 8,
              fused_sdpa: Optional[bool] = None, arch_4bit: Optional[Arch] = None,
              checkpoints: str = "memory") -> Estimate:
    """Estimate one step; raise MemoryBudgetError (with what would fit) if over budget.

    model: a built mlx-lm model (LoRA applied or not), or an Arch. arch_4bit:
    the 4-bit variant to advise (default: quantized_4bit(arch) if not quantized).
    """
    arch = model if isinstance(model, Arch) else arch_from_model(model, rank)
    est = estimate(arch, method, seq_len, batch_size, optimizer, fused_sdpa,
                   checkpoints=checkpoints)
    if budget_bytes is None or est.total_bytes <= budget_bytes:
        return est
    over = est.total_bytes - budget_bytes
    if arch.quant_bits is not None:
        arch_4bit = None             # already quantized: no 4-bit advice
    elif arch_4bit is None:
        arch_4bit = quantized_4bit(arch)
    tips = _suggestions(arch, arch_4bit, method, seq_len, batch_size, optimizer,
                        budget_bytes, fused_sdpa, checkpoints)
    summary = (f"estimated peak {est.total_bytes / MB:.0f} MB for {method} at T={seq_len}, "
               f"B={batch_size} exceeds the budget of {budget_bytes / MB:.0f} MB by "
               f"{over / MB:.0f} MB.")
    msg = f"{summary}\n{est}\n"
    if est.runtime >= budget_bytes:
        msg += (f"The runtime alone (Python, MLX and the libraries, measured: "
                f"{est.runtime / MB:.0f} MB) does not fit. ")
    elif arch.weight_bytes + est.runtime > budget_bytes:
        msg += (f"The weights ({arch.weight_bytes / MB:.0f} MB) and the runtime "
                f"({est.runtime / MB:.0f} MB) do not fit together. ")
    msg += ("What would fit: " + "; ".join(a.text for a in tips) + "." if tips else
            "Nothing smaller in T, method or 4-bit fits: use a smaller model or a larger budget.")
    raise MemoryBudgetError(msg, est, tips, summary)
