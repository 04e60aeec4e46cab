"""TrainConfig: the one source of CLI flags and YAML keys (CLI > YAML > defaults).

Each field's `help` metadata becomes its `--flag` help text; YAML keys are the
field names. Every key of mlx-lm's `mlx_lm.lora` YAML and CLI is accepted with
its meaning (`lora_parameters: {rank, scale, dropout, keys}`, `save_every`,
`lr_schedule`, `hf_dataset`, `report_to`, ...) or refused with an error that
names the alternative (`fine_tune_type: dora`), so an mlx-lm YAML file works.
"""

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from ..engine.step import METHODS
from ..errors import ConfigError
from ..units import parse_size
from . import lr_schedules
from .hf_data import check_spec
from .reporting import check_report_to

OPTIMIZERS = ("sgd", "adam", "adamw", "muon", "adafactor")   # mlx-lm's five
FINE_TUNE_TYPES = ("lora", "dora", "full")
GRAD_CHECKPOINT_NOTE = ("Note: grad_checkpoint selects --method mebp (per-block "
                        "checkpointing, as mlx-lm's grad_checkpoint); the default "
                        "--method mesp needs less memory still, with the same gradients")
LORA_DTYPES = ("float32", "bfloat16", "float16")
ACTIVATION_PLANS = ("fastest", "minimal")
TRAIN_MODES = ("sft", "dpo", "orpo")


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train on
    model: Optional[str] = _f(None, "Hugging Face repo id, local model directory, "
                              "short name (Qwen2.5-0.5B, Qwen2.5-1.5B-Instruct-4bit, ...) "
                              "or 'demo'.")
    data: Optional[str] = _f(None, "Directory with train/valid/test.jsonl (text, "
                             "prompt/completion or chat messages), a Hugging Face "
                             "dataset id, or 'demo'.")
    hf_dataset: Optional[list] = _f(None, "mlx-lm's Hugging Face dataset mapping (or "
                                    "list of them): {path, train_split, valid_split, "
                                    "test_split, config, *_feature}. YAML only.",
                                    cli=False)
    prompt_feature: Optional[str] = _f(None, "Record key of the prompt (default "
                                       "'prompt'). YAML only.", cli=False)
    completion_feature: Optional[str] = _f(None, "Record key of the completion "
                                           "(default 'completion'). YAML only.", cli=False)
    text_feature: Optional[str] = _f(None, "Record key of the text (default 'text'). "
                                     "YAML only.", cli=False)
    chat_feature: Optional[str] = _f(None, "Record key of the chat messages (default "
                                     "'messages'). YAML only.", cli=False)
    train: bool = _f(False, "Train LoRA adapters.")
    test: bool = _f(False, "Evaluate test loss/perplexity (after training, or of "
                    "--adapter-path without --train).")
    # method and LoRA
    method: str = _f("mesp", "Gradient method: mesp (hand backward, least memory), "
                     "mebp (per-block checkpointing), autodiff (plain MLX), mezo "
                     "(zeroth-order SPSA: 2 forward passes, inference memory, "
                     "gradient estimate only; its own SGD update, --optimizer unused).",
                     choices=METHODS)
    fine_tune_type: str = _f("lora", "mlx-lm's fine-tuning type: only lora (dora and "
                             "full are refused: use mlx_lm.lora for those).",
                             choices=FINE_TUNE_TYPES)
    grad_checkpoint: bool = _f(False, "mlx-lm's gradient checkpointing: selects "
                               "--method mebp unless --method is given (mesp, the "
                               "default, needs less memory).")
    train_mode: str = _f("sft", "Objective: sft (token-mean cross-entropy), dpo "
                         "(Direct Preference Optimization against the model with its "
                         "adapters at zero) or orpo (odds-ratio preference "
                         "optimization); dpo and orpo train on {prompt, chosen, "
                         "rejected} records, prompts masked (mlx-lm-lora's flag; "
                         "mlx-lm's YAML training_mode: normal is sft).",
                         choices=TRAIN_MODES)
    beta: float = _f(0.1, "β of --train-mode dpo (the scale of the implicit reward "
                     "β·log(p/p_ref)) and orpo (the weight of the odds-ratio term).")
    rank: int = _f(8, "LoRA rank r.")
    scale: float = _f(20.0, "LoRA scale s in y = xW0ᵀ + s·(xA)B (mlx-lm's `scale`, "
                      "not alpha/r).")
    dropout: float = _f(0.0, "Dropout on the LoRA input, in [0, 1).")
    lora_keys: Optional[list] = _f(None, "Projections to adapt (default: q,k,v,o,"
                                   "gate,up,down). YAML only.", cli=False)
    num_layers: int = _f(-1, "Adapt the last N transformer blocks; -1 = all.")
    # optimisation
    iters: int = _f(1000, "Training iterations (batches).")
    batch_size: int = _f(4, "Sequences per batch.")
    max_seq_length: int = _f(2048, "Longer sequences are truncated (with a warning).")
    pack: bool = _f(False, "Pack whole training examples into rows of "
                    "--max-seq-length positions (--batch-size counts rows); each "
                    "example keeps its own RoPE positions and attention, so its loss "
                    "and gradients are those of its unpacked run. --method mesp only; "
                    "validation and test stay unpacked.")
    learning_rate: float = _f(1e-5, "Learning rate. With --method mezo the MeZO "
                              "paper uses 1e-4 or 5e-5 for LoRA (with --mezo-eps 1e-2).")
    optimizer: str = _f("adam", "Optimizer (muon and adafactor as in mlx-lm: "
                        "Adafactor's default relative step ignores --learning-rate).",
                        choices=OPTIMIZERS)
    lr_schedule: Optional[dict] = _f(None, "Learning-rate schedule: an mlx.optimizers "
                                     "schedule name (cosine_decay and linear_schedule "
                                     "decay from --learning-rate to 0 over the run); "
                                     "YAML: mlx-lm's {name, arguments, warmup, "
                                     "warmup_init}.", metavar="NAME")
    warmup: Optional[int] = _f(None, "Linear warmup over this many optimizer updates "
                               "(overrides lr_schedule.warmup; without --lr-schedule, "
                               "warms up to a constant --learning-rate).")
    warmup_init: Optional[float] = _f(None, "Learning rate of the first warmup update "
                                      "(default 0).")
    optimizer_config: dict = _f(None, "Extra optimizer kwargs per optimizer, e.g. "
                                "{adamw: {weight_decay: 0.01}}. YAML only.", cli=False)
    mezo_eps: float = _f(1e-2, "MeZO perturbation size ε (paper, LoRA: 1e-2).")
    mezo_weight_decay: float = _f(0.0, "MeZO weight decay λ in θ ← θ − lr·(p·z + λθ).")
    grad_accumulation_steps: int = _f(1, "Batches whose gradients are accumulated "
                                      "(token-weighted) per optimizer update.")
    mask_prompt: bool = _f(False, "Train on completions only (prompt/completion "
                           "and chat data).")
    seed: int = _f(0, "Seed for LoRA init, batch order and dropout.")
    # reporting, evaluation, saving
    steps_per_report: int = _f(10, "Iterations between training reports.")
    steps_per_eval: int = _f(200, "Iterations between validations.")
    steps_per_save: int = _f(100, "Iterations between adapter snapshots.",
                             aliases=("--save-every",))
    save_best: bool = _f(False, "Also keep adapters_best.safetensors: the adapters "
                         "of the lowest validation loss (at --steps-per-eval).")
    early_stop_patience: int = _f(0, "Stop after this many validations (at "
                                  "--steps-per-eval) without a new lowest loss; 0 = never.")
    report_to: Optional[str] = _f(None, "Report losses to wandb, swanlab or "
                                  "'wandb,swanlab' (mlx-lm's callbacks; needs the "
                                  "package installed).")
    project_name: Optional[str] = _f(None, "Project name for --report-to (default: "
                                     "the adapter directory's name).")
    val_batches: int = _f(25, "Validation batches (a fixed subset); -1 = all.")
    test_batches: int = _f(500, "Test batches; -1 = all.")
    adapter_path: Optional[str] = _f("adapters", "Directory for adapters.safetensors, "
                           "adapter_config.json and snapshots.")
    resume_adapter_file: Optional[str] = _f(None, "Resume from an adapter file (or "
                                            "adapter directory); optimizer state, "
                                            "step and RNG are restored when saved "
                                            "next to it.")
    # memory
    memory_budget: Optional[str] = _f(None, "Peak memory budget, e.g. 6GB or 512MB: "
                                      "checked before training and enforced.")
    device_profile: Optional[str] = _f(None, "Budget of a device class, e.g. an 8 GB "
                                       "iPad (see python -m mesp_mlx.memory).")
    memory_log: Optional[str] = _f(None, "Write one JSON line of memory figures per "
                                   "step to this file.")
    activation_plan: str = _f("fastest", "fastest: the step spends the memory it may "
                              "use (--memory-budget or --device-profile; else this "
                              "device's memory less a margin) on keeping what its "
                              "backward would recompute; minimal: the smallest peak, "
                              "every block recomputed. With --stream-weights and no "
                              "budget the plan is minimal. mesp only.",
                              choices=ACTIVATION_PLANS)
    offload_checkpoints: Optional[str] = _f(None, "Keep the block-input checkpoints "
                                            "in a temporary file in this directory "
                                            "(removed after each step) instead of "
                                            "memory (mesp, mebp): memory stops growing "
                                            "with the number of layers, for one write "
                                            "and one read of L×B×T×D per step.")
    # data parallelism (under mlx.launch; mesp_mlx/distributed.py)
    dist_timeout: float = _f(600.0, "Seconds a rank waits for the others in one "
                             "collective of a multi-rank run (mlx.launch) before every "
                             "rank stops with an error.")
    clear_cache_threshold: Optional[str] = _f(None, "Clear MLX's buffer cache after a "
                                              "step or validation when it holds more "
                                              "than this (e.g. 1GB; 0 = never).")
    trust_remote_code: bool = _f(False, "Let the tokenizer/model run code from its "
                                 "repository (mlx-lm's flag).")
    stream_weights: bool = _f(False, "Read each block's frozen weights from the "
                              "model's safetensors just before it runs (forward and "
                              "recompute) and free them after; the head one vocabulary "
                              "tile at a time, the embedding only at the batch's tokens "
                              "(mesp, mebp, mezo). Memory: one block instead of all "
                              "weights; the files must not change while training.")
    lora_dtype: Optional[str] = _f(None, "dtype of the LoRA parameters (and their "
                                   "gradients): bfloat16 as in the MeSP paper, float16, "
                                   "float32 (default: float32).", choices=LORA_DTYPES)
    config: Optional[str] = _f(None, "YAML file with any of these options.",
                               cli=False)

    def validate(self) -> "TrainConfig":
        """A whole run's options (the CLI's job): check_options, plus something
        to do, a model and data. Raises ConfigError; returns self."""
        self.check_options()

        def need(ok, msg):
            if not ok:
                raise ConfigError(msg)

        need(self.train or self.test, "nothing to do: pass --train and/or --test")
        need(self.model is not None, "--model is required (a repo id, a local "
             "directory or a short name such as Qwen2.5-0.5B)")
        need(self.data is not None or self.hf_dataset is not None, "--data is "
             "required (a directory with train.jsonl/valid.jsonl/test.jsonl or a "
             "dataset id), or hf_dataset in the YAML file")
        return self

    def check_options(self) -> "TrainConfig":
        """Every option's type, range and consistency with the others, in one place
        (train() calls this too). Raises ConfigError on the first; returns self."""
        check_types(self)

        def need(ok, msg):
            if not ok:
                raise ConfigError(msg)

        need(self.method in METHODS, f"--method must be one of "
             f"{', '.join(METHODS)}, got {self.method!r}")
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of "
             f"{', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        for name in ("rank", "iters", "batch_size", "max_seq_length",
                     "grad_accumulation_steps", "steps_per_report",
                     "steps_per_eval", "steps_per_save"):
            need(getattr(self, name) >= 1,
                 f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        need(self.max_seq_length >= 2, "--max-seq-length must be >= 2")
        need(0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}")
        need(self.num_layers == -1 or self.num_layers >= 1,
             f"--num-layers must be -1 (all) or >= 1, got {self.num_layers}")
        need(self.val_batches == -1 or self.val_batches >= 0, "--val-batches must be >= 0 or -1")
        need(self.test_batches == -1 or self.test_batches >= 1, "--test-batches must be >= 1 or -1")
        for name in ("learning_rate", "scale", "mezo_eps"):
            v = getattr(self, name)
            need(math.isfinite(v) and v > 0,
                 f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")
        need(math.isfinite(self.mezo_weight_decay) and self.mezo_weight_decay >= 0,
             f"--mezo-weight-decay must be a finite number >= 0, got "
             f"{self.mezo_weight_decay}")
        for opt, kw in (self.optimizer_config or {}).items():
            for k, v in kw.items():
                need(not isinstance(v, float) or math.isfinite(v),
                     f"optimizer_config.{opt}.{k} must be finite, got {v}")
        need(self.offload_checkpoints is None or self.method in ("mesp", "mebp"),
             "--offload-checkpoints needs --method mesp or mebp (the methods that "
             "keep block-input checkpoints)")
        need(not self.stream_weights or self.method in ("mesp", "mebp", "mezo"),
             "--stream-weights needs --method mesp, mebp or mezo (autodiff runs the "
             "model's own forward, which needs every weight resident)")
        need(self.lora_dtype is None or self.lora_dtype in LORA_DTYPES,
             f"--lora-dtype must be one of {', '.join(LORA_DTYPES)}, got {self.lora_dtype!r}")
        need(self.method != "mezo" or self.grad_accumulation_steps == 1,
             "--method mezo does not accumulate gradients: use --batch-size instead "
             "of --grad-accumulation-steps")
        self._check_mlx_lm_keys(need)
        need(not self.pack or self.method == "mesp", f"--pack needs --method mesp (the "
             f"per-block engine runs packed rows with block-diagonal attention), got "
             f"--method {self.method}")
        need(self.activation_plan in ACTIVATION_PLANS, f"--activation-plan must be one "
             f"of {', '.join(ACTIVATION_PLANS)}, got {self.activation_plan!r}")
        return self

    def _check_mlx_lm_keys(self, need):
        """mlx-lm's options: the ones we refuse name what to use instead."""
        need(self.fine_tune_type == "lora", f"fine_tune_type {self.fine_tune_type} is "
             "not supported: mesp_mlx trains LoRA adapters with exact gradients; use "
             "fine_tune_type lora, or mlx_lm.lora for dora and full fine-tuning")
        need(self.train_mode in TRAIN_MODES, f"--train-mode must be one of "
             f"{', '.join(TRAIN_MODES)}, got {self.train_mode!r} (for cpo, grpo and "
             "the online modes use mlx-lm-lora)")
        if self.train_mode != "sft":
            need(self.method != "mezo", f"--train-mode {self.train_mode} needs an exact "
                 "gradient: --method mesp, mebp or autodiff (mezo estimates the SFT "
                 "loss's gradient only)")
            need(not self.pack, f"--pack does not apply to --train-mode "
                 f"{self.train_mode}: each pair's sides run as their own rows")
        need(math.isfinite(self.beta) and self.beta > 0,
             f"--beta must be a finite number > 0, got {self.beta}")
        lr_schedules.check(self.lr_schedule, self.warmup, self.warmup_init)
        need(self.method != "mezo" or (self.lr_schedule is None and not self.warmup),
             "--method mezo uses a constant --learning-rate: drop lr_schedule/--warmup")
        need(self.early_stop_patience >= 0, "--early-stop-patience must be >= 0 "
             f"(0 = never), got {self.early_stop_patience}")
        if self.train and (self.save_best or self.early_stop_patience):
            need(self.val_batches != 0, "--save-best and --early-stop-patience judge "
                 "by validation loss: --val-batches must not be 0")
        if self.clear_cache_threshold is not None:
            if self.clear_cache_threshold.strip() not in ("0", ""):
                try:
                    parse_size(self.clear_cache_threshold)
                except ValueError as e:
                    need(False, f"--clear-cache-threshold: {e}")
        if self.report_to:
            check_report_to(self.report_to)
        if self.hf_dataset is not None:
            check_spec(self.hf_dataset)

    def clear_cache_bytes(self) -> int:
        """clear_cache_threshold in bytes (0: never)."""
        t = (self.clear_cache_threshold or "0").strip()
        return 0 if t in ("0", "") else parse_size(t)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """The resolved options, one `key: value` per line."""
        return "\n".join(f"  {k}: {v}" for k, v in self.to_dict().items())


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per CLI-visible field; every default is None so that only what
    was typed overrides YAML (the dataclass holds the real defaults)."""
    parser.add_argument("-c", "--config", help=_meta("config")["help"])
    for f in fields(TrainConfig):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        flags = ["--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        help = meta["help"] + ("" if f.default is None or f.type is bool
                               else f" (default: {f.default})")
        if f.type is bool:
            parser.add_argument(*flags, dest=f.name, action="store_true",
                                default=None, help=meta["help"])
        else:
            typ = _base(f.type) if _base(f.type) in (int, float) else str
            parser.add_argument(*flags, dest=f.name, type=typ, default=None,
                                choices=meta.get("choices"), help=help,
                                metavar=None if meta.get("choices") else
                                meta.get("metavar", f.name.rsplit("_", 1)[-1].upper()))
    return parser


def _base(typ):
    """int for Optional[int], etc."""
    if getattr(typ, "__origin__", None) is not None and type(None) in typ.__args__:
        return typ.__args__[0]
    return typ


def _meta(name):
    return next(f.metadata for f in fields(TrainConfig) if f.name == name)


def load_yaml(path) -> dict:
    """YAML options as TrainConfig keys (mlx-lm spellings translated)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    raw = dict(raw)
    if "save_every" in raw:
        raw.setdefault("steps_per_save", raw.pop("save_every"))
    if "training_mode" in raw:                       # mlx-lm's key; its "normal" is sft
        mode = raw.pop("training_mode")
        raw.setdefault("train_mode", "sft" if mode == "normal" else mode)
    lora = raw.pop("lora_parameters", None) or {}
    if not isinstance(lora, dict):
        raise ConfigError(f"{path}: lora_parameters must be a mapping like {{rank: 8, "
                          f"scale: 20.0}}, got {lora!r}")
    if "alpha" in lora and "scale" not in lora:
        raise ConfigError(f"{path}: lora_parameters has 'alpha'; mesp_mlx (like "
                          "mlx-lm) uses 'scale' (y = xW0ᵀ + scale·(xA)B)")
    extra = sorted(str(k) for k in lora if k not in ("rank", "scale", "dropout", "keys",
                                                      "alpha"))
    if extra:
        raise ConfigError(f"{path}: unknown lora_parameters key(s) {', '.join(extra)}; "
                          "known: rank, scale, dropout, keys")
    for k, dst in (("rank", "rank"), ("scale", "scale"), ("dropout", "dropout"),
                   ("keys", "lora_keys")):
        if k in lora:
            raw.setdefault(dst, lora[k])
    for k in [k for k, v in raw.items() if v is None]:      # null: mlx-lm's default
        raw.pop(k)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(str(k) for k in set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(known))}")
    return raw


def resolve(cli: dict, yaml_path: Optional[str] = None) -> TrainConfig:
    """CLI values (None = not given) over YAML over dataclass defaults."""
    merged = load_yaml(yaml_path) if yaml_path else {}
    merged.update({k: v for k, v in cli.items() if v is not None and k != "config"})
    if merged.get("grad_checkpoint") is True and "method" not in merged:
        merged["method"] = "mebp"            # mlx-lm's checkpointing (GRAD_CHECKPOINT_NOTE)
    return check_types(TrainConfig(**merged, config=yaml_path))


def _kind(v) -> str:
    return "null" if v is None else {"bool": "a boolean", "int": "an integer",
                                     "float": "a float", "str": "a string",
                                     "list": "a list", "dict": "a mapping"}.get(
        type(v).__name__, f"a {type(v).__name__}")


def _typed(name: str, typ, v):
    """v as the field's declared type, or ConfigError naming key and type."""
    optional = getattr(typ, "__origin__", None) is not None and type(None) in typ.__args__
    base = typ.__args__[0] if optional else typ
    if v is None and (optional or name == "optimizer_config"):
        return v

    def bad(expected):
        return ConfigError(f"{name} must be {expected}, got {v!r} ({_kind(v)})")
    if base is bool:
        if not isinstance(v, bool):
            raise bad("true or false (a boolean; YAML: true/false without quotes)")
    elif base is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad("an integer")
    elif base is float:      # YAML 1.1 reads 1e-5 (no dot) as a string: accept it
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise bad("a number")
        try:
            v = float(v)
        except ValueError:
            raise bad("a number") from None
    elif name == "lr_schedule":
        if isinstance(v, str):
            v = {"name": v}              # --lr-schedule NAME
        if not isinstance(v, dict):
            raise bad("a schedule name or a mapping {name, arguments, warmup, warmup_init}")
    elif name == "hf_dataset":
        if not isinstance(v, (dict, list)) or (isinstance(v, list) and not all(
                isinstance(d, dict) for d in v)) or not v:
            raise bad("a mapping {path, train_split, valid_split, ...} or a list of them")
    elif base is str:
        if name in ("memory_budget", "clear_cache_threshold") and isinstance(v, int) \
                and not isinstance(v, bool):
            v = str(v)                     # a plain byte count
        if not isinstance(v, str):
            raise bad("a string")
    elif base is list:
        if not isinstance(v, list) or not all(isinstance(k, str) for k in v):
            raise bad("a list of strings")
    elif base is dict:
        if not isinstance(v, dict) or not all(isinstance(o, dict) for o in v.values()):
            raise bad("a mapping of optimizer name to its options, e.g. "
                      "{adamw: {weight_decay: 0.01}}")
    return v


def check_types(cfg: TrainConfig) -> TrainConfig:
    """Every field has its declared type (booleans only booleans, integers
    only integers; numbers for floats); raises ConfigError naming the key."""
    for f in fields(TrainConfig):
        setattr(cfg, f.name, _typed(f.name, f.type, getattr(cfg, f.name)))
    return cfg

