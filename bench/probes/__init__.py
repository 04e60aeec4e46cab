"""One-off measurements behind single choices in the code (printed, not kept in
bench/results/): run each as `python -m bench.probes.<name>`."""
