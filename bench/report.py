"""Rebuild bench/RESULTS.md from the rows in bench/results/ (nothing is measured).

    python -m bench.report            # writes bench/RESULTS.md
    python -m bench.report --check    # exit 1 if bench/RESULTS.md is not what it would write

Each benchmark's section is rendered from its own rows file by its `section(rows)`;
the output depends on those files and the code only, so two runs write the same bytes.
"""

import argparse
import sys
from pathlib import Path

from bench import common

HEADER = """# Benchmark results

Written by `python -m bench.report` from the rows in `bench/results/`, where every
benchmark (`python -m bench.<name>`) appends its rows. Do not edit it by hand: rerun a
benchmark, then `python -m bench.report`.

- **Unit:** MB = 10⁶ bytes throughout (the CLI's unit); kB = 10³ bytes.
- **Rows:** each table shows the newest row per point; earlier runs are in the git
  history of `bench/results/`. Failed, out-of-memory and timed-out points stay as rows
  with their status.
- **Timings** come from small CPU machines shared with other work: compare ratios
  measured side by side (each table names its baseline), not absolute seconds across
  tables. Memory columns do not depend on load.
- **Environment:** every table ends with the device, MLX and mlx-lm versions, dtype,
  commit and command of its rows, read from the rows themselves ("not recorded" where a
  row predates the field).
"""


def sections():
    """(rows file, render function) per section, in the order of RESULTS.md."""
    from bench import (cli_steps, convergence, data_parallel_speed, families_new,
                       gradient_cosine, long_context, memory_bench, packing_speed, pareto,
                       preference, qwen3_5, stream_bench)
    return [(memory_bench.RESULTS, memory_bench.section),
            (memory_bench.FAMILIES, memory_bench.families_section),
            (qwen3_5.RESULTS, qwen3_5.section),
            (families_new.RESULTS, families_new.section),
            (stream_bench.RESULTS, stream_bench.section),
            (cli_steps.RESULTS, cli_steps.section),
            (long_context.RESULTS, long_context.section),
            (pareto.RESULTS, pareto.section),
            (gradient_cosine.RESULTS, gradient_cosine.section),
            (convergence.RESULTS, convergence.section),
            (packing_speed.RESULTS, packing_speed.section),
            (preference.RESULTS, preference.section),
            (data_parallel_speed.RESULTS, data_parallel_speed.section)]


def render() -> str:
    parts = [HEADER]
    for path, section in sections():
        parts.append(section(common.load_rows(path)).rstrip("\n") + "\n")
    return "\n".join(parts)


def write(path: Path = common.RESULTS_MD) -> Path:
    path.write_text(render())
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true",
                   help="only compare: exit 1 if bench/RESULTS.md is out of date")
    args = p.parse_args(argv)
    if args.check:
        same = common.RESULTS_MD.exists() and common.RESULTS_MD.read_text() == render()
        print("bench/RESULTS.md: " + ("up to date" if same else
                                      "out of date; run python -m bench.report"))
        return 0 if same else 1
    print(f"wrote {write().relative_to(common.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
