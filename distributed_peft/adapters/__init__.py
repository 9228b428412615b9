"""A task adapter as files: save, check, load, swap several on one base, merge into the base (storage), its Hub
model card (model_cards) and the base-vs-adapter metrics table that card and eval.md show (metric_table).

Imports: errors, runtime, config, data, modeling.
"""
