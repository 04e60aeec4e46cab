"""bench/stream_bench.py: a streamed 4-bit point on a tiny saved model (in process),
and the table and goal lines its RESULTS.md section is built from."""

from bench import point, stream_bench
from helpers import save_dir
from mesp_mlx.models.configs import tiny_config


def test_streamed_point_records_the_accounting(tmp_path):
    d = save_dir(tmp_path / "m", tiny_config("qwen2", vocab_size=512),
                 {"group_size": 64, "bits": 4})
    rows = []
    for label in ("mesp", "mesp@stream"):
        spec = dict(model="Qwen2.5-0.5B", config=tiny_config("qwen2"), T=16, r=4,
                    method=label, scale=20.0, steps=1, seed=0, dtype="bfloat16",
                    quantize=4, lora_dtype="bfloat16", model_dir=str(d))
        row = point.run(spec)
        assert row["status"] == "ok", row.get("error")
        rows.append(dict(spec, **row, label=label))
    res, st = rows
    assert st["quantized_path"] in ("dequant_tiles", "quantized_matmul")
    assert st["streamed_bytes"] > st["block_bytes"] > 0
    assert st["weights_bytes"] < res["weights_bytes"]       # the weights left memory
    assert st["loss"] == res["loss"]
    for r in rows:
        assert r["peak_bytes"] >= r["peak_above_bytes"] and r["idle_rss_bytes"]
    for r in rows:
        r["T"] = 256                        # the goals are stated at T 256
    text = "\n".join(stream_bench.table(rows))
    assert "mesp@stream" in text and "MLX peak total MB" in text and "idle MLX" in text
    assert "### Goals" in text and ("missed" in text or "met" in text)
    section = stream_bench.section(rows)
    assert "Baseline: mesp with the 4-bit weights resident" in section
    assert "**Environment.**" in section and "python -m bench.stream_bench" in section
