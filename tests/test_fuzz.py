"""Property-based fuzzing of the data loader and the config
resolution. Random bytes, random JSON shapes and random YAML types end in a
clean UserError (or success), never another exception (a traceback), and the
CLI never writes outside the adapter path."""

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import pytest

hyp = pytest.importorskip("hypothesis")
import yaml                                                      # noqa: E402
from hypothesis import HealthCheck, given, settings              # noqa: E402
from hypothesis import strategies as st                          # noqa: E402

from mesp_mlx.train import data  # noqa: E402
from mesp_mlx.errors import UserError  # noqa: E402
from mesp_mlx.train.config import fields, TrainConfig, resolve
from mesp_mlx.lora import main  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-2**40, 2**40)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_scalars = (st.none() | st.booleans() | st.integers(-2**40, 2**40)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=8)
roles = st.sampled_from(["user", "assistant", "system", "robot", "", 3])
message = st.fixed_dictionaries({"role": roles, "content": json_values | st.text(max_size=20)})
records = st.one_of(
    json_values,
    st.fixed_dictionaries({"text": json_values | st.text(max_size=40)}),
    st.fixed_dictionaries({"prompt": json_values | st.text(max_size=20),
                           "completion": json_values | st.text(max_size=20)}),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=3) | json_values}))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from mlx_lm.utils import load_tokenizer
    return load_tokenizer(tiny_model_dir)


def _load(folder: Path, tokenizer, mask_prompt=False):
    try:
        raw = data.read_splits(str(folder))
        data.tokenize_splits(raw, tokenizer, 32, mask_prompt, vocab_size=150)
    except UserError:
        pass


@SETTINGS
@given(lines=st.lists(st.binary(max_size=60), min_size=1, max_size=4))
def test_random_bytes_never_crash_the_loader(tokenizer, lines):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "train.jsonl").write_bytes(b"\n".join(lines))
        _load(Path(d), tokenizer)


@SETTINGS
@given(recs=st.lists(records, min_size=1, max_size=4), mask_prompt=st.booleans())
def test_random_json_shapes_never_crash_the_loader(tokenizer, recs, mask_prompt):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        _load(Path(d), tokenizer, mask_prompt)


OPTION_KEYS = [f.name for f in fields(TrainConfig)
               if f.name not in ("model", "data", "adapter_path", "resume_adapter_file",
                                 "memory_log", "config")]
yaml_values = scalars | st.lists(scalars, max_size=3) | st.dictionaries(
    st.text(max_size=6), scalars | st.dictionaries(st.text(max_size=6), scalars, max_size=2),
    max_size=2)
options = st.dictionaries(st.sampled_from(OPTION_KEYS + ["lora_parameters", "save_every",
                                                         "bogus", "grad_checkpoint"]),
                          yaml_values, max_size=5)


@SETTINGS
@given(opts=options)
def test_random_yaml_types_resolve_or_fail_cleanly(opts):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(yaml.safe_dump({"model": "m", "data": "d", "train": True, **opts}))
        try:
            cfg = resolve({}, str(path)).validate()
        except UserError:
            return
        for f in fields(TrainConfig):          # a resolved config has its declared types
            v = getattr(cfg, f.name)
            if f.type in (int, float, bool) and v is not None:
                assert type(v) is f.type, (f.name, v)


@SETTINGS
@given(opts=options, garbage=st.binary(max_size=40))
def test_cli_never_crashes_or_writes_outside_the_adapter_path(text_data, opts, garbage):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "c.yaml").write_text(yaml.safe_dump({
            "model": "nobody/no-such-model", "data": str(text_data), "train": True,
            "adapter_path": str(root / "ad"), **opts}))
        (root / "junk.bin").write_bytes(garbage)
        before = set(root.rglob("*"))
        out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
        os.chdir(root)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(["--config", str(root / "c.yaml")])
        except SystemExit as e:
            rc = e.code
        finally:
            os.chdir(cwd)
        assert rc == 1, err.getvalue()
        new = set(root.rglob("*")) - before
        assert all(root / "ad" in p.parents or p == root / "ad" for p in new), new
