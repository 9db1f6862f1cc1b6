"""Quantization-aware training (QAT): fine-tune a float Net with the simulation's quantizer in the
forward pass, so that the network learns to live on the grid it will be deployed on.

The forward pass is QuantizedNet's, op for op: each layer's input fake-quantized affine at
`act_bits` (round(x / s) + z, clamped, minus z, times s; round half to even), weights per-channel
symmetric at `weight_bits`, bias rounded at s_in * s_w, the logits left at the accumulator's scale.
Rounding has no useful derivative, so the backward pass uses the straight-through estimator
(Bengio et al. 2013): d round(v) / dv := 1, so inside the clipping range the quantizer passes the
gradient unchanged and outside it passes zero (the clamp's own derivative).

Two ways to choose the grid while training:
  lsq  Learned Step size Quantization (Esser et al. 2019): every scale s is a parameter. With
       v = x / s, Qn = qmin - z and Qp = qmax - z, the quantizer x' = s * clamp(round(v), Qn, Qp)
       has dx'/ds = round(v) - v inside the range, Qn below it and Qp above it, scaled by
       g = 1 / sqrt(N * Qp) (N: values sharing the scale) so that step sizes learn at the pace of
       the weights. Scales start from PTQ calibration (the default QuantConfig at the same bits).
  ste  A plain STE: weight scales stay at their PTQ values and each activation range follows an
       exponential moving average of the batch min and max (torch.ao's 0.01), as PyTorch's QAT does.

After training, `to_quantized_net` turns the trained weights and scales into a QuantizedNet (integer
weights, int32 bias), the same object PTQ builds, so the integer engine, the exports and every page
use it as they are. `save_qat` writes it as a tensors-only file; `load_qat` reads one back with the
same bounds as a state_dict.

The package by role (as torchao's qat/): config (the settings), fake_quantizer (the quantizer and its
gradients), network (the model being trained and the deployed model it gives), training (the loop
and the control), checkpoint (the file format and its strict reader).
"""

from qcore.training.qat.checkpoint import (
    MAX_META_CHARS,
    QAT_FORMAT,
    QAT_GRAPH_FORMAT,
    QPARAM_KEYS,
    QatCheckpoint,
    checkpoint_from_state,
    checkpoint_of,
    claims_qat,
    imported_qat,
    load_checkpoint,
    load_qat,
    qat_bytes,
    qat_fingerprint,
    qat_from_state,
    qat_state,
    valid_snapshots,
)
from qcore.training.qat.config import (
    BIAS_HEADROOM_BITS,
    CHANNEL_STEP_SPAN_BITS,
    EMA_CONSTANT,
    HELD_OUT,
    HISTOGRAM_BINS,
    MAX_QAT_EPOCHS,
    MIN_SCALE,
    QAT_METHODS,
    QatConfig,
    QatError,
)
from qcore.training.qat.fake_quantizer import (
    fake_quantize_ste,
    lsq_gradient_factor,
)
from qcore.training.qat.network import (
    QatNet,
    to_quantized_net,
)
from qcore.training.qat.training import (
    QatProgress,
    QatResult,
    qat,
    qat_control,
    weight_snapshot,
)

__all__ = [
    "BIAS_HEADROOM_BITS",
    "CHANNEL_STEP_SPAN_BITS",
    "EMA_CONSTANT",
    "HELD_OUT",
    "HISTOGRAM_BINS",
    "MAX_META_CHARS",
    "MAX_QAT_EPOCHS",
    "MIN_SCALE",
    "QAT_FORMAT",
    "QAT_GRAPH_FORMAT",
    "QAT_METHODS",
    "QPARAM_KEYS",
    "QatCheckpoint",
    "QatConfig",
    "QatError",
    "QatNet",
    "QatProgress",
    "QatResult",
    "checkpoint_from_state",
    "checkpoint_of",
    "claims_qat",
    "imported_qat",
    "fake_quantize_ste",
    "load_checkpoint",
    "load_qat",
    "lsq_gradient_factor",
    "qat",
    "qat_bytes",
    "qat_control",
    "qat_fingerprint",
    "qat_from_state",
    "qat_state",
    "to_quantized_net",
    "valid_snapshots",
    "weight_snapshot",
]
