"""The guided tour's steps: each one full set of settings (from the defaults), and what to look at.

Nothing here claims a result; the page measures each step on the current model when it is applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qcore.quantize.config import QuantConfig, make_config


@dataclass(frozen=True)
class TourStep:
    title: str
    changes: dict[str, object] = field(default_factory=dict)  # from the default QuantConfig
    look_at: str = ""


TOUR: tuple[TourStep, ...] = (
    TourStep("8 bits everywhere (the default)", {}, "the sidebar: quantized against float accuracy."),
    TourStep(
        "4-bit weights and activations",
        {"weight_bits": 4, "act_bits": 4},
        "the Weights page: how many levels each histogram has now.",
    ),
    TourStep(
        "2-bit weights: ternary, {-1, 0, +1} times a scale",
        {"weight_bits": 2},
        "the Weights page at one channel: three levels; and the accuracy in the sidebar.",
    ),
    TourStep(
        "4-bit activations with min/max ranges instead of MSE",
        {"weight_bits": 4, "act_bits": 4, "observer": "minmax"},
        "the Activations page: observed against clipped ranges; compare the accuracy with step 2.",
    ),
    TourStep(
        "4-bit weights with one scale per layer (per-tensor)",
        {"weight_bits": 4, "act_bits": 4, "granularity": "per-tensor"},
        "the Weights page's SQNR column; compare the accuracy with step 2.",
    ),
    TourStep(
        "2-bit weights, but fc1 kept in float",
        {"weight_bits": 2, "float_layers": ["fc1"]},
        "the Diagnose page: how much of step 3's drop was fc1's.",
    ),
    TourStep(
        "2-bit weights with AdaRound",
        {"weight_bits": 2, "methods": ["adaround"]},
        "the Methods page: which weights AdaRound rounded the other way; compare with step 3.",
    ),
)


def step_config(step: TourStep) -> QuantConfig:
    return make_config(**{**QuantConfig().to_dict(), **step.changes})
