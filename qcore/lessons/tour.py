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
    compare_with: int | None = None  # the step whose accuracy this one is read against (0-based)


NOISE_POINTS = 0.2  # steps closer than this (20 of 10,000 test images) are not told apart
TWO_BIT_STEP = 2  # "2-bit weights": its one-layer-at-a-time measurement picks the layer step 6 keeps float
FLOAT_LAYER_STEP = 5

_STEPS: tuple[TourStep, ...] = (
    TourStep("8 bits everywhere (the default)", {}, "the sidebar: quantized against float accuracy."),
    TourStep(
        "4-bit weights and activations",
        {"weight_bits": 4, "act_bits": 4},
        "the Weights page: how many levels each histogram has now.",
        compare_with=0,
    ),
    TourStep(
        "2-bit weights: ternary, {-1, 0, +1} times a scale",
        {"weight_bits": 2},
        "the Weights page at one channel: three levels; and the accuracy in the sidebar.",
        compare_with=0,
    ),
    TourStep(
        "4-bit activations with min/max ranges instead of MSE",
        {"weight_bits": 4, "act_bits": 4, "observer": "minmax"},
        "the Activations page: observed against clipped ranges; compare the accuracy with step 2.",
        compare_with=1,
    ),
    TourStep(
        "4-bit weights with one scale per layer (per-tensor)",
        {"weight_bits": 4, "act_bits": 4, "granularity": "per-tensor"},
        "the Weights page's SQNR column; compare the accuracy with step 2.",
        compare_with=1,
    ),
    TourStep("2-bit weights, one layer kept in float", {"weight_bits": 2}, "", compare_with=2),  # tour_for
    TourStep(
        "2-bit weights with AdaRound",
        {"weight_bits": 2, "methods": ["adaround"]},
        "the Methods page: which weights AdaRound rounded the other way; compare with step 3.",
        compare_with=2,
    ),
)

TOUR_STEPS = len(_STEPS)


def tour_for(two_bit_drops: dict[str, float]) -> tuple[TourStep, ...]:
    """The tour on one model. `two_bit_drops`: each layer's accuracy drop (fraction of 1) when only it is
    quantized at step 3's settings (qcore.analysis.tables.layer_sensitivity), measured on this model:
    step 6 keeps float the layer that costs the most, by name, whatever the architecture."""
    if not two_bit_drops:
        raise ValueError("the tour needs at least one layer's measured drop")
    layer = max(two_bit_drops, key=lambda name: two_bit_drops[name])
    float_step = TourStep(
        f"2-bit weights, but {layer} kept in float",
        {"weight_bits": 2, "float_layers": [layer]},
        f"the Diagnose page: how much of step 3's drop was {layer}'s. Quantized alone at 2 bits, {layer} costs "
        f"{100 * two_bit_drops[layer]:.2f} points, the most of any layer of this model.",
        compare_with=TWO_BIT_STEP,
    )
    return tuple(float_step if index == FLOAT_LAYER_STEP else step for index, step in enumerate(_STEPS))


def step_config(step: TourStep) -> QuantConfig:
    """The step's full config (from the defaults); its float layer comes from the model's own measured
    layers (tour_for), so it is not checked against the notebook's net's names here."""
    return make_config(None, **{**QuantConfig().to_dict(), **step.changes})


def sensitivity_config() -> QuantConfig:
    """The config whose one-layer-at-a-time drops choose step 6's layer (step 3's)."""
    return step_config(_STEPS[TWO_BIT_STEP])


def within_noise(accuracy: float, other: float) -> bool:
    return abs(100 * (accuracy - other)) < NOISE_POINTS
