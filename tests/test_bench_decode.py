"""``lowbit bench decode`` on a tiny Llama: every row present, fidelity and bytes consistent."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from lowbit.decode_bench import DecodeConfig, run, weight_bytes_per_step  # noqa: E402

TINY = dict(
    hidden=64, layers=2, ffn=128, vocab=256, heads=4, prompt=6, new_tokens=4, batches=(1, 2), repeats=1
)


@pytest.fixture(scope="module")
def report():
    cfg = DecodeConfig(**TINY, variants=("fp32", "bf16", "lowbit int8", "lowbit int4"), threads=1)
    return run(cfg, progress=False)


def test_every_variant_and_batch_has_a_row(report):
    names = [(r.variant, r.batch) for r in report.rows]
    assert len(names) == 8 and {b for _, b in names} == {1, 2}
    assert all(r.tokens_per_s is not None and r.tokens_per_s > 0 for r in report.rows)
    fp32 = [r for r in report.rows if r.variant == "PyTorch fp32"]
    assert all(r.vs_fp32 == pytest.approx(1.0) and r.cosine == pytest.approx(1.0) for r in fp32)
    assert report.bandwidth_gbs > 0 and report.parameters > 0


def test_fidelity_and_bytes_follow_the_bits(report):
    by = {r.variant: r for r in report.rows if r.batch == 1}
    int8, int4 = by["lowbit int8-weight-only"], by["lowbit int4-weight-only"]
    assert int8.cosine > 0.99 and int4.cosine > 0.9 and int8.cosine >= int4.cosine - 1e-3
    assert int4.bytes_per_step < int8.bytes_per_step < by["PyTorch bf16"].bytes_per_step
    assert by["PyTorch bf16"].bytes_per_step * 2 == by["PyTorch fp32"].bytes_per_step
    assert any(k in int8.backend for k in ("torch-", "lowbit-", "reference"))  # the kernel summary is shown
    text = report.to_markdown()
    assert "tokens/s" in text and "GB/s" in text and "issue 18" in text
    json.dumps(report.to_dict())


def test_weight_bytes_count_the_head():
    from lowbit.decode_bench import build_model

    model = build_model(DecodeConfig(**TINY))
    linear = sum(m.weight.numel() * 4 for m in model.modules() if type(m).__name__ == "Linear")
    assert weight_bytes_per_step(model) == linear and model.lm_head.weight.numel() * 4 < linear


def test_cli_refuses_unknown_variants(capsys):
    from lowbit.cli import main

    code = main(["bench", "decode", "--variants", "fp32,nope", "--layers", "1", "--hidden", "32"])
    assert code != 0
    assert "unknown decode variant" in capsys.readouterr().err


def test_the_fidelity_row_is_int4_in_groups_of_32_with_int8_edges():
    from lowbit.decode_bench import LOWBIT_RECIPES, _recipe

    recipe = _recipe(LOWBIT_RECIPES["lowbit int4 g32"])
    assert recipe.weight.granularity == "group:32" and recipe.embeddings_and_head == "int8"
    assert recipe.weight.format == "uint4" and _recipe("int4-weight-only") == "int4-weight-only"
