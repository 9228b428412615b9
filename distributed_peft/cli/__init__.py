"""The commands: one thin module per `dpeft-*` entry point (train, evaluate, generate, merge, reproduce, build_base,
explore, bench, launch), and what they share: app (the Hydra app decorator every command is), preflight (the command
line composed and validated before any model loads), help (--help and --cfg, printed and nothing run).

Imports: anything in distributed_peft; nothing imports cli except its own modules.
"""
