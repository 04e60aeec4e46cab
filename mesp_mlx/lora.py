"""`python -m mesp_mlx.lora`: LoRA fine-tuning with mlx-lm's flags and files.

    python -m mesp_mlx.lora --model Qwen2.5-0.5B --train --data ./data
    python -m mesp_mlx.lora --model Qwen2.5-0.5B --test --data ./data --adapter-path adapters

The job itself is train/job.py (`mesp_mlx.run(config)` from Python); this file is
the command line: flags, YAML, and user errors as one line with exit status 1.
"""

import argparse
import os
import sys
from typing import Optional

from . import blas
from .errors import Parser, UserError
from .parallel.group import where
from .train import job
from .train.config import TrainConfig, add_arguments, resolve

EPILOG = """\
methods: mesp = per-block recompute + hand-derived backward (least memory),
mebp = per-block checkpointing, autodiff = plain MLX autodiff (the reference);
all three give the same gradients. mezo = MeZO (zeroth-order SPSA): two
forward passes per step at inference memory, but only a gradient estimate, so
it converges far slower (paper, LoRA: --learning-rate 1e-4 or 5e-5,
--mezo-eps 1e-2). Options may also come from a YAML file
(--config), with the same names as the flags (CLI > YAML > defaults); an
mlx-lm LoRA YAML file works as is. Adapters are mlx-lm's files: use them with
`mlx_lm.generate --adapter-path` or `mlx_lm.fuse`."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m mesp_mlx.lora",
        description="Fine-tune an LLM with LoRA at minimal peak memory, exact gradients.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(parser)


def run(cfg: TrainConfig, log=None) -> dict:
    """The job from Python (train/job.py): returns {"train", "test_loss", "model"}."""
    return job.run(cfg, log)


def main(argv: Optional[list] = None) -> int:
    """CLI entry point; returns the exit status (user errors: 1, no traceback)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    cfg_path = args.config
    try:
        cfg = resolve(vars(args), cfg_path)
        run(cfg)
    except UserError as e:
        print(f"error{where()}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; resume with --resume-adapter-file "
              f"{getattr(args, 'adapter_path', None) or 'adapters'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    blas.ensure_fast("mesp_mlx.lora", sys.argv[1:])
    sys.exit(main())
