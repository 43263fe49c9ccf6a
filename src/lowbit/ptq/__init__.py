"""Post-training quantization: planning which layers to quantize, and prepare -> calibrate -> convert."""

from lowbit.ptq.convert import calibrate, convert, prepare, quantized_layers
from lowbit.ptq.plan import LayerPlan, Plan, plan_model

__all__ = ["LayerPlan", "Plan", "calibrate", "convert", "plan_model", "prepare", "quantized_layers"]
