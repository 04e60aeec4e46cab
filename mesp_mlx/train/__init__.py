"""Training around the engine: options, data, the loop, adapters and reports.

config.py (TrainConfig: flags and YAML keys) -> job.py (load, plan, train, test:
the CLI's job) -> loop.py (the training loop) -> the engine. Beside the loop:
data.py, adapters.py, lr_schedules.py, early_stop.py, divergence.py, reporting.py.
"""
