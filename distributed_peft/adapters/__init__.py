"""A task adapter as files: save, check, load, swap several on one base, merge into the base (storage), and its Hub
model card (model_cards).

Imports: errors, runtime, config, data, modeling.
"""
