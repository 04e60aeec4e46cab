"""Qwen3.5 (gated DeltaNet + gated attention) on the exact per-block engines.

mesp (hand backward, engine/deltanet.py) and mebp (mx.vjp of the mlx-lm block) against
autodiff of the mlx-lm model in training mode (its per-token recurrence), with the
recurrence cut into several chunks and pieces (EngineOptions.delta_chunk/delta_piece)
so every boundary (chunk, piece, conv history, token chunk, packed example) is crossed.
fp32, per tensor: max |got − ref| ≤ 1e-5 · max|g| (the model's largest gradient) and
cosine ≥ 0.99999. bf16: cosine ≥ 0.999 per tensor against autodiff's bf16 gradient.
The tiny models draw LoRA B ~ N(0, 0.01²) (tests/helpers.py): at the 0.05 of the other
families' tests the adapters, at scale 20, are as large as the base weights, and this
four-block stack then moves its own autodiff gradient by 1e-5 to 5e-5 of max|g| for a
one-ulp change of its input; at 0.01 by about 1.5e-6 (test_conditioning measures it), so
the bound above tests the engine, not the BLAS's summation order. The tiny config's
norm eps (models/configs.py) keeps the gated RMSNorm of a small recurrence output from
amplifying rounding further.
"""

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_map

import mesp_mlx
from mesp_mlx.engine.deltanet import pieces, state_bytes
from mesp_mlx.engine.families import language_model
from mesp_mlx.engine.lora_layers import lora_layers
from mesp_mlx.engine.plan import EngineOptions
from mesp_mlx.errors import SpecMismatchError, UnsupportedModelError
from mesp_mlx.models.configs import TINY, build_model
from helpers import B_STD, batch, make, set_lora_b, step_peak

T = 37                                    # > 4 chunks of 8, > the conv kernel
SMALL = EngineOptions(delta_chunk=8, delta_piece=16)       # 3 pieces: 16 + 16 + 5
CHUNKED = EngineOptions(delta_chunk=4, delta_piece=8,      # 5 pieces, 3 token chunks
                        token_chunk_bytes=4 * 2 * 128 * 13)


def noise_floor(model, x, y, mask, g_ref) -> float:
    """max |Δg| of autodiff when the embedding moves by ~one ulp (1e-7, relative)."""
    emb = language_model(model).model.embed_tokens
    name = "scales" if "scales" in emb else "weight"            # 4-bit: its scales
    w = emb[name]
    setattr(emb, name, w * (1 + 1e-7 * mx.random.normal(w.shape, key=mx.random.key(99))))
    try:
        _, g = mesp_mlx.value_and_grad(model, x, y, mask, method="autodiff")
    finally:
        setattr(emb, name, w)
    r = dict(tree_flatten(g_ref))
    return max(mx.abs(v - r[k]).max().item() for k, v in tree_flatten(g))


def cosine(a, b) -> float:
    a, b = a.astype(mx.float32).reshape(-1), b.astype(mx.float32).reshape(-1)
    return (mx.sum(a * b) / (mx.linalg.norm(a) * mx.linalg.norm(b))).item()


def compare(got, ref):
    """fp32: max err ≤ 1e-5 · max|g| and cosine ≥ 0.99999, per tensor."""
    g, r = dict(tree_flatten(got)), dict(tree_flatten(ref))
    assert g.keys() == r.keys() and r
    G = max(mx.abs(v.astype(mx.float32)).max().item() for v in r.values())
    assert G > 0, "every reference gradient is 0: the test could not fail"
    for k in r:
        assert g[k].shape == r[k].shape and g[k].dtype == r[k].dtype, k
        a, b = g[k].astype(mx.float32), r[k].astype(mx.float32)
        err, cos = mx.abs(a - b).max().item(), cosine(a, b)
        msg = (f"{k}: max err {err:.3g} (mean {mx.abs(a - b).mean().item():.3g}), "
               f"tensor max {mx.abs(b).max().item():.3g}, model max {G:.3g}, cos {cos:.7f}")
        assert err <= 1e-5 * G and cos >= 0.99999, msg


def test_conditioning():
    """The tiny model is well-conditioned: autodiff's own gradient moves by ≤ 4e-6 of
    max|g| for a one-ulp input change (measured 1.5e-6 over 4 seeds), under the 1e-5
    bound; and compare catches a gradient off by 2e-4 on one tensor."""
    model = make({}, family="qwen3_5")
    x, y, mask = batch(T)
    _, g_ref = mesp_mlx.value_and_grad(model, x, y, mask, method="autodiff")
    ref = dict(tree_flatten(g_ref))
    G = max(mx.abs(v).max().item() for v in ref.values())
    assert noise_floor(model, x, y, mask, g_ref) <= 4e-6 * G
    k = max(ref, key=lambda n: mx.abs(ref[n]).max().item())
    with pytest.raises(AssertionError, match="max err"):
        compare(ref | {k: ref[k] * (1 + 2e-4)}, ref)


def _exact(model, x, y, mask, opts=(SMALL,), methods=("mebp", "mesp")):
    loss_ref, g_ref = mesp_mlx.value_and_grad(model, x, y, mask, method="autodiff")
    for method in methods:
        for opt in (opts if method == "mesp" else (None,)):
            loss, g = mesp_mlx.value_and_grad(model, x, y, mask, method=method, options=opt)
            assert abs(loss.item() - loss_ref.item()) <= 1e-6 * abs(loss_ref.item()), method
            compare(g, g_ref)


@pytest.mark.parametrize("tied", [True, False])
def test_fp32_exact(tied):
    model = make(dict(tie_word_embeddings=tied), family="qwen3_5")
    _exact(model, *batch(T), opts=(SMALL, CHUNKED, EngineOptions(),
                                   replace(SMALL, delta_states="chunks"),
                                   replace(SMALL, checkpoints="disk")))


def test_bf16():
    """bf16 weights and LoRA: per tensor, cosine ≥ 0.999 with autodiff's bf16 gradient.
    Two blocks, a DeltaNet and a gated attention one: bf16 rounding compounds with
    depth in a random model (measured minimum over 6 seeds: 0.9990 at two blocks,
    0.998 at four)."""
    model = make(dict(num_hidden_layers=2), family="qwen3_5", dtype=mx.bfloat16)
    x, y, mask = batch(T)
    ref = dict(tree_flatten(mesp_mlx.value_and_grad(model, x, y, mask,
                                                    method="autodiff")[1]))
    for method, opt in (("mesp", SMALL), ("mebp", None)):
        got = dict(tree_flatten(mesp_mlx.value_and_grad(model, x, y, mask, method=method,
                                                        options=opt)[1]))
        assert got.keys() == ref.keys() and ref
        for k in ref:
            assert got[k].dtype == mx.bfloat16 and got[k].shape == ref[k].shape, k
            assert cosine(got[k], ref[k]) >= 0.999, (method, k, cosine(got[k], ref[k]))


def test_4bit_base_exact():
    model = make({}, family="qwen3_5", quantize=dict(group_size=32, bits=4))
    assert "scales" in model.language_model.model.layers[0].linear_attn.in_proj_qkv.linear
    _exact(model, *batch(T), opts=(SMALL,))


def test_vlm_wrapper_config_and_partial_layers():
    """The multimodal checkpoint layout (text model in text_config) and LoRA on the
    last 3 of 4 blocks only (the lowest block's recompute skips its dx)."""
    _exact(make({}, family="qwen3_5", num_layers=3), *batch(T), opts=(SMALL,))
    wrapped = build_model(dict(model_type="qwen3_5", text_config=dict(TINY["qwen3_5"])))
    mesp_mlx.apply_lora(wrapped, rank=4)
    set_lora_b(wrapped, B_STD["qwen3_5"])
    _exact(wrapped, *batch(9), opts=(SMALL,), methods=("mesp",))


def test_qwen3_next_dense_exact():
    """Qwen3-Next: q, k, v, z and b, a interleaved per key head in two fused projections."""
    cfg = dict(TINY["qwen3_5"], model_type="qwen3_next", num_experts=0,
               num_experts_per_tok=0, decoder_sparse_step=1, shared_expert_intermediate_size=0,
               mlp_only_layers=[], moe_intermediate_size=0, rope_theta=10000.0,
               partial_rotary_factor=0.25)
    cfg.pop("rope_parameters")
    model = build_model(cfg, seed=0)
    mesp_mlx.apply_lora(model, rank=4)
    set_lora_b(model, B_STD["qwen3_5"])
    assert "in_proj_qkvz" in model.model.layers[0].linear_attn
    _exact(model, *batch(T), opts=(SMALL,))


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_next"])
def test_moe_blocks_name_autodiff(family):
    cfg = dict(TINY["qwen3_5"], model_type=family, num_experts=4, num_experts_per_tok=2,
               moe_intermediate_size=32, shared_expert_intermediate_size=32,
               decoder_sparse_step=1, mlp_only_layers=[], rope_theta=10000.0,
               partial_rotary_factor=0.25)
    model = build_model(cfg, seed=0)
    mesp_mlx.apply_lora(model, rank=2, keys=["out_proj", "o_proj"])
    x, y, mask = batch(5)
    for method in ("mesp", "mebp"):
        with pytest.raises(UnsupportedModelError,
                           match=f"{family} layer 0 has a mixture-of-experts.*--method autodiff"):
            mesp_mlx.value_and_grad(model, x, y, mask, method=method)


def test_default_keys_are_every_block_linear():
    model = make({}, family="qwen3_5")
    names = {p.split(".", 4)[4] for p, _ in lora_layers(model)}
    assert names == {"linear_attn.in_proj_qkv", "linear_attn.in_proj_z",
                     "linear_attn.in_proj_b", "linear_attn.in_proj_a", "linear_attn.out_proj",
                     "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert len(lora_layers(model)) == 2 * 8 + 2 * 7
    sub = mesp_mlx.apply_lora(build_model(TINY["qwen3_5"]), keys=["q_proj", "in_proj_z"])
    assert len(lora_layers(sub)) == 4            # a key may be absent from half the blocks
    with pytest.raises(ValueError, match="unknown LoRA key 'qkv_proj'"):
        mesp_mlx.apply_lora(build_model(TINY["qwen3_5"]), keys=["qkv_proj"])


def test_packed_equals_unpacked_across_pieces():
    """Packed examples restart the recurrent state and the conv history even where an
    example starts inside a chunk, at a piece boundary (8) or a token chunk's."""
    from test_packing import examples, packed, unpacked
    model = make({}, family="qwen3_5")
    loss_ref, g_ref = mesp_mlx.value_and_grad(model, *unpacked(examples()),
                                              method="autodiff")
    x, y, m, seg = packed(examples())
    for opt in (EngineOptions(delta_chunk=2, delta_piece=4),
                EngineOptions(delta_chunk=4, delta_piece=8, token_chunk_bytes=4 * 2 * 128 * 5)):
        loss, g = mesp_mlx.value_and_grad(model, x, y, m, method="mesp", options=opt,
                                          segments=seg)
        assert abs(loss.item() - loss_ref.item()) <= 1e-6 * abs(loss_ref.item())
        compare(g, g_ref)


def test_activation_plan_keeps_delta_blocks_exactly():
    """A budget that keeps every block (and extras): the backward reads the kept
    u, z, y, b̃, ã and chunk-start states instead of recomputing them."""
    from mesp_mlx.engine.block import kept_bytes
    model = make({}, family="qwen3_5")
    x, y, mask = batch(T)
    spec = mesp_mlx.engine.walk.model_spec(model, "mesp", T)
    total = sum(kept_bytes(b, 2, T, 4, SMALL) for b in spec.blocks)
    loss_ref, g_ref = mesp_mlx.value_and_grad(model, x, y, mask, method="autodiff")
    for budget in (kept_bytes(spec.blocks[-1], 2, T, 4, SMALL) + kept_bytes(
            spec.blocks[-2], 2, T, 4, SMALL), 4 * total):
        st = {}
        opt = EngineOptions(delta_chunk=8, delta_piece=16, activation_budget=budget)
        loss, g = mesp_mlx.value_and_grad(model, x, y, mask, options=opt, stats=st)
        assert len(st["kept_blocks"]) == (2 if budget < total else 4), st
        assert abs(loss.item() - loss_ref.item()) <= 1e-6 * abs(loss_ref.item())
        compare(g, g_ref)


def test_spec_mismatch_is_caught():
    """A DeltaNet spec that disagrees with the model stops before any gradient."""
    from mesp_mlx.engine import families
    model = make({}, family="qwen3_5")
    real = families.READERS["qwen3_5"]

    def wrong(m, lm, inner):
        blocks, extra = real(m, lm, inner)
        blocks[0].delta.norm_eps = 0.5
        return blocks, extra

    families.READERS["qwen3_5"] = wrong
    try:
        with pytest.raises(SpecMismatchError, match="qwen3_5 layer 0"):
            mesp_mlx.value_and_grad(model, *batch(9), method="mesp")
    finally:
        families.READERS["qwen3_5"] = real


def test_streamed_weights_bit_identical(tmp_path):
    """A_log, dt_bias and the conv weight stream with the block (the gated norm stays
    resident like every norm): the same bits as the resident model."""
    from test_stream import Q4, assert_identical, pair, save_dir
    res, st = pair(save_dir(tmp_path / "m", TINY["qwen3_5"], Q4))
    ws = mesp_mlx.engine.stream.weight_source(st)
    keys = {e[2].rsplit(".", 2)[-2] + "." + e[2].rsplit(".", 1)[-1]
            for es in ws._blocks.values() for e in es}
    assert {"linear_attn.A_log", "linear_attn.dt_bias", "conv1d.weight"} <= keys
    x, y, m = batch(T)
    l1, g1 = mesp_mlx.value_and_grad(res, x, y, m, method="mesp", options=SMALL)
    l2, g2 = mesp_mlx.value_and_grad(st, x, y, m, method="mesp", options=SMALL)
    assert l1.item() == l2.item()
    assert_identical(g2, g1)


def test_mezo_forward_is_the_models_loss():
    from mesp_mlx.engine import mezo
    model = make({}, family="qwen3_5")
    x, y, _ = batch(T)
    want, _ = mesp_mlx.value_and_grad(model, x, y, method="autodiff")
    got = mezo.lm_loss_at(model, x, y, mx.ones(x.shape), mezo.Perturbation(model, 0),
                          options=SMALL)(0.0)
    assert abs(got - want.item()) <= 1e-5 * abs(want.item())


def test_pieces_and_state_bytes():
    d = mesp_mlx.engine.walk.model_spec(make({}, family="qwen3_5"), "mesp", 8).blocks[0].delta
    assert pieces(d, SMALL, 37) == [(0, 16), (16, 32), (32, 37)]
    assert pieces(d, EngineOptions(delta_chunk=1, delta_piece=1), 5) == [(0, 3), (3, 5)]
    one = 4 * 2 * d.Hv * d.Dv * d.Dk               # one [B, Hv, Dv, Dk] fp32 state, B 2
    # every chunk's start state: 2 + 2 + 1 (the 5-token tail runs as one chunk of 8)
    assert state_bytes(d, replace(SMALL, delta_states="chunks"), 2, 37) == 5 * one
    # the state before pieces 2 and 3, and the last piece's one chunk start
    assert state_bytes(d, SMALL, 2, 37) == 3 * one
    assert state_bytes(d, SMALL, 2, 16) == 2 * one          # one piece: its 2 chunks


def test_strong_decays_keep_fp32_precision():
    """Γ over a chunk of strongly decaying gates (log g ≈ −20 a token) as precise as
    the token loop: L_i − L_j is its own sum, not a difference of ~1e3-sized cumsums."""
    from mesp_mlx.ops.gated_delta import gated_delta_forward, gated_delta_ref
    from mesp_mlx.ops.l2norm import normalize_qk
    k = mx.random.split(mx.random.key(4), 5)
    q, kk = normalize_qk(mx.random.normal((1, 64, 1, 8), key=k[0]),
                         mx.random.normal((1, 64, 1, 8), key=k[1]), inv_scale=8 ** -0.5,
                         eps=1e-6)
    v = mx.random.normal((1, 64, 1, 8), key=k[2])
    g = mx.exp(-mx.random.uniform(1.0, 25.0, (1, 64, 1), key=k[3]))
    beta = mx.random.uniform(shape=(1, 64, 1), key=k[4])
    y, _, _ = gated_delta_forward(q, kk, v, g, beta, chunk=64)
    y_ref, _ = gated_delta_ref(q, kk, v, g, beta)
    err = mx.abs(y - y_ref).max().item() / mx.abs(y_ref).max().item()
    assert err < 2e-6, err


def test_memory_relations():
    """mesp < mebp < autodiff (whose per-token recurrence keeps T states per layer)."""
    cfg = dict(hidden_size=128, intermediate_size=256, vocab_size=1024)
    model = make(cfg, family="qwen3_5")
    x, y, _ = batch(256, B=1, V=1024)
    for method in ("mesp", "mebp"):
        step_peak(model, x[:, :8], y[:, :8], method)          # the one-time spec check
    peaks = {m: step_peak(model, x, y, m) for m in ("autodiff", "mebp", "mesp")}
    assert peaks["mesp"] < peaks["mebp"] < peaks["autodiff"], peaks


def test_cli_adapters_generate_like_the_trained_model(family_model_dir, text_data, tmp_path):
    """`python -m mesp_mlx.lora --train` (mebp, 2 iterations) on a Qwen3.5 directory;
    mlx_lm.load(..., adapter_path) generates what the trained model generates."""
    import mlx_lm
    from test_cli import base, cli

    from mesp_mlx import load_model
    from mesp_mlx.train import adapters
    model_dir = family_model_dir("qwen3_5")
    ad = tmp_path / "ad"
    rc, out, err = cli(*base(model_dir, text_data, ad, "--train", "--iters", 2,
                             "--method", "mebp", "--max-seq-length", 16))
    assert rc == 0, err + out
    ref, tok = mlx_lm.load(str(model_dir), adapter_path=str(ad))
    ours, _, _ = load_model(str(model_dir), log=lambda *_: None)
    adapters.load_adapter_dir(ours, ad)
    ours.eval()
    prompt = "the cat sat on"
    gen = [mlx_lm.generate(m, tok, prompt, max_tokens=6) for m in (ref, ours)]
    assert gen[0] == gen[1] and gen[0]
    ids = mx.array([tok.encode(prompt)])
    a, b = ours(ids), ref(ids)
    assert mx.abs(a - b).max().item() <= 1e-4 * mx.abs(b).max().item()
    trained = [v for k, v in tree_flatten(ours.trainable_parameters()) if "lora_b" in k]
    assert max(mx.abs(v).max().item() for v in trained) > 0
    assert isinstance(ours.language_model.model.layers[0].linear_attn.in_proj_qkv,
                      nn.Module)


@pytest.mark.parametrize("method", ["autodiff", "mebp", "mesp", "mezo"])
def test_memory_estimate_vs_measured(method):
    """memory/estimate.py models the DeltaNet layers (test_memory's tolerance, 20%):
    autodiff's per-token states, mesp's all-T u/z/y, kept states and one piece."""
    import gc
    from mesp_mlx.memory.estimate import arch_from_model, estimate
    cfg = dict(TINY["qwen3_5"], hidden_size=128, intermediate_size=512, vocab_size=4096,
               linear_key_head_dim=32, linear_value_head_dim=32, head_dim=32)
    model = mesp_mlx.apply_lora(build_model(cfg), rank=8)

    def peak(T):
        x = mx.random.randint(0, 4096, (1, T))
        mx.eval(x)
        gc.collect()
        mx.clear_cache()
        others = mx.get_active_memory() - sum(v.nbytes for _, v in
                                              tree_flatten(model.parameters()))
        mx.reset_peak_memory()
        mx.eval(*mesp_mlx.value_and_grad(model, x, x, method=method))
        return mx.get_peak_memory() - others
    if method != "autodiff":
        peak(8)                                   # the one-time spec check
    est = estimate(arch_from_model(model), method, 256, 1, "sgd")
    ratio = est.mlx_bytes / peak(256)
    assert abs(ratio - 1) <= 0.2, f"{method}: estimate / measured = {ratio:.2f}"


@pytest.mark.parametrize("short,repo", [
    ("Qwen3.5-0.8B", "Qwen/Qwen3.5-0.8B"), ("qwen3.5-4b", "Qwen/Qwen3.5-4B"),
    ("Qwen3.5-0.8B-4bit", "mlx-community/Qwen3.5-0.8B-MLX-4bit"),
    ("Qwen3.5-2B-MLX-8bit", "mlx-community/Qwen3.5-2B-MLX-8bit")])
def test_short_names_and_bundled_configs(short, repo):
    from mesp_mlx.models.configs import config_for
    from mesp_mlx.models.loading import resolve_model_name, short_names
    assert resolve_model_name(short) == repo
    assert "Qwen3.5-2B-4bit" in short_names()
    cfg = config_for(short)
    assert cfg["model_type"] == "qwen3_5" and cfg["vocab_size"] == 248320
