"""The commands: one thin module per `dpeft-*` entry point, and what they share (app: the Hydra app decorator, the
preflight that checks a command line before any model loads, one-line errors, --help).

Imports: anything in distributed_peft; nothing imports cli except its own modules.
"""
