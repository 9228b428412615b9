"""How good an adapter is: completion-only loss, generation, task metrics (metrics), base-vs-adapter evaluation of a
run or any file (evaluator), and the reports written from it (reports); inference: running a model without training
it (no grad, progress bar), for the loss and generation alike.

Imports: errors, runtime, config, data, modeling, adapters.
"""
