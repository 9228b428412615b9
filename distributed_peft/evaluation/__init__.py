"""How good an adapter is: completion-only loss, generation, task metrics (metrics), base-vs-adapter evaluation of a
run or any file (evaluator), and the reports written from it (reports).

Imports: errors, runtime, config, data, modeling, adapters.
"""
