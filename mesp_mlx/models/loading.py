"""Model names -> repositories, and loading through mlx-lm's loader.

`--model` takes a local directory, a Hugging Face repo id, `demo`, or a short
name: `Qwen2.5-{0.5B,1.5B,3B}` (Qwen/ originals), `-Instruct`, and the
mlx-community conversions `-Instruct-4bit` / `-Instruct-bf16`, plus the published
mlx-community conversions of the other families (PUBLISHED), and
`Qwen3.5-{0.8B,2B,4B}` (Qwen/ originals) with `-4bit` / `-8bit` for mlx-community's
mlx-lm conversions (`Qwen3.5-0.8B-MLX-4bit`: its `Qwen3.5-0.8B-4bit` holds the
multimodal mlx-vlm package).
"""

import re
from pathlib import Path

from ..errors import ModelLoadError

SIZES = ("0.5B", "1.5B", "3B")
_SHORT = re.compile(r"^qwen2\.5-(0\.5b|1\.5b|3b)(-instruct)?(-4bit|-bf16)?$", re.I)
SIZES_35 = ("0.8B", "2B", "4B")
_SHORT_35 = re.compile(r"^qwen3\.5-(0\.8b|2b|4b)(?:-mlx)?(-4bit|-8bit)?$", re.I)


PUBLISHED = ("Qwen3-0.6B-4bit", "Qwen3-0.6B-bf16", "Qwen3-4B-4bit",
             "Llama-3.2-1B-Instruct-4bit", "Llama-3.2-3B-Instruct-4bit",
             "gemma-3-1b-it-8bit", "gemma-2-2b-it-4bit", "Phi-3.5-mini-instruct-4bit",
             "SmolLM3-3B-Base-8bit", "LFM2-700M-4bit", "LFM2-1.2B-4bit", "LFM2-1.2B-8bit",
             "LFM2.5-1.2B-Thinking-4bit", "gemma-4-e2b-it-4bit", "gemma-4-e4b-it-4bit")
ORIGINALS = {"LFM2-350M": "LiquidAI", "LFM2-700M": "LiquidAI", "LFM2-1.2B": "LiquidAI",
             "LFM2.5-1.2B-Instruct": "LiquidAI", "gemma-4-E2B": "google",
             "gemma-4-E2B-it": "google", "gemma-4-E4B-it": "google"}   # bf16 checkpoints
_PUBLISHED = {n.lower(): f"mlx-community/{n}" for n in PUBLISHED} | \
    {n.lower(): f"{org}/{n}" for n, org in ORIGINALS.items()}


def short_names() -> list:
    out = []
    for s in SIZES:
        out += [f"Qwen2.5-{s}", f"Qwen2.5-{s}-Instruct", f"Qwen2.5-{s}-Instruct-4bit",
                f"Qwen2.5-{s}-Instruct-bf16"]
    for s in SIZES_35:
        out += [f"Qwen3.5-{s}", f"Qwen3.5-{s}-4bit", f"Qwen3.5-{s}-8bit"]
    return out + list(PUBLISHED) + list(ORIGINALS)


def resolve_model_name(name: str) -> str:
    """Local path or repo id that `name` stands for (unchanged if not short)."""
    if name == "demo":
        try:
            from .. import demo
        except ImportError:
            raise ModelLoadError("the demo model is not available in this install") from None
        try:
            return demo.model_path()
        except FileNotFoundError as e:
            raise ModelLoadError(str(e)) from None
    if name.lower() in _PUBLISHED and not Path(name).exists():
        return _PUBLISHED[name.lower()]
    m35 = _SHORT_35.match(name)
    if m35 is not None and not Path(name).exists():
        size = m35.group(1).upper()
        if m35.group(2):
            return f"mlx-community/Qwen3.5-{size}-MLX-{m35.group(2)[1:].lower()}"
        return f"Qwen/Qwen3.5-{size}"
    m = _SHORT.match(name)
    if m is None or Path(name).exists():
        return name
    size = m.group(1).upper()
    instruct, variant = bool(m.group(2)), (m.group(3) or "").lower()
    if variant and not instruct:
        raise ModelLoadError(f"no published {name}: mlx-community converts the Instruct "
                             f"models; try Qwen2.5-{size}-Instruct{variant} or "
                             f"Qwen2.5-{size} (Qwen/Qwen2.5-{size}, bf16)")
    if variant:
        return f"mlx-community/Qwen2.5-{size}-Instruct{variant}"
    return f"Qwen/Qwen2.5-{size}" + ("-Instruct" if instruct else "")


def _looks_local(name: str) -> bool:
    return (name.startswith((".", "/", "~")) or name.count("/") != 1
            or name.endswith("/"))


def load_model(name: str, log=print, trust_remote_code: bool = False,
               stream_weights: bool = False):
    """(model, tokenizer, resolved) via mlx_lm.load; ModelLoadError if absent.
    stream_weights: load lazily and stream the frozen weights from the model's
    safetensors (stream.py) instead of holding them."""
    resolved = resolve_model_name(name)
    if resolved != name:
        log(f"Model {name} -> {resolved}")
    path = Path(resolved).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not an mlx-lm/Hugging "
                                 "Face model directory")
    elif _looks_local(resolved):
        raise ModelLoadError(f"model directory {resolved} does not exist (and is not "
                             f"a repo id like owner/name); short names: "
                             f"{', '.join(short_names()[:4])}, ...")
    where = str(path) if path.exists() else resolved
    model, tok = _load(resolved, where, trust_remote_code, stream_weights)
    if stream_weights:
        _stream(model, where, log)
    return model, tok, resolved


def _stream(model, where, log):
    from mlx_lm.utils import _download

    from ..engine.safetensors_io import WeightsFileError
    from ..engine.stream import stream_weights
    try:
        ws = stream_weights(model, _download(where))
    except WeightsFileError as e:
        raise ModelLoadError(str(e)) from None
    log(f"Streaming {ws.streamed_bytes() / 1e6:.1f} MB of frozen weights from {ws.dir} "
        f"(largest block {ws.block_bytes() / 1e6:.1f} MB); resident: norms, LoRA, "
        "optimizer state")


def _load(resolved: str, where: str, trust_remote_code: bool = False, lazy: bool = False):
    import mlx_lm
    from huggingface_hub import errors as hf

    hint = (f"On a connected machine run `hf download {resolved} --local-dir <dir>` "
            "(huggingface_hub's `hf` command; or copy the model directory here) and "
            "pass --model <dir>.")
    try:
        model, tokenizer = mlx_lm.load(where, lazy=lazy, **({"tokenizer_config": {
            "trust_remote_code": True}, "trust_remote_code": True}
            if trust_remote_code else {}))
    except hf.GatedRepoError:
        raise ModelLoadError(f"{resolved} is gated on the Hugging Face Hub: accept its "
                             f"licence and log in (`hf auth login`). {hint}") from None
    except (hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.HFValidationError):
        raise ModelLoadError(f"no model {resolved!r} on the Hugging Face Hub. Pass a "
                             f"repo id, a local directory, or a short name "
                             f"({', '.join(short_names()[:4])}, ...).") from None
    except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled, ConnectionError):
        raise ModelLoadError(f"could not download {resolved} (offline, and not in the "
                             f"local Hugging Face cache). {hint}") from None
    except (FileNotFoundError, ValueError) as e:
        raise ModelLoadError(f"could not load {resolved}: {e}") from None
    except RuntimeError as e:              # MLX's reader: a truncated or corrupt file
        if "safetensors" not in str(e) and "load" not in str(e):
            raise
        raise ModelLoadError(f"could not load {resolved}: {e}") from None
    return model, tokenizer
