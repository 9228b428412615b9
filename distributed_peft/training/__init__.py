"""The training recipe (recipe: setup, train, save, cleanup, the one place that shows a run's order), the step loop's
mechanics (loop: windows, one optimizer step, early stops), what a finished run writes (run_report), how fast it trains
(throughput: model FLOPs, MFU, peak memory), checkpoints and resume, and reproducing the shipped adapters from their
recorded configs (reproduce).

Imports: errors, runtime, config, data, modeling, adapters, evaluation.
"""
