"""The explorer: a local web page that runs the base and its adapters side by side (explorer: the models,
explorer_app: the page).

Imports: errors, runtime, config, data, modeling, adapters, evaluation.
"""
