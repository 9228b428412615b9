"""How a process runs, whatever it runs: the Accelerator and its process group (DeepSpeed, FSDP, DDP), the run's
metrics log and trackers, owned output directories and atomic writes, signal handling, Hub access, secret redaction.

Imports: the standard library, third-party libraries and `distributed_peft.errors` only: every stage above may use it.
"""
