"""The package as users get it: a wheel installed into a fresh virtualenv, used from a directory outside the checkout.

The wheel is built from the checkout's files (tracked and new, as a clean clone would have them), installed with
pip into an empty venv with constraints.txt (the exact tested set), and the demo (build base, train, evaluate) runs
from a temporary directory: the config tree, launch templates, prebuilt adapters and the embedded base's recipe must
all come from inside the installed package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT_ROOT, TEST_HOME

pytestmark = pytest.mark.slow

PACKAGE_FILE_SUFFIXES = (".py", ".yaml", ".json", ".jsonl", ".txt", ".sbatch", ".safetensors", ".md", ".png")


def checkout_files() -> list[str]:
    """What a clean clone of this checkout holds: tracked files and new ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted({name for name in listed.split("\0") if name and os.path.lexists(PROJECT_ROOT / name)})


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """A wheel of this checkout, pip-installed with the constraints into a venv that starts empty."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"
    for name in checkout_files():
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / name, target, follow_symlinks=False)
    pip = [sys.executable, "-m", "pip"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), str(source)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (root / "dist").glob("distributed_peft-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    install = subprocess.run(  # the venv's own interpreter, our pip: an empty environment with no pip inside
        [*pip, "--python", str(venv / "bin" / "python"), "install", "-q", "--no-compile"]
        + ["-c", str(PROJECT_ROOT / "constraints.txt"), f"{wheel}[qlora]"],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return {"wheel": wheel, "venv": venv, "bin": venv / "bin", "work": Path(tmp_path_factory.mktemp("elsewhere"))}


def run(installed: dict[str, Path], *cmd: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """A command of the installed venv, from a directory outside the checkout, with nothing of the checkout on PATH."""
    # PYTHONDONTWRITEBYTECODE would make every command of the fresh venv compile torch and transformers again (~10 s)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")}
    env["PATH"] = f"{installed['bin']}:/usr/bin:/bin"
    env["DPEFT_HOME"] = str(TEST_HOME)  # the session's embedded bases: the recipe below must name the same base
    return subprocess.run(
        [str(installed["bin"] / cmd[0]), *cmd[1:]],
        cwd=installed["work"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_wheel_holds_every_file_of_the_package(installed):
    """Config tree, launch templates, prebuilt adapters, sample corpora: whatever the package holds, the wheel holds."""
    in_wheel = set(zipfile.ZipFile(installed["wheel"]).namelist())
    packages = ("distributed_peft/", "hydra_plugins/")  # hydra_plugins: our submitit launchers, where Hydra looks
    wanted = [n for n in checkout_files() if n.startswith(packages) and n.endswith(PACKAGE_FILE_SUFFIXES)]
    missing = [n for n in wanted if n not in in_wheel]
    assert not missing, f"files of the package missing from the wheel: {missing[:20]}"
    for shipped in (
        "conf/config.yaml",
        "conf/task/detox.yaml",
        "conf/hydra/launcher/slurm.yaml",
        "launch/accelerate/zero3.yaml",
        "launch/skypilot/train.yaml",
        "conf/__init__.py",
    ):
        assert f"distributed_peft/{shipped}" in in_wheel
    assert any(n.startswith("distributed_peft/adapters_prebuilt/detox/") for n in in_wheel)
    metadata = zipfile.ZipFile(installed["wheel"]).read(next(n for n in in_wheel if n.endswith(".dist-info/METADATA")))
    requires = [line for line in metadata.decode().splitlines() if line.startswith("Requires-Dist:")]
    pinned = [line for line in requires if "==" in line.split(";")[0]]  # `extra == "qlora"` is a marker, not a pin
    assert requires and not pinned, f"dependencies must be ranges, never ==: {pinned}"


def test_installed_wheel_runs_the_demo_from_another_directory(installed, bases):
    where = run(installed, "python", "-c", "import distributed_peft, torch; print(distributed_peft.__file__)")
    assert where.returncode == 0, where.stderr[-2000:]
    assert str(installed["venv"]) in where.stdout and str(PROJECT_ROOT) not in where.stdout

    built = run(installed, "dpeft-build-base", "model=tiny-llama")
    assert built.returncode == 0, built.stderr[-2000:]
    assert str(bases["tiny-llama"]) in built.stdout  # the packaged recipe names the base the checkout built

    out = installed["work"] / "runs" / "demo"
    train = run(
        installed,
        "dpeft-train",
        "task=detox",
        "model=tiny-llama",
        "peft=qlora",
        "training=demo",
        "training.max_steps=4",
        "training.eval_steps=0",
        "training.max_eval_examples=16",
        "evaluation.max_generate_examples=4",
        "logging.progress_bar=false",
        f"output_dir={out}",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    base_name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_name == "tiny-llama", base_name

    evaluation = run(
        installed,
        "dpeft-eval",
        f"adapter={adapter}",
        "output_dir=eval",
        "evaluation.max_generate_examples=4",  # how to evaluate is dpeft-eval's own choice (default 64 generations)
        "logging.progress_bar=false",
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    metrics = json.loads((installed["work"] / "eval" / "eval.json").read_text())
    assert metrics["adapter"]["loss"] < metrics["base"]["loss"]

    template = run(installed, "dpeft-launch", "--print-config", "zero3")
    assert template.returncode == 0, template.stderr[-2000:]
    assert yaml.safe_load(template.stdout)["distributed_type"] == "DEEPSPEED"
