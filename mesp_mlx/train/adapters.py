"""Adapter files in mlx-lm's exact format, plus the state needed to resume.

    <dir>/adapters.safetensors          lora_a (d_in, r), lora_b (r, d_out) per layer
    <dir>/adapter_config.json           fine_tune_type, num_layers, lora_parameters
                                        {rank, scale, dropout, keys} + our run config
    <dir>/0000100_adapters.safetensors  snapshot at iteration 100
    <dir>/[0000100_]state.safetensors   optimizer state + gradient accumulator
    <dir>/[0000100_]state.json          iteration, seed
Every file is written to a temporary name and renamed, so an interrupted save
leaves the previous good file in place.
"""

import json
import os
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

import re

from ..engine.lora_layers import apply_lora, lora_layers
from ..errors import AdapterError

ADAPTERS = "adapters.safetensors"
CONFIG = "adapter_config.json"


def adapter_weights(model: nn.Module) -> dict:
    """{"model.layers.i....lora_a": array, ...} of every LoRA layer."""
    return {k: v for k, v in tree_flatten(model.parameters())
            if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}


def lora_config(model: nn.Module) -> dict:
    """mlx-lm's adapter_config.json keys, read off the LoRA layers present."""
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA layers (call apply_lora first)")
    _, first = layers[0]
    where = [_BLOCK.search(p) for p, _ in layers]        # "<...>layers.<i>.<key>"
    if not all(where):
        raise AdapterError(f"LoRA layer {layers[0][0]} is not inside a model block")
    keys = list(dict.fromkeys(m.group(2) for m in reversed(where)))  # q, k, ..., down
    return {"fine_tune_type": "lora", "num_layers": len({m.group(1) for m in where}),
            "lora_parameters": {"rank": first.rank, "scale": first.scale,
                                "dropout": first.dropout, "keys": keys}}


_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def _atomic(path: Path, write):
    """write(tmp) then rename onto path (same directory, so the rename is atomic)."""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_config(model: nn.Module, adapter_dir, run_config: Optional[dict] = None) -> Path:
    """adapter_config.json: the run's resolved options + mlx-lm's LoRA keys."""
    d = Path(adapter_dir)
    d.mkdir(parents=True, exist_ok=True)
    config = {**(run_config or {}), **lora_config(model)}
    _atomic(d / CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return d / CONFIG


def save_adapters(model: nn.Module, adapter_dir, run_config: Optional[dict] = None,
                  step: Optional[int] = None, snapshot: bool = False) -> Path:
    """Write adapters.safetensors + adapter_config.json (and the numbered
    snapshot `{step:07d}_adapters.safetensors` if `snapshot`); the iteration
    goes into the safetensors metadata. Returns the adapters file."""
    d = save_config(model, adapter_dir, run_config).parent
    weights = adapter_weights(model)
    meta = {} if step is None else {"step": str(step)}
    _atomic(d / ADAPTERS, lambda p: mx.save_safetensors(p, weights, metadata=meta))
    if snapshot and step is not None:
        _atomic(d / f"{step:07d}_{ADAPTERS}",
                lambda p: mx.save_safetensors(p, weights, metadata=meta))
    return d / ADAPTERS


def write_weights(model: nn.Module, path, metadata: Optional[dict] = None,
                  weights: Optional[dict] = None) -> Path:
    """The LoRA weights alone (or `weights`) to `path`, atomically (e.g.
    adapters_best.safetensors)."""
    p = Path(path)
    weights = adapter_weights(model) if weights is None else weights
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    _atomic(p, lambda t: mx.save_safetensors(t, weights, metadata=meta))
    return p


def _state_paths(adapter_file: Path):
    prefix = adapter_file.name[: -len(ADAPTERS)]          # "" or "0000100_"
    return (adapter_file.with_name(f"{prefix}state.safetensors"),
            adapter_file.with_name(f"{prefix}state.json"))


def save_state(adapter_file, optimizer, meta: dict, accum=None):
    """Optimizer state (+ pending accumulated gradients) and `meta` (step, seed,
    ...: JSON) next to adapter_file."""
    tensors, meta_path = _state_paths(Path(adapter_file))
    flat = {f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)}
    if accum is not None:
        flat.update({f"accum.{k}": v for k, v in tree_flatten(accum)})
    _atomic(tensors, lambda p: mx.save_safetensors(p, flat))
    info = {**meta, "has_accum": accum is not None}
    _atomic(meta_path, lambda p: Path(p).write_text(json.dumps(info) + "\n"))


def find_adapter_file(path) -> Path:
    """A resume target: an adapter file, or a directory holding adapters.safetensors."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / ADAPTERS
    if not p.is_file():
        raise AdapterError(f"adapter file {p} not found (pass an *adapters.safetensors "
                           "file or the directory that holds adapters.safetensors)")
    return p


def read_safetensors(path, return_metadata=False):
    """mx.load of a safetensors file; AdapterError if it is truncated or not one."""
    try:
        return mx.load(str(path), return_metadata=return_metadata)
    except (RuntimeError, ValueError, OSError) as e:
        raise AdapterError(f"{path} is not a readable safetensors file ({e}). It may be "
                           "truncated or corrupt (an interrupted copy?): pass an intact "
                           "file, e.g. an earlier numbered snapshot") from None


def _read_json(path) -> dict:
    try:
        out = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path} is not a readable JSON file ({e})") from None
    if not isinstance(out, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(out).__name__}")
    return out


def check_weights(model: nn.Module, adapter_file) -> dict:
    """The file's lora_a/lora_b arrays, checked against the model's LoRA layers
    (names, shapes, finite values); nothing is loaded into the model."""
    p = find_adapter_file(adapter_file)
    have = adapter_weights(model)
    got = read_safetensors(p)
    bad = [f"{k}: not in the model" for k in got if k not in have]
    bad += [f"{k}: shape {tuple(got[k].shape)} != model {tuple(have[k].shape)}"
            for k in got if k in have and got[k].shape != have[k].shape]
    bad += [f"{k}: missing from the file" for k in have if k not in got]
    if bad:
        raise AdapterError(f"{p} does not match the model's LoRA layers (check --rank, "
                           f"--num-layers and the model):\n  " + "\n  ".join(bad[:8]))
    nonfinite = [k for k, v in got.items() if not mx.isfinite(v).all().item()]
    if nonfinite:
        raise AdapterError(f"{p} holds non-finite values ({nonfinite[0]}, ...): it comes "
                           "from a diverged run; pass an earlier snapshot")
    return got


def load_weights(model: nn.Module, adapter_file) -> None:
    """Load lora_a/lora_b into the model's LoRA layers, checking names and shapes."""
    got = check_weights(model, adapter_file)
    model.load_weights(list(got.items()), strict=False)
    mx.eval(model.parameters())


def read_state(adapter_file):
    """(info, tensors) saved by save_state next to adapter_file, checked for
    readability; None when absent or from another save (weights-only resume)."""
    f = find_adapter_file(adapter_file)
    tensors, meta = _state_paths(f)
    if not (tensors.is_file() and meta.is_file()):
        return None
    info = _read_json(meta)
    if not isinstance(info.get("step"), int) or info["step"] < 0:
        raise AdapterError(f"{meta}: 'step' must be an iteration number, got "
                           f"{info.get('step')!r}")
    _, file_meta = read_safetensors(f, return_metadata=True)
    if file_meta.get("step") != str(info["step"]):
        return None         # state from another save (interrupted between files)
    return info, read_safetensors(tensors)


def check_resume(model: nn.Module, adapter_file) -> None:
    """Everything a resume from adapter_file reads (weights, optimizer state,
    accumulator), checked against the model's LoRA layers; writes nothing."""
    check_weights(model, adapter_file)
    state = read_state(adapter_file)
    if state is None:
        return
    have, bad = adapter_weights(model), []
    for k, v in state[1].items():
        kind, _, rest = k.partition(".")
        path = rest if kind == "accum" else rest.rpartition(".")[0]
        if kind not in ("optimizer", "accum") or path not in have:
            if kind == "accum":
                bad.append(f"{k}: not in the model")
            continue
        if v.shape != have[path].shape:
            bad.append(f"{k}: shape {tuple(v.shape)} != model {tuple(have[path].shape)}")
    if bad:
        tensors, _ = _state_paths(find_adapter_file(adapter_file))
        raise AdapterError(f"{tensors} does not match the model's LoRA layers:\n  "
                           + "\n  ".join(bad[:8]))


def load_state(adapter_file, optimizer):
    """Restore optimizer state saved by save_state; returns (meta, accum), or
    None when no state was saved next to the file (weights-only resume)."""
    state = read_state(adapter_file)
    if state is None:
        return None
    info, flat = state
    opt = tree_unflatten([(k[len("optimizer."):], v) for k, v in flat.items()
                          if k.startswith("optimizer.")])
    accum = tree_unflatten([(k[len("accum."):], v) for k, v in flat.items()
                            if k.startswith("accum.")]) if info.get("has_accum") else None
    if "learning_rate" in optimizer.state:      # the current setting wins
        opt["learning_rate"] = optimizer.state["learning_rate"]
    optimizer.state = opt
    return info, accum


def load_adapter_dir(model: nn.Module, adapter_dir) -> nn.Module:
    """apply_lora as recorded in adapter_config.json, then load the weights."""
    d = Path(adapter_dir).expanduser()
    if not (d / CONFIG).is_file():
        raise AdapterError(f"{d / CONFIG} not found: --adapter-path must be a "
                           "directory written by training")
    cfg = _read_json(d / CONFIG)
    lp = cfg.get("lora_parameters", {})
    try:
        apply_lora(model, rank=lp.get("rank", 8), scale=lp.get("scale", 20.0),
                   dropout=lp.get("dropout", 0.0), keys=lp.get("keys"),
                   num_layers=cfg.get("num_layers"))
    except (ValueError, TypeError) as e:
        raise AdapterError(f"{d / CONFIG} does not fit this model: {e}") from None
    load_weights(model, d / ADAPTERS)
    return model

