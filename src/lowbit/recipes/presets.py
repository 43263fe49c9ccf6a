"""Named recipes: the presets users pick by name (``lowbit.quantize(model, "int8-dynamic")``)."""

from __future__ import annotations

from lowbit.recipes.spec import ActivationSpec, Recipe, WeightSpec

# Activations: unsigned 8-bit with a zero point suits post-ReLU / GELU data and is what integer
# runtimes (ONNX Runtime's DynamicQuantizeLinear, QLinear ops) expect.
_DYNAMIC = ActivationSpec(mode="dynamic", format="uint8", granularity="token", symmetric=False)
_STATIC = ActivationSpec(
    mode="static", format="uint8", granularity="tensor", symmetric=False, observer="minmax"
)


def _weights(description: str, name: str, short_rows: str = "recipe", **weight: object) -> Recipe:
    return Recipe(name=name, description=description, weight=WeightSpec(**weight), short_rows=short_rows)  # type: ignore[arg-type]


# The presets at 4 bits and below keep layers with short weight rows (depthwise convs) at int8:
# see ``Recipe.short_rows``.
_SHORT = "int8"


def _data_aware(description: str, name: str, **weight: object) -> Recipe:
    # Embeddings and the output head stay at int8: quantizing them to 4 bits by round to nearest
    # cost more than GPTQ gained elsewhere (tiny-gpt on tinyshakespeare, issue 14).
    return Recipe(
        name=name,
        description=f"{description}; embeddings and output head int8",
        weight=WeightSpec(**weight),  # type: ignore[arg-type]
        embeddings_and_head="int8",
        short_rows=_SHORT,
    )


PRESETS: dict[str, Recipe] = {
    r.name: r
    for r in [
        _weights("int8 weights per output channel, float activations", "int8-weight-only", format="int8"),
        Recipe(
            name="int8-dynamic",
            description="int8 weights per channel, uint8 activations quantized per token at run time "
            "(with calibration data: per tensor on a SmoothQuant-ed input where measured as accurate)",
            weight=WeightSpec(format="int8"),
            activation=_DYNAMIC,
            activation_plan="measured",
        ),
        Recipe(
            name="int8-static",
            description="int8 weights per channel, uint8 activations calibrated once (min-max observer)",
            weight=WeightSpec(format="int8"),
            activation=_STATIC,
        ),
        _weights(
            "int4 weights, groups of 64 with zero points, MSE-searched clipping",
            "int4-weight-only",
            short_rows=_SHORT,
            format="uint4",
            granularity="group:64",
            symmetric=False,
            algorithm="mse",
        ),
        _weights(
            "int2 weights, groups of 32 with zero points, MSE-searched clipping",
            "int2-weight-only",
            short_rows=_SHORT,
            format="uint2",
            granularity="group:32",
            symmetric=False,
            algorithm="mse",
        ),
        _data_aware(
            "int4 weights by GPTQ (Hessian error compensation), groups of 64 with zero points; needs data",
            "int4-gptq",
            format="uint4",
            granularity="group:64",
            symmetric=False,
            algorithm="gptq",
        ),
        _data_aware(
            "int3 weights by GPTQ, groups of 64 with zero points; needs calibration data",
            "int3-gptq",
            format="uint3",
            granularity="group:64",
            symmetric=False,
            algorithm="gptq",
        ),
        _data_aware(
            "int4 weights by AWQ (activation-aware scaling + clip search), groups of 64; needs data",
            "int4-awq",
            format="uint4",
            granularity="group:64",
            symmetric=False,
            algorithm="awq",
        ),
        _data_aware(
            "int4 weights: AWQ's input scaling, then GPTQ on the scaled weights, groups of 64; needs data",
            "int4-awq-gptq",
            format="uint4",
            granularity="group:64",
            symmetric=False,
            algorithm=("awq", "gptq"),
        ),
        Recipe(
            name="w8a8-smoothquant",
            description="int8 weights by GPTQ after SmoothQuant (alpha 0.5), uint8 activations per token",
            weight=WeightSpec(format="int8", algorithm=("smoothquant", "gptq")),
            activation=_DYNAMIC,
            smoothquant_alpha=0.5,
            embeddings_and_head="int8",
        ),
        Recipe(
            name="int8-smoothquant",
            description="static W8A8 with SmoothQuant (alpha 0.7) moving activation outliers into weights",
            weight=WeightSpec(format="int8"),
            activation=_STATIC,
            # Measured on MiniLM (64 held-out sentences): alpha 0.3 -> cosine 0.893, 0.5 -> 0.990,
            # 0.7 -> 0.998, 0.85 -> 0.998; BERT-style encoders want more migration than OPT's 0.5.
            smoothquant_alpha=0.7,
        ),
        Recipe(
            name="int8-static-bc",
            description="int8-static plus bias correction of the expected output shift (CNNs)",
            weight=WeightSpec(format="int8"),
            activation=_STATIC,
            bias_correction=True,
        ),
        _weights(
            "NormalFloat-4 grid (QLoRA), groups of 64",
            "nf4",
            format="nf4",
            granularity="group:64",
            short_rows=_SHORT,
        ),
        _weights("fp8 e4m3 weights with a per-channel scale", "fp8", format="fp8_e4m3"),
        _weights(
            "MXFP4 (OCP microscaling): fp4 e2m1 weights, an e8m0 power-of-two scale per 32 (4.25 bits)",
            "mxfp4-weight-only",
            short_rows=_SHORT,
            format="mxfp4",
            granularity="group:32",
        ),
        _weights(
            "MXFP8 (OCP microscaling): fp8 e4m3 weights, an e8m0 power-of-two scale per 32 (8.25 bits)",
            "mxfp8-weight-only",
            format="mxfp8",
            granularity="group:32",
        ),
        _weights(
            "NVFP4: fp4 e2m1 weights, an fp8 e4m3 scale per 16 and one float32 per tensor (4.5 bits)",
            "nvfp4-weight-only",
            short_rows=_SHORT,
            format="nvfp4",
            granularity="group:16",
        ),
        _weights("fp16 weights (plain cast)", "fp16", format="fp16", granularity="tensor"),
        _weights("bfloat16 weights (plain cast)", "bf16", format="bf16", granularity="tensor"),
        _weights(
            "4-bit signed powers of two per channel (shift-only multiplies)", "log2-4bit", format="log2_4"
        ),
        _weights(
            "16-entry k-means codebook per layer (Deep Compression style)",
            "kmeans-4bit",
            format="kmeans_4",
            granularity="tensor",
        ),
        _weights(
            "product quantization: 16 codewords per 4-value sub-space (1 bit/param plus codebooks)",
            "pq",
            format="pq_4x4",
        ),
        _weights("binary weights {-a, +a} per channel (XNOR-Net scale)", "binary", format="binary"),
        _weights("ternary weights {-a, 0, +a} per channel (TWN scale)", "ternary", format="ternary"),
    ]
}
