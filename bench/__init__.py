"""Benchmarks and probes of mesp_mlx, run from the repository root.

    python -m bench.<name> [options]      # a benchmark: appends rows to bench/results/
    python -m bench.report                # rebuilds bench/RESULTS.md from all of them
    python -m bench.probes.<name>         # a one-off measurement, printed only

Importing a module here runs nothing.
"""
