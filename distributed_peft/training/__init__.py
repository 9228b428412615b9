"""The training recipe (recipe: setup, train, save, cleanup), its objective, checkpoints and resume, and reproducing
the shipped adapters from their recorded configs (reproduce).

Imports: errors, runtime, config, data, modeling, adapters, evaluation.
"""
