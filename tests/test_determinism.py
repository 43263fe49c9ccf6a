"""Same model, data and seed -> byte-identical quantized artifacts, in any process, any thread count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Builds a small GPT-2 and a Llama from configs (random init: only determinism is measured),
# quantizes with every data-aware preset and prints a digest of each saved tensor file and of
# the layer entries of its manifest (codes, scales and the GPTQ errors recorded there).
SCRIPT = r"""
import hashlib, json, sys, tempfile, warnings
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[1]))
warnings.simplefilter("ignore")
import transformers
import lowbit

def models():
    torch.manual_seed(0)
    yield "gpt2", transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=64, vocab_size=97, n_positions=64, bos_token_id=0, eos_token_id=0)).eval()
    torch.manual_seed(0)
    yield "llama", transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
        intermediate_size=128, vocab_size=97, max_position_embeddings=64)).eval()

g = torch.Generator().manual_seed(1)
calibration = [{"input_ids": torch.randint(0, 97, (4, 48), generator=g)} for _ in range(3)]
for arch, model in models():
    for recipe in ("int4-gptq", "int4-awq", "int4-awq-gptq", "int3-gptq", "w8a8-smoothquant"):
        q = lowbit.quantize(model, recipe, calibration=calibration, progress=False)
        with tempfile.TemporaryDirectory() as d:
            lowbit.save(q, Path(d) / "a")
            h = hashlib.sha256((Path(d) / "a" / "model.safetensors").read_bytes())
            layers = json.loads((Path(d) / "a" / "lowbit.json").read_text())["layers"]
            h.update(json.dumps(layers, sort_keys=True).encode())
        print(arch, recipe, h.hexdigest())
"""


def _digests(threads: int) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(threads)], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split("\n")


def test_data_aware_presets_are_byte_identical_across_processes_and_thread_counts():
    pytest.importorskip("transformers")
    one, three = _digests(1), _digests(3)  # 3 threads split full reductions differently from 1
    assert len([line for line in one if line]) == 10
    assert one == three
