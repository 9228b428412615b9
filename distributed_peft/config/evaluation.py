"""The `evaluation` section: generation-based task metrics at the end of training and in dpeft-eval."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from distributed_peft.config.checks import check


@dataclass
class EvaluationConfig:
    """Generation-based task metrics at the end of training and in dpeft-eval (greedy decoding)."""

    generate: bool = True
    max_generate_examples: int = 64  # validation examples decoded by base and adapter
    max_new_tokens: int = 64
    generation_batch_size: int = 16
    show_examples: int = 3  # side-by-side generations in eval.md


def check_evaluation(cfg: DictConfig, problems: list[str]) -> None:
    evaluation, model = cfg.evaluation, cfg.model
    for key in ("max_generate_examples", "max_new_tokens", "generation_batch_size"):
        check(problems, evaluation[key] >= 1, f"evaluation.{key}", evaluation[key], "an integer >= 1")
    if evaluation.max_new_tokens > model.context_length:
        problems.append(
            f"evaluation.max_new_tokens={evaluation.max_new_tokens!r} is invalid; it must be <= "
            f"{model.context_length} (the context length of model {model.name})"
        )
    check(problems, evaluation.show_examples >= 0, "evaluation.show_examples", evaluation.show_examples, ">= 0")
    if evaluation.generate and evaluation.show_examples > evaluation.max_generate_examples >= 1:
        problems.append(
            f"evaluation.show_examples={evaluation.show_examples!r} is invalid with evaluation.max_generate_examples="
            f"{evaluation.max_generate_examples}: eval.md shows generated examples only; allowed: "
            f"evaluation.show_examples <= {evaluation.max_generate_examples}, or a larger max_generate_examples"
        )
