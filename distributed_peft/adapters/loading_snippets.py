"""What a card says about an adapter's base: which weights it was trained on, named truthfully and portably, and the
transformers + peft code that loads the adapter onto that base without distributed-peft where that is possible.

Five kinds of base, told apart by what dpeft_adapter.json records (`base`, and the run's model config):
a Hub checkpoint, a local checkpoint directory, a GGUF file (from a Python package or a local path) dequantized to
float32, an embedded base that distributed-peft builds (tiny-llama, tiny-bloom), and a random-weight test base.
Nothing here names a path of the machine that trained the adapter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

from distributed_peft.config.gguf import PACKAGE_PREFIX
from distributed_peft.modeling.loading import portable_base_name

ADAPTER_PLACEHOLDER = "path/to/this/adapter"  # what a reader replaces with where the adapter is
DPEFT_BASES = "`$DPEFT_HOME/bases/`, by default `~/.cache/distributed_peft/bases/`"
FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}  # GGUF weight types that are not quantized
GGUF_RECORD = re.compile(r"\((?P<quantization>[^(),]+), sha256 (?P<sha>[0-9a-f]+)\)$")  # gguf_base.gguf_source


def base_kind(metadata: dict[str, Any]) -> str:
    """`random`, `gguf`, `embedded`, `local` (a checkpoint directory of the training machine) or `hub`."""
    base = metadata["base"]
    if base.get("weights") in ("random", "gguf"):
        return base["weights"]
    if base.get("recipe") or _recorded(metadata, "model").get("embedded"):
        return "embedded"
    return "local" if portable_base_name(base) != base["name_or_path"] else "hub"


def _recorded(metadata: dict[str, Any], group: str) -> dict[str, Any]:
    """A group of the run config the adapter records (model, task, peft); empty when it records none."""
    return (metadata.get("config") or {}).get(group) or {}


def _dequantized(base: dict[str, Any], verb: bool = False) -> str:
    """How the GGUF's tensors became float32: dequantized, or only converted for a GGUF of float weights."""
    match = GGUF_RECORD.search(base.get("gguf") or "")
    word = "convert" if match and match["quantization"] in FLOAT_TYPES else "dequantize"
    return f"{word}s" if verb else f"{word}d"


def base_description(metadata: dict[str, Any]) -> str:
    """The base as a card's text names it: which weights, where they come from (markdown, one phrase)."""
    base, kind = metadata["base"], base_kind(metadata)
    name, family = portable_base_name(base), base["family"]
    if kind == "gguf":
        file, record = _gguf_origin(metadata)[1], base["gguf"]
        record = f"`{file}`{record.removeprefix(file)}" if record.startswith(file) else record
        return f"the weights of the GGUF {record}, {_dequantized(base)} to float32 ({family}; a GGUF of `{name}`)"
    if kind == "random":
        return f"`{name}` ({family}) with random weights (`model.weights=random`): a test base, not the real model"
    if kind == "embedded":
        recipe = f" (recipe `{base['recipe']}`)" if base.get("recipe") else ""
        return f"`{name}` ({family}), an embedded base built locally by distributed-peft{recipe}, not on the Hub"
    if kind == "local":
        return f"`{name}` ({family}), a checkpoint directory on the machine that trained it"
    return f"`{name}` ({family}) from the Hugging Face Hub"


def base_caveat(metadata: dict[str, Any]) -> str | None:
    """What a reader must know before loading the adapter onto another copy of the base; None when nothing."""
    base, kind = metadata["base"], base_kind(metadata)
    if kind == "gguf":
        original = portable_base_name(base)
        return (
            f"The adapter was trained on the GGUF's weights {_dequantized(base)} to float32, not on the original "
            f"checkpoint `{original}`: loaded onto `{original}` from the Hub it runs on a close base, not the same one."
        )
    if kind == "random":
        return (
            f"The base is `{base['name']}`'s architecture with random weights, built to test the pipeline: it is not "
            "a language model, and the adapter on it is none either."
        )
    return None


def _gguf_origin(metadata: dict[str, Any]) -> tuple[str | None, str, str | None]:
    """(the package's module or None for a local file, the GGUF's file name, the package's pip requirement)."""
    model = _recorded(metadata, "model")
    spec = str(model.get("gguf_file") or metadata["base"]["gguf"].split(" ", 1)[0])
    if spec.startswith(PACKAGE_PREFIX):
        module, _, file = spec.removeprefix(PACKAGE_PREFIX).partition("/")
        return module, file, model.get("gguf_requirement") or module.replace("_", "-")
    return None, PurePath(spec).name, None  # the training machine's path is not the reader's: its name only


def _python(lines: list[str]) -> list[str]:
    return ["```python", *lines, "```", ""]


def _shell(lines: list[str]) -> list[str]:
    return ["```bash", *lines, "```", ""]


def _peft_lines(
    base_lines: list[str], tokenizer_from: str, imports: Sequence[str] = (), adapter_note: str = ""
) -> list[str]:
    """The snippet around the lines that load `base`: imports, the adapter's place, peft and the tokenizer (the
    base's own, as every distributed-peft command loads it: a shipped adapter does not carry a copy)."""
    note = adapter_note or "this README's folder, or the Hub repo id it was pushed to"
    return [
        *imports,
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'ADAPTER = "{ADAPTER_PLACEHOLDER}"  # {note}',
        *base_lines,
        "model = PeftModel.from_pretrained(base, ADAPTER).eval()",
        "# the base's tokenizer, as in training",
        f"tokenizer = AutoTokenizer.from_pretrained({tokenizer_from})",
    ]


def _gguf_snippet(metadata: dict[str, Any]) -> list[str]:
    module, file, requirement = _gguf_origin(metadata)
    base = metadata["base"]
    name = base["name"]
    lines = [
        f"transformers reads the GGUF itself and {_dequantized(base, verb=True)} it to float32 as distributed-peft "
        "did, so this is the base the adapter was trained on:",
        "",
    ]
    load = f"base = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file={json.dumps(file)}, dtype=torch.float32)"
    if module:
        lines += _shell(
            ["pip install peft transformers gguf", f"pip install --no-deps {requirement}  # holds the GGUF"]
        )
        find = [
            f"# the package's folder, found without importing {module} (it needs what --no-deps left out)",
            f"gguf_dir = pathlib.Path(importlib.util.find_spec({json.dumps(module)}).submodule_search_locations[0])",
        ]
        tokenizer_from = f"gguf_dir, gguf_file={json.dumps(file)}"
        imports = ["import importlib.util", "import pathlib", "", "import torch"]
        lines += _python(_peft_lines([*find, load], tokenizer_from, imports))
        build = f"`dpeft-build-base model={name}`"
    else:
        where = f'gguf_dir = pathlib.Path("path/to")  # the folder holding {file} on your machine'
        lines += [f"The GGUF was a local file on the machine that trained the adapter: get `{file}` (sha256 in the "
                  "base line above) and point `gguf_dir` at its folder.", ""]  # fmt: skip
        lines += _shell(["pip install peft transformers gguf"])
        tokenizer_from = f"gguf_dir, gguf_file={json.dumps(file)}"
        lines += _python(_peft_lines([where, load], tokenizer_from, ["import pathlib", "", "import torch"]))
        build = f"`dpeft-build-base model={name} model.gguf_file=path/to/{file}`"
    lines += [
        f"distributed-peft's converted copy of it (the same float32 weights, saved as safetensors) loads without "
        f"converting again: `pip install distributed-peft`, then {build} prints the directory it saved the base in "
        f"(under {DPEFT_BASES}), and `AutoModelForCausalLM.from_pretrained(that_directory)` loads it.",
        "",
    ]
    return lines


def _built_base_snippet(metadata: dict[str, Any]) -> list[str]:
    """An embedded or random-weight base: rebuilt by distributed-peft from the recipe the adapter records."""
    name = metadata["base"]["name"]
    if base_kind(metadata) == "embedded":
        lines = [
            f"`{name}` is not on the Hub: distributed-peft builds it from bundled data (minutes on a CPU), "
            f"into {DPEFT_BASES}. `dpeft-build-base model={name}` builds it and prints its directory; in Python, "
            "from the recipe this adapter recorded:",
            "",
        ]
        lines += _shell(
            ["pip install distributed-peft", f"dpeft-build-base model={name}  # prints: saved in <directory>"]
        )
        build = ["from distributed_peft.modeling.embedded_base import build_base"]
        base_dir = (
            'base_dir = build_base(load_recorded_config(recorded["config"]).model)  # what dpeft-build-base prints'
        )
    else:
        lines = ["A random-weight base is rebuilt by distributed-peft from the recipe this adapter recorded:", ""]
        lines += _shell(["pip install distributed-peft"])
        build = ["from distributed_peft.modeling.random_base import build_random_base"]
        base_dir = 'base_dir, _ = build_random_base(load_recorded_config(recorded["config"]).model)'
    imports = ["import json", "", "from distributed_peft.config import load_recorded_config", *build]
    base_lines = [
        'recorded = json.loads(open(f"{ADAPTER}/dpeft_adapter.json").read())',
        base_dir,
        "base = AutoModelForCausalLM.from_pretrained(base_dir)",
    ]
    note = "this README's folder (with its dpeft_adapter.json)"
    return lines + _python(_peft_lines(base_lines, "base_dir", imports, note))


def _checkpoint_snippet(metadata: dict[str, Any]) -> list[str]:
    """A Hub checkpoint, or a directory of the training machine (named by a placeholder)."""
    name = portable_base_name(metadata["base"])
    if base_kind(metadata) == "hub":
        lines = _shell(["pip install peft transformers"])
        return lines + _python(_peft_lines([f'base = AutoModelForCausalLM.from_pretrained("{name}")'], f'"{name}"'))
    lines = [f"The base was a checkpoint directory on the machine that trained the adapter (model `{name}`); load "
             "your copy of the same weights (its fingerprint is in the base line above).", ""]  # fmt: skip
    lines += _shell(["pip install peft transformers"])
    base = [f'base = AutoModelForCausalLM.from_pretrained("path/to/{name}")']
    return lines + _python(_peft_lines(base, f'"path/to/{name}"'))


def _qlora_note(metadata: dict[str, Any]) -> list[str]:
    """A QLoRA adapter computes as in training only on the base quantized as in training."""
    if metadata["peft"]["method"] != "qlora":
        return []
    quant = _recorded(metadata, "peft").get("quantization") or {}
    quant_type, double = quant.get("quant_type", "nf4"), bool(quant.get("double_quant"))
    config = (
        f'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="{quant_type}", bnb_4bit_use_double_quant={double})'
    )
    how = (
        f"load distributed-peft's converted copy above with `quantization_config={config}` (transformers does not "
        "quantize a model it reads from a GGUF)"
        if base_kind(metadata) == "gguf"
        else f"pass `quantization_config={config}` to the base's `from_pretrained`"
    )
    return [
        f"Trained as QLoRA, on the base quantized to 4-bit ({quant_type}{', double quant' if double else ''}): on "
        "the float32 base above its outputs differ from training's. To compute as in training (as `dpeft-eval` and "
        f"`dpeft-generate` do), `pip install bitsandbytes` and {how}.",
        "",
    ]


def loading_section(metadata: dict[str, Any]) -> list[str]:
    """The card's "Load it with transformers + peft" section: code that runs as written, but for the adapter's place."""
    kind = base_kind(metadata)
    lines = ["## Load it with transformers + peft", ""]
    caveat = base_caveat(metadata)
    if caveat:
        lines += [caveat, ""]
    if kind == "gguf":
        lines += _gguf_snippet(metadata)
    elif kind in ("embedded", "random"):
        lines += _built_base_snippet(metadata)
    else:
        lines += _checkpoint_snippet(metadata)
    if _recorded(metadata, "task").get("prompt_template"):
        lines += ["Prompt it as it was trained: `task.prompt_template` in the composed config below.", ""]
    return lines + _qlora_note(metadata)
