"""Real workflows: accumulation never hangs and matches a bigger batch, SIGTERM stops every phase, resume refuses a
changed run, one run per directory, and no command writes into (or deletes) a directory it does not own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_config, patch_everywhere, run_entry
from safetensors.torch import load_file

from distributed_peft.errors import PREEMPTED_EXIT_CODE, USER_ERROR_EXIT_CODE
from distributed_peft.runtime.output_dirs import LOCK_FILE, OWNER_MARKER, DirectoryLock
from distributed_peft.runtime.tracking import read_metrics
from distributed_peft.training.checkpoints import TRAINER_STATE, checkpoint_problem, list_checkpoints
from distributed_peft.training.recipe import FinetuneRecipe, run_training

QUICK = [
    "task=custom",
    "model=tiny-llama",
    "training=demo",
    "training.eval_steps=0",
    "training.lr_scheduler=constant",
    "training.warmup_ratio=0",
    "peft.dropout=0",
    "evaluation.generate=false",
    "logging.progress_bar=false",
]
# Absolute, per LoRA weight: the same update computed over differently padded batches. Adam divides each gradient by
# its own scale, so weights whose gradient is near zero amplify float-order noise, in proportion to the learning rate:
# measured 1.0e-6 at lr 3e-4 (4.4e-5 at 3e-3), against 1.7e-3 when each micro batch is averaged on its own.
ADAPTER_TOLERANCE = 1e-5
EXACT_LR = "training.lr=3e-4"
# LoRA on every linear but q_proj/k_proj where two updates are compared to 1e-5: see the accumulation test's docstring
NO_QUERY_KEY = "peft.target_modules=[v_proj,o_proj,gate_proj,up_proj,down_proj]"


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """n prompt/completion pairs of varied lengths (jsonl)."""
    words = "the cat sat on a mat while dogs ran around happy people in the park every day".split()
    generator = torch.Generator().manual_seed(seed)
    with path.open("w") as f:
        for i in range(n):
            k = 3 + int(torch.randint(0, 12, (1,), generator=generator))
            prompt = " ".join(words[(i + j) % len(words)] for j in range(k))
            f.write(json.dumps({"prompt": f"Copy: {prompt}\n", "completion": prompt}) + "\n")
    return path


def quick(tmp_path: Path, out: Path, *extra: str, rows: int = 22) -> list[str]:
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_pairs(data, rows)
    return [*QUICK, f"task.data.path={data}", f"output_dir={out}", *extra]


def lora(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture
def deadline():
    """Fail (instead of hanging the suite) when the block takes longer than 120 s."""

    def expire(signum, frame):
        raise TimeoutError("the run hung: still running after 120 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------------- training loop
def test_accumulation_longer_than_an_epoch_steps_the_partial_window(tmp_path, bases, deadline):
    """12 rows -> 11 train = 3 micro batches of 4 an epoch; accumulation 8 used to wait forever for a full window."""
    out = tmp_path / "run"
    extra = ["training.micro_batch_size=4", "training.gradient_accumulation_steps=8", "training.max_steps=2"]
    run_training(compose_config(quick(tmp_path, out, *extra, "task.data.max_examples=12", rows=12)))
    rows = [r for r in read_metrics(out) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2], "one step per epoch, each over the epoch's 3 micro batches"
    split = json.loads((out / "split.json").read_text())
    assert split["train"] == 11
    # every labelled token of the epoch is in the step: the partial window was stepped whole, not dropped
    recipe_tokens = rows[0]["train/tokens"]
    assert recipe_tokens == rows[1]["train/tokens"] and recipe_tokens > 11 * 3
    card = json.loads((out / "adapter" / "dpeft_adapter.json").read_text())["run"]
    assert card["optimizer_steps"] == 2 and card["planned_steps"] == 2
    peft_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == "tiny-llama", "the base's portable name, not a cache path"


@pytest.mark.parametrize("packing", ["none", "padding_free"])
@pytest.mark.slow
def test_micro_2_times_accumulation_4_is_the_update_of_micro_8(packing, tmp_path, bases):
    """20 train rows: micro 8 gives batches 8, 8, 4; micro 2 x 4 gives windows of 8, 8 and a partial 4 - the same rows.

    The loss of a window is normalised by the labelled tokens of the whole window, so the adapters agree within 1e-5.
    LoRA is on every linear but q_proj/k_proj: the base's wired previous-token head (modeling/copy_circuit.py) has a
    saturated softmax, so those adapters' true gradient is ~0 and what they get is rounding noise, which Adam scales
    to lr-sized moves (measured: layer 0 q_proj.lora_B differed by 7.9e-6 / 1.0e-5; every other tensor <= 8.6e-7).
    """
    common = ["training.max_steps=3", f"training.packing={packing}", EXACT_LR, NO_QUERY_KEY]
    big = tmp_path / "big"
    run_training(compose_config(quick(tmp_path, big, *common, "training.micro_batch_size=8")))
    small = tmp_path / "accumulated"
    accumulated = ["training.micro_batch_size=2", "training.gradient_accumulation_steps=4"]
    run_training(compose_config(quick(tmp_path, small, *common, *accumulated)))
    tokens = [[r["train/tokens"] for r in read_metrics(d) if "train/loss" in r] for d in (big, small)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 3, f"not the same rows per step: {tokens}"
    difference = max_difference(lora(big), lora(small))
    assert difference < ADAPTER_TOLERANCE, f"max |difference| {difference:.2e} between the adapters"
    assert max(float(t.abs().max()) for k, t in lora(big).items() if "lora_B" in k) > 1e-4, "nothing was trained"


def test_grouped_micro_batches_weigh_tokens_across_the_window(tmp_path, bases):
    """group_by_length batches rows of similar length: 4 such micro batches of 2 make the update of those 8 rows
    padded together (tokens, not micro batches, are averaged). Not on q/k, as in the accumulation test: with q/k on
    this AMD machine's build of tiny-llama, layer 0's q/k adapters (rounding-noise gradients, Adam-scaled) differed
    by 1.7e-5."""
    from distributed_peft.data.task_data import collate_padded

    def one_step(windows_of: int) -> dict[str, torch.Tensor]:
        out = tmp_path / f"g{windows_of}"
        cfg = compose_config(quick(tmp_path, out, "training.packing=group_by_length", EXACT_LR, NO_QUERY_KEY))
        recipe = FinetuneRecipe(cfg)
        recipe.setup()
        rows = sorted(recipe.runs[0].data.train[:8], key=lambda e: len(e["input_ids"]))
        size = 8 // windows_of
        window = [collate_padded(rows[i : i + size], recipe.tokenizer) for i in range(0, 8, size)]
        recipe.model.train()
        recipe.position = (0, 0)
        metrics = recipe.train_step(window)
        weights = {n: p.detach().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}
        recipe.cleanup()
        assert metrics["train/tokens"] == sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        return weights

    one, four = one_step(1), one_step(4)
    difference = max_difference(one, four)
    assert difference < ADAPTER_TOLERANCE, f"max |difference| {difference:.2e}"
    assert max(float((one[k]).abs().max()) for k in one if "lora_B" in k) > 0, "the step changed nothing"


# ---------------------------------------------------------------------------------------------------- SIGTERM
def sigterm_self_then(wait: float = 0.0):
    """A replacement for a phase's function: SIGTERM arrives while it runs (then it would go on for `wait` s)."""

    def phase(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(wait)
        raise AssertionError(f"SIGTERM did not stop the command within {wait} s")

    return phase


@pytest.fixture
def sigterm_guard():
    """Were SIGTERM left to its default action it would end pytest itself: fail the test instead."""

    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached no handler of the command")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize(
    "target,phase",
    [
        ("distributed_peft.data.task_data.prepare_task_data", "loading and tokenizing the data"),
        ("distributed_peft.evaluation.evaluator.evaluate_base_and_adapter", "evaluating the adapter against the base"),
        ("distributed_peft.evaluation.evaluator.generate_completions", "evaluating the adapter against the base"),
    ],
)
def test_sigterm_stops_loading_evaluation_and_generation_at_once(
    target, phase, monkeypatch, tmp_path, bases, sigterm_guard
):
    patch_everywhere(monkeypatch, *target.rsplit(".", 1), sigterm_self_then(90))
    out = tmp_path / "run"
    started = time.monotonic()
    extra = ["training.max_steps=2", "evaluation.generate=true", "evaluation.max_generate_examples=2",
             "evaluation.show_examples=1"]  # fmt: skip
    code, lines = run_entry(monkeypatch, "dpeft-train", quick(tmp_path, out, *extra))
    assert time.monotonic() - started < 60
    assert code == PREEMPTED_EXIT_CODE
    assert lines == [f"dpeft-train: preempted: SIGTERM while {phase}: stopped; rerun the same command to start again "
                     "or resume"]  # fmt: skip
    if "prepare_task_data" in target:
        assert not out.exists(), "a run stopped before training removes the directory it created"
    else:
        assert (out / "adapter" / "adapter_model.safetensors").is_file(), "the adapter is saved before evaluating"


def test_sigterm_during_an_evaluation_between_steps_checkpoints_and_stops(monkeypatch, tmp_path, bases, sigterm_guard):
    from distributed_peft.evaluation import evaluator as evaluate

    real = evaluate.completion_token_stats
    monkeypatch.setattr(
        evaluate,
        "completion_token_stats",
        lambda *a: (os.kill(os.getpid(), signal.SIGTERM), real(*a))[1],
    )
    out = tmp_path / "run"
    extra = [
        "training.max_steps=6",
        "training.eval_steps=2",
        "training.checkpoint_every=0",
        "training.eval_batch_size=1",
    ]
    code, lines = run_entry(monkeypatch, "dpeft-train", quick(tmp_path, out, *extra))
    assert code == PREEMPTED_EXIT_CODE
    assert len(lines) == 1 and "SIGTERM: stopped at step 2 of 6" in lines[0], lines
    [checkpoint] = list_checkpoints(out)
    assert json.loads((checkpoint / TRAINER_STATE).read_text())["reason"] == "sigterm"
    assert not any("eval/loss" in r for r in read_metrics(out)), "a cut-short evaluation is not logged as a result"


@pytest.mark.slow
def test_sigterm_while_saving_lets_the_checkpoint_and_the_adapter_finish(monkeypatch, tmp_path, bases, sigterm_guard):
    from distributed_peft.adapters import storage as adapters

    real_save_state = None

    def save_state_then_sigterm(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the save: deferred to its end
        return real_save_state(self, *args, **kwargs)

    import accelerate

    real_save_state = accelerate.Accelerator.save_state
    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state_then_sigterm)
    out = tmp_path / "run"
    code, lines = run_entry(monkeypatch, "dpeft-train", quick(tmp_path, out, "training.max_steps=6",
                                                               "training.checkpoint_every=2"))  # fmt: skip
    assert code == PREEMPTED_EXIT_CODE and "stopped at step" in lines[0]
    assert all(checkpoint_problem(c) is None for c in list_checkpoints(out)) and list_checkpoints(out)

    monkeypatch.undo()
    real_save_adapter = adapters.save_adapter

    def save_adapter_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save_adapter(*args, **kwargs)

    monkeypatch.setattr(adapters, "save_adapter", save_adapter_then_sigterm)
    code, lines = run_entry(monkeypatch, "dpeft-train", quick(tmp_path, out, "training.max_steps=6",
                                                               "training.checkpoint_every=2"))  # fmt: skip
    assert code == PREEMPTED_EXIT_CODE and lines[0].startswith(
        "dpeft-train: preempted: SIGTERM while saving the adapter"
    )
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------- resume
@pytest.fixture
def checkpointed(tmp_path, bases) -> Path:
    """A finished 4-step run with a checkpoint at steps 2 and 4."""
    out = tmp_path / "run"
    run_training(compose_config(quick(tmp_path, out, "training.max_steps=4", "training.checkpoint_every=2")))
    return out


@pytest.mark.slow
def test_resume_with_changed_settings_is_refused_in_one_line_naming_them(checkpointed, tmp_path, monkeypatch):
    base = quick(tmp_path, checkpointed, "training.max_steps=4", "training.checkpoint_every=2")
    for changed, named in [
        (["training.lr=0.01"], "training.lr 0.003 -> 0.01"),
        (["peft.alpha=8"], "peft.alpha 32 -> 8"),
        (["training.gradient_accumulation_steps=2"], "training.gradient_accumulation_steps 1 -> 2"),
        (["training.seed=1"], "training.seed 42 -> 1"),
    ]:
        code, lines = run_entry(monkeypatch, "dpeft-train", [*base, *changed])
        assert code == USER_ERROR_EXIT_CODE and len(lines) == 1, lines
        assert named in lines[0] and "training.resume=false" in lines[0] and "training.resume=force" in lines[0]

    write_pairs(tmp_path / "pairs.jsonl", 22, seed=1)  # the same file name, other content
    code, lines = run_entry(monkeypatch, "dpeft-train", base)
    assert code == USER_ERROR_EXIT_CODE and "data.sha256" in lines[0], lines


@pytest.mark.slow
def test_free_settings_may_change_and_force_continues_and_is_recorded(checkpointed, tmp_path, capsys):
    free = ["logging.log_every_steps=2", "training.checkpoint_every=3", "training.keep_checkpoints=1",
            "evaluation.max_new_tokens=4", "training.eval_steps=1"]  # fmt: skip
    run_training(compose_config(quick(tmp_path, checkpointed, "training.max_steps=4", *free)))
    assert "resume: continuing from" in capsys.readouterr().out

    extra = ["training.max_steps=6", "training.lr=0.01", "training.resume=force"]
    run_training(compose_config(quick(tmp_path, checkpointed, *extra)))
    out = capsys.readouterr().out
    assert "training.resume=force: continuing although" in out and "training.lr 0.003 -> 0.01" in out
    run = json.loads((checkpointed / "adapter" / "dpeft_adapter.json").read_text())["run"]
    assert run["optimizer_steps"] == 6 and run["resumed_from_step"] == 4
    assert any("training.lr 0.003 -> 0.01" in c for forced in run["forced_resumes"] for c in forced["changed"])
    lrs = {r["step"]: r["train/lr"] for r in read_metrics(checkpointed) if "train/lr" in r}
    assert lrs[5] == pytest.approx(0.01), "the forced run trains with its own learning rate, not the checkpoint's"


def test_recorded_steps_are_true_when_a_checkpoint_is_past_the_new_end(checkpointed, tmp_path, monkeypatch):
    """No "step 4 of 2": a checkpoint beyond this run's steps is refused, even with force."""
    for mode in ("auto", "force"):
        args = quick(tmp_path, checkpointed, "training.max_steps=2", f"training.resume={mode}")
        code, lines = run_entry(monkeypatch, "dpeft-train", args)
        assert code == USER_ERROR_EXIT_CODE and len(lines) == 1, lines
    assert "is at step 4, past this run's 2 optimizer steps" in lines[0]
    run = json.loads((checkpointed / "adapter" / "dpeft_adapter.json").read_text())["run"]
    assert run["optimizer_steps"] == 4, "the refused reruns left the finished adapter as it was"


# ---------------------------------------------------------------------------------------------------- directories
def test_a_locked_directory_is_refused_naming_the_holder_and_freed_by_kill_9(tmp_path, monkeypatch, bases):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from distributed_peft.runtime.output_dirs import DirectoryLock; "
            f"DirectoryLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(300)",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        code, lines = run_entry(monkeypatch, "dpeft-train", quick(tmp_path, out, "training.max_steps=1"))
        assert code == USER_ERROR_EXIT_CODE and len(lines) == 1, lines
        assert f"is in use by another run (PID {holder.pid} on" in lines[0]
        assert time.monotonic() - started < 30
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE], "the refused run wrote nothing"
    finally:
        holder.kill()  # SIGKILL: the OS drops the lock
        holder.wait()
    DirectoryLock(out).acquire().release()


def test_output_dir_holding_the_users_files_is_refused_touching_nothing(tmp_path, monkeypatch, bases):
    home = tmp_path / "home"
    (home / "project").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    before = {p: p.stat().st_mtime_ns for p in home.rglob("*")}
    monkeypatch.chdir(home)
    for target in (".", str(home), "project/.."):
        monkeypatch.setenv("HOME", str(home))
        code, lines = run_entry(monkeypatch, "dpeft-train", quick(tmp_path, Path(target), "training.max_steps=1"))
        assert code == USER_ERROR_EXIT_CODE and len(lines) == 1, lines
        assert "holds files distributed-peft did not write" in lines[0]
    assert {p: p.stat().st_mtime_ns for p in home.rglob("*")} == before


def test_a_failed_run_removes_only_what_it_created(tmp_path, monkeypatch, bases):
    bad = ["training.max_seq_len=4", "training.truncation=drop"]  # refused once the data is tokenized
    fresh = tmp_path / "fresh" / "run"
    code, _ = run_entry(monkeypatch, "dpeft-train", quick(tmp_path, fresh, "training.max_steps=1", *bad))
    assert code == USER_ERROR_EXIT_CODE and not (tmp_path / "fresh").exists(), "created directories are removed"

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _ = run_entry(monkeypatch, "dpeft-train", quick(tmp_path, empty, "training.max_steps=1", *bad))
    assert code == USER_ERROR_EXIT_CODE and empty.is_dir() and not any(empty.iterdir()), "it existed: it stays"


def test_a_crash_in_the_final_evaluation_never_loses_the_adapter(tmp_path, monkeypatch, bases):
    from distributed_peft.evaluation import evaluator as evaluate

    def broken(*args, **kwargs):
        raise IndexError("a bug in a report")

    monkeypatch.setattr(evaluate, "evaluate_base_and_adapter", broken)
    out = tmp_path / "run"
    with pytest.raises(IndexError):
        run_training(compose_config(quick(tmp_path, out, "training.max_steps=2")))
    metadata = json.loads((out / "adapter" / "dpeft_adapter.json").read_text())
    assert metadata["run"]["optimizer_steps"] == 2 and metadata["eval"] is None
    assert max(float(t.abs().max()) for k, t in lora(out).items() if "lora_B" in k) > 0


@pytest.mark.slow
def test_multirun_jobs_get_their_own_directories(tmp_path, monkeypatch, bases):
    from hydra.core.global_hydra import GlobalHydra

    from distributed_peft.cli import train

    monkeypatch.chdir(tmp_path)
    args = [a for a in quick(tmp_path, tmp_path, "training.max_steps=1") if not a.startswith("output_dir=")]
    for extra in ([], ["output_dir=sweep"]):
        GlobalHydra.instance().clear()
        monkeypatch.setattr(sys, "argv", ["dpeft-train", "-m", *args, *extra, "training.lr=0.001,0.002"])
        train.main()
        GlobalHydra.instance().clear()
    jobs = sorted(tmp_path.glob("runs/multirun/*/*/adapter")) + sorted(tmp_path.glob("sweep/*/adapter"))
    assert [p.parent.name for p in jobs] == ["0", "1", "0", "1"], jobs
    lrs = [json.loads((p / "dpeft_adapter.json").read_text())["config"]["training"]["lr"] for p in jobs]
    assert lrs == [0.001, 0.002, 0.001, 0.002]
    assert all((p.parent / OWNER_MARKER).is_file() for p in jobs)


def test_a_lora_rank_wider_than_a_local_base_is_refused_before_its_weights_load(tmp_path, monkeypatch, bases):
    """A base from a directory (not embedded): its width comes from its config.json, read before any weight."""
    from distributed_peft.modeling import loading as model

    monkeypatch.setattr(model, "load_base_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    local = ["model=llama-3.2-1b", f"model.name_or_path={bases['tiny-llama']}", "peft.r=512"]
    code, lines = run_entry(monkeypatch, "dpeft-train", quick(tmp_path, tmp_path / "run", *local))
    assert code == USER_ERROR_EXIT_CODE and len(lines) == 1, lines
    assert "peft.r=512 is invalid; it must be <= 128, the width (hidden size) of model llama-3.2-1b" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("prog,override", [("dpeft-reproduce", "task.lr=2"), ("dpeft-explore", "model.foo=2")])
def test_a_key_under_a_group_the_command_left_empty_is_one_line(prog, override, monkeypatch):
    code, lines = run_entry(monkeypatch, prog, [override])
    group = override.split(".")[0]
    assert code == USER_ERROR_EXIT_CODE and lines == [
        f"{prog}: error: {override} sets a key of {group!r}, which {prog.split('-')[1]}.yaml leaves empty; "
        f"allowed: choose it first ({group}=NAME) or drop the key"
    ]


def test_third_party_notices_are_silenced_unless_debug(monkeypatch, capsys):
    import logging
    import warnings

    from distributed_peft.runtime import tracking

    monkeypatch.delenv("DPEFT_DEBUG", raising=False)
    for name in tracking.QUIET_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracking.quiet_third_party_notices(debug=True)
        assert all(logging.getLogger(n).filter(logging.makeLogRecord({"levelno": 30})) for n in tracking.QUIET_LOGGERS)
        warnings.warn("shown with logging.debug=true", FutureWarning, stacklevel=1)
        tracking.quiet_third_party_notices(debug=False)
        warnings.warn("silenced", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["shown with logging.debug=true"]
    for name in tracking.QUIET_LOGGERS:
        logger = logging.getLogger(name)
        assert not logger.filter(logging.makeLogRecord({"levelno": logging.WARNING}))
        assert logger.filter(logging.makeLogRecord({"levelno": logging.ERROR})), "errors still reach the user"


# A process whose `deepspeed.ops` is a stand-in: its lazy `__compatible_ops__` is DeepSpeed's probe of which ops the
# machine can build (compiler command lines through the root logger, a print per op it cannot build), and the setup
# reads it, then prints the comm op's notice and a line of its own, as the Accelerator's DeepSpeed setup does.
FAKE_DEEPSPEED_SETUP = """
import logging, subprocess, sys, types
from distributed_peft.runtime.tracking import quiet_deepspeed_setup

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")  # Hydra's stdout job logging
ops = types.ModuleType("deepspeed.ops")

def probe():
    logging.getLogger().info("gcc -fPIC -c /tmp/tmpab/test.c -o /tmp/tmpab/test.o")
    print(" [WARNING]  async_io requires the dev libaio .so object and headers but these were not found.")
    subprocess.run(["sh", "-c", "echo compiler stderr >&2"])
    if sys.argv[1] == "fail":
        raise RuntimeError("probe failed")
    ops.__compatible_ops__ = {}
    return ops.__compatible_ops__

ops.__getattr__ = lambda name: probe()
sys.modules["deepspeed"], sys.modules["deepspeed.ops"] = types.ModuleType("deepspeed"), ops
sys.modules["deepspeed"].ops = ops
with quiet_deepspeed_setup(debug=sys.argv[1] == "debug"):
    sys.modules["deepspeed.ops"].__compatible_ops__
    print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    print("a line of the setup")
"""


@pytest.mark.parametrize("mode", ["quiet", "debug", "fail"])
def test_deepspeed_setup_notices_are_silenced_where_they_arise(mode):
    """Quiet: only the setup's own line; logging.debug: everything; a failing probe: what it printed, on stderr."""
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true"}
    env.pop("DPEFT_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-c", FAKE_DEEPSPEED_SETUP, mode], capture_output=True, text=True, env=env, timeout=60
    )
    probe = ["-o /tmp/tmpab/test.o", "async_io requires", "compiler stderr"]
    if mode == "quiet":
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "a line of the setup\n", "")
    elif mode == "debug":
        assert proc.returncode == 0 and "built successfully" in proc.stdout
        assert all(line in proc.stdout + proc.stderr for line in probe)
    else:
        assert proc.returncode == 1 and "a line of the setup" not in proc.stdout
        assert all(line in proc.stderr for line in [*probe, "RuntimeError: probe failed"])


def test_shipped_adapters_name_their_base_portably():
    from conftest import PROJECT_ROOT

    configs = sorted((PROJECT_ROOT / "adapters_prebuilt").glob("*/adapter_config.json"))
    assert len(configs) == 3
    for config in configs:  # the original's Hub id (the GGUF it was converted from is in dpeft_adapter.json)
        assert json.loads(config.read_text())["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    "option,module,extra",
    [
        ("peft=qlora", "bitsandbytes", "qlora"),
        ("distributed=zero3", "deepspeed", "deepspeed"),
        ("logging=wandb", "wandb", "wandb"),
        ("logging=tensorboard", "tensorboard", "tensorboard"),
    ],
)
def test_a_feature_whose_extra_is_missing_is_one_line_naming_the_extra(option, module, extra, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    lora = [] if option.startswith("peft") else ["peft=lora"]  # only the option under test needs the extra
    code, lines = run_entry(monkeypatch, "dpeft-train", [option, *lora, f"output_dir={tmp_path / 'run'}"])
    assert code == USER_ERROR_EXIT_CODE and len(lines) == 1, lines
    assert f"needs {module}, which is not installed; allowed: pip install 'distributed-peft[{extra}]'" in lines[0]
