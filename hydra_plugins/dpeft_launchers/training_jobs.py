"""Hydra's submitit launchers (`hydra/launcher=slurm`, `hydra/launcher=local`) with what a training job needs.

    dpeft-train -m hydra/launcher=slurm task=sql,detox,instruct                  # one SLURM job per task, 1 GPU each
    dpeft-train -m hydra/launcher=slurm hydra.launcher.gpus_per_node=8 hydra.launcher.nodes=2 task=sql,detox
    dpeft-train -m hydra/launcher=local task=sql,detox                          # the same jobs on this machine

Inside each job, before the run starts:
- every task (one per GPU: tasks_per_node = gpus_per_node) gets the torch.distributed environment from submitit
  (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so the Accelerator runs DDP over all the job's GPUs with
  no `accelerate launch`; every GPU of the node stays visible and LOCAL_RANK picks one;
- submitit's time-limit signal (USR2, `signal_delay_s` before the limit) is handled like SIGTERM: every rank saves a
  checkpoint at a step boundary and stops with exit code 75; then rank 0 lets submitit requeue the job (at most
  `max_num_timeout` times), and the requeued job reruns the same overrides into the same run directory, where
  `training.resume=auto` (the default) continues from that checkpoint.
"""

from __future__ import annotations

import signal
from typing import Any

try:  # Hydra imports every plugin module at each start: nothing heavy here, and no error without the slurm extra
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher
except ImportError:  # pip install 'distributed-peft[slurm]' (the CLI's preflight names it)
    submitit_launcher = None


def export_torch_distributed_env() -> None:
    """RANK, WORLD_SIZE, MASTER_ADDR... of this submitit task, when the job has more than one task."""
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


class TrainingJob:
    """What a submitit launcher runs inside the job: resolvers, torch.distributed env, time-limit signal."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        from distributed_peft.config import register_configs
        from distributed_peft.errors import PREEMPTED_EXIT_CODE

        register_configs()  # the resolvers of our config tree, in this fresh process
        export_torch_distributed_env()
        usr_sig = submitit.JobEnvironment._usr_sig()
        requeue = signal.getsignal(usr_sig)  # submitit's: checkpoint this call, requeue the job, exit
        warned = []

        def stop_like_sigterm(signum: int, frame: Any) -> None:
            warned.append(signum)
            on_sigterm = signal.getsignal(signal.SIGTERM)  # termination.py's while the run runs
            if callable(on_sigterm):
                on_sigterm(signal.SIGTERM, frame)

        signal.signal(usr_sig, stop_like_sigterm)
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as stop:
            if stop.code == PREEMPTED_EXIT_CODE and warned and callable(requeue):
                requeue(usr_sig, None)  # rank 0 requeues (or says why not) and exits; the other ranks return
            raise


if submitit_launcher is not None:

    class SlurmLauncher(TrainingJob, submitit_launcher.SlurmLauncher):
        """`hydra/launcher=slurm`: one SLURM job per run of the sweep."""

    class LocalLauncher(TrainingJob, submitit_launcher.LocalLauncher):
        """`hydra/launcher=local`: the same jobs as processes of this machine."""
