"""Named task lists of published evaluations: each task with its few-shot count and the metric averaged.

``sheared-llama`` is the list behind Sheared-LLaMA's reported averages (its ``icl_eval`` scripts, in
today's lm-eval task names); ``minitron`` is the set the Llama-3.1-Minitron report gives. The reference
averages are the ones those models' cards and reports print.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PresetTask:
    """One task of a preset: its lm-eval name, few-shot count and the metric key (``name,filter``) averaged."""

    task: str
    num_fewshot: int
    metric: str


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    tasks: tuple[PresetTask, ...]
    # model -> reported average (percent) over exactly these tasks and metrics
    reference: dict[str, float] = field(default_factory=dict)
    # model -> {task: reported score (percent)} where the source lists tasks one by one
    reference_tasks: dict[str, dict[str, float]] = field(default_factory=dict)


SHEARED_LLAMA = Preset(
    name="sheared-llama",
    description="Sheared-LLaMA's 11 tasks (paper average): 0-shot SciQ, PIQA, WinoGrande, ARC-E, LogiQA (acc_norm), "
    "LAMBADA; ARC-C 25-shot and HellaSwag 10-shot (acc_norm); BoolQ and NQ-open 32-shot; MMLU 5-shot",
    tasks=(
        PresetTask("sciq", 0, "acc,none"),
        PresetTask("piqa", 0, "acc,none"),
        PresetTask("winogrande", 0, "acc,none"),
        PresetTask("arc_easy", 0, "acc,none"),
        PresetTask("arc_challenge", 25, "acc_norm,none"),
        PresetTask("hellaswag", 10, "acc_norm,none"),
        PresetTask("logiqa", 0, "acc_norm,none"),
        PresetTask("boolq", 32, "acc,none"),
        PresetTask("lambada_openai", 0, "acc,none"),
        PresetTask("nq_open", 32, "exact_match,remove_whitespace"),
        PresetTask("mmlu", 5, "acc,none"),
    ),
    reference={
        "LLaMA2-7B": 64.6,
        "Sheared-LLaMA-2.7B": 56.7,
        "Sheared-LLaMA-1.3B": 51.0,
        "Pythia-1.4B": 48.9,
        "OPT-1.3B": 48.2,
        "INCITE-Base-3B": 54.7,
        "OpenLLaMA-3B-v2": 55.7,
    },
)

MINITRON = Preset(
    name="minitron",
    description="Minitron's reported base-model set: WinoGrande 5-shot, ARC-C 25-shot (acc_norm), MMLU 5-shot, "
    "HellaSwag 10-shot (acc_norm), GSM8K 5-shot (strict match), TruthfulQA mc2 0-shot",
    tasks=(
        PresetTask("winogrande", 5, "acc,none"),
        PresetTask("arc_challenge", 25, "acc_norm,none"),
        PresetTask("mmlu", 5, "acc,none"),
        PresetTask("hellaswag", 10, "acc_norm,none"),
        PresetTask("gsm8k", 5, "exact_match,strict-match"),
        PresetTask("truthfulqa_mc2", 0, "acc,none"),
    ),
    reference_tasks={
        "Llama-3.1-Minitron-4B-Width": {
            "mmlu": 60.5,
            "hellaswag": 76.1,
            "winogrande": 73.5,
            "arc_challenge": 55.6,
            "gsm8k": 41.2,
        },
    },
)

PRESETS: dict[str, Preset] = {preset.name: preset for preset in (SHEARED_LLAMA, MINITRON)}
