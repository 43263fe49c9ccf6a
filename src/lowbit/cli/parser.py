"""The argument parser: every verb, its options, and the ``--help`` epilog with one example per verb.

Each verb's ``cmd_*`` function lives in a module named for its theme (``info``, ``artifacts``,
``evaluate``, ``analysis``); this file only wires arguments to them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

from lowbit.cli.analysis import cmd_search, cmd_sensitivity
from lowbit.cli.artifacts import cmd_export, cmd_inspect, cmd_quantize
from lowbit.cli.evaluate import cmd_bench, cmd_compare, cmd_eval
from lowbit.cli.info import cmd_demo, cmd_doctor, cmd_recipes

EXAMPLES = """\
verbs (run `lowbit VERB --help` for options):
  demo         quantize the built-in digits CNN 10 ways, print the table, write lowbit-report/
                 lowbit demo
  recipes      list preset recipes and built-in models
                 lowbit recipes
  quantize     quantize a model and save the artifact
                 lowbit quantize minilm --recipe int8-dynamic -o out/
                 lowbit quantize ./llama-dir --recipe int4-gptq --max-memory 4GB -o out/
  eval         evaluate one recipe or artifact against the float model
                 lowbit eval digits-cnn --recipe int8-static
  compare      evaluate several recipes side by side (optionally write a report)
                 lowbit compare digits-cnn --recipes int8-static,nf4,int4-weight-only
  inspect      show and verify what an artifact stores
                 lowbit inspect out/
  export       export to ONNX (ONNX Runtime), GGUF (llama.cpp) or a Hugging Face checkpoint
                 lowbit export digits-cnn --recipe int8-dynamic -o model.onnx
                 lowbit export ./my-llama --qtype Q4_0 --algorithm gptq --calib text.txt -o m.gguf
  doctor       what this machine can run fast; what a model / artifact will get
                 lowbit doctor out/
  bench        latency benchmark against the float model and other tools
                 lowbit bench minilm
  sensitivity  quantize one layer at a time and rank the layers by the loss they cause
                 lowbit sensitivity digits-cnn --recipe int4-weight-only
  search       choose a format per layer under an accuracy or size constraint
                 lowbit search digits-cnn --max-drop 0.5 -o searched/

MODEL is a built-in name (digits-cnn, digits-lstm, digits-mlp, minilm), a Hugging Face model
directory, or package.module:factory. DATA files: .pt/.pth (loaded with weights_only=True),
.safetensors, .npy/.npz, or .txt (one sentence per line, for text models).
exit codes: 0 ok, 1 failure, 2 bad input."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (exit 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``lowbit --help`` lists every verb with an example)."""
    parser = _Parser(
        prog="lowbit",
        description="Quantize PyTorch models and measure exactly what it bought and cost.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from lowbit import __version__

    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(
        dest="verb", metavar="VERB", help="one of the verbs below", parser_class=_Parser
    )
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    def verb(
        name: str, func: Callable[[argparse.Namespace], int], help_: str, example: str, json_flag: bool = True
    ) -> _Parser:
        p = sub.add_parser(
            name,
            description=f"{help_}\n\nexample:\n  {example}",
            parents=[common] if json_flag else [],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        return p

    def model_args(p: argparse.ArgumentParser, data: bool = True) -> None:
        p.add_argument(
            "model", metavar="MODEL", help="zoo name, Hugging Face directory, or package.module:factory"
        )
        p.add_argument(
            "--calib", metavar="DATA", help="calibration data file (.pt/.safetensors/.npy/.npz/.txt)"
        )
        if data:
            p.add_argument("--data", metavar="DATA", help="evaluation data file (default: the model's own)")
        p.add_argument("--batch-size", type=int, default=32, help="batch size for data files (default 32)")

    def eval_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--repeats", type=int, default=20, help="timed calls per model (default 20)")
        p.add_argument("--ort", action="store_true", help="also time ONNX Runtime exports")
        p.add_argument("--report", metavar="DIR", help="also write JSON / Markdown / HTML there")

    p = verb("demo", cmd_demo, "technique matrix on the digits CNN, table + lowbit-report/", "lowbit demo")
    p.add_argument("--out", default="lowbit-report", help="report directory (default lowbit-report)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per model (default 10)")
    p.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime latency columns")
    p.add_argument("--retrain", action="store_true", help="retrain digits-cnn instead of using the cache")

    verb("recipes", cmd_recipes, "list preset recipes and built-in models", "lowbit recipes")

    p = verb(
        "quantize",
        cmd_quantize,
        "quantize MODEL and save the artifact",
        "lowbit quantize minilm --recipe int8-dynamic -o out/",
    )
    model_args(p, data=False)
    p.add_argument("--recipe", required=True, help="preset name or recipe YAML (see 'lowbit recipes')")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="artifact directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing artifact in DIR")
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="onload: read MODEL (a Hugging Face safetensors directory) one stage at a time, refusing "
        "before any work when the predicted peak memory exceeds SIZE (e.g. 4GB, 512MiB)",
    )
    p.add_argument(
        "--onload", action="store_true", help="onload without a budget (the prediction is still printed)"
    )

    p = verb(
        "eval",
        cmd_eval,
        "evaluate one recipe or saved artifact against the float model",
        "lowbit eval digits-cnn --recipe int8-static  |  lowbit eval minilm --artifact out/",
    )
    model_args(p)
    p.add_argument("--recipe", help="preset name or recipe YAML")
    p.add_argument("--artifact", metavar="DIR", help="a saved artifact of MODEL instead of --recipe")
    p.add_argument(
        "--allow-unsealed", action="store_true", help="also read lowbit 0.1 artifacts (no lowbit.sha256)"
    )
    eval_args(p)

    p = verb(
        "compare",
        cmd_compare,
        "evaluate several recipes side by side",
        "lowbit compare digits-cnn --recipes int8-static,nf4,int4-weight-only",
    )
    model_args(p)
    p.add_argument("--recipes", required=True, help="comma-separated preset names or YAML files")
    eval_args(p)

    p = verb(
        "inspect",
        cmd_inspect,
        "show and verify what an artifact (or a GGUF file) stores",
        "lowbit inspect out/",
    )
    p.add_argument(
        "dir", metavar="DIR", help="artifact directory (lowbit.json + model.safetensors) or FILE.gguf"
    )
    p.add_argument(
        "--allow-unsealed", action="store_true", help="also read lowbit 0.1 artifacts (no lowbit.sha256)"
    )

    p = verb(
        "export",
        cmd_export,
        "export to ONNX (ORT integer kernels), GGUF (llama.cpp) or a Hugging Face checkpoint",
        "lowbit export digits-cnn --recipe int8-dynamic -o model.onnx; "
        "lowbit export ./my-llama --qtype Q4_0 --algorithm gptq --calib text.txt -o model.gguf",
    )
    model_args(p, data=False)
    p.add_argument(
        "--format", choices=("onnx", "gguf", "hf"), default=None,
        help="onnx, gguf or hf (compressed-tensors directory); default: from the -o name",
    )  # fmt: skip
    p.add_argument(
        "--qtype", default="Q4_0", help="GGUF type: F16 Q8_0 Q5_0 Q4_0 Q4_1 Q4_K Q6_K (default Q4_0)"
    )
    p.add_argument(
        "--algorithm", default="rtn", choices=("rtn", "gptq", "awq"),
        help="GGUF from a float model: how lowbit quantizes the linear layers (gptq / awq need --calib)",
    )  # fmt: skip
    p.add_argument(
        "--requantize", action="store_true", help="GGUF: round lowbit grids that are no GGUF type again"
    )
    p.add_argument(
        "--imatrix", action="store_true", help="GGUF K-quants: weight rounding by --calib activations"
    )
    p.add_argument("--recipe", help="preset name or recipe YAML")
    p.add_argument("--artifact", metavar="DIR", help="a saved artifact of MODEL instead of --recipe")
    p.add_argument(
        "--allow-unsealed", action="store_true", help="also read lowbit 0.1 artifacts (no lowbit.sha256)"
    )
    p.add_argument("-o", "--output", required=True, metavar="FILE.onnx|FILE.gguf|DIR")
    p.add_argument("--force", action="store_true", help="overwrite the output")

    p = verb(
        "doctor",
        cmd_doctor,
        "what this machine runs fast; what a model, recipe or artifact gets",
        "lowbit doctor out/",
    )
    p.add_argument("target", nargs="?", default=None, help="optional MODEL, artifact directory or .onnx file")
    p.add_argument("--recipe", help="recipe to check MODEL against (default: the doctor's choice)")

    p = verb(
        "bench", cmd_bench, "latency benchmark against the float model (MODEL 'decode': LLM tokens/s)",
        "lowbit bench minilm; lowbit bench decode --batch 1,8; lowbit bench --suite domains --quick",
        json_flag=False,
    )  # fmt: skip
    p.add_argument(
        "model", metavar="MODEL", nargs="?", default=None,
        help="a model, or 'decode' (a Llama-style decode benchmark); omit with --suite",
    )  # fmt: skip
    p.add_argument("--recipes", help="comma-separated recipes to benchmark")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="where to write results")
    suite = p.add_argument_group("suite (lowbit bench --suite domains)")
    suite.add_argument("--suite", choices=["domains"], help="every domain model x every technique")
    suite.add_argument("--quick", action="store_true", help="smaller held-out sets and fewer repeats")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="FILE",
        help="machine-readable output: on stdout, or (--suite) the rows written to FILE",
    )
    suite.add_argument("--report", metavar="DIR", help="write report.md, report.html and report.json")
    suite.add_argument("--domains", help="comma-separated: classification, detection, nlp, speech")
    suite.add_argument("--models", help="comma-separated model names within the domains")
    suite.add_argument("--techniques", help="comma-separated technique names (float is always kept)")
    suite.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime / OpenVINO timings")
    decode = p.add_argument_group("decode (lowbit bench decode)")
    decode.add_argument("--hidden", type=int, default=1024)
    decode.add_argument("--layers", type=int, default=8)
    decode.add_argument("--ffn", type=int, default=2816)
    decode.add_argument("--vocab", type=int, default=32000)
    decode.add_argument("--heads", type=int, default=16)
    decode.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    decode.add_argument("--new-tokens", type=int, default=32)
    decode.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    decode.add_argument("--variants", default=None, help="comma-separated: fp32, bf16, lowbit int8, ...")

    p = verb(
        "sensitivity",
        cmd_sensitivity,
        "rank layers by the loss each causes when quantized alone",
        "lowbit sensitivity digits-cnn --recipe int4-weight-only --plot sens.png",
    )
    model_args(p)
    p.add_argument("--recipe", default="int4-weight-only", help="recipe applied to one layer at a time")
    p.add_argument("--plot", metavar="FILE.png", help="write the bar chart there")

    p = verb(
        "search",
        cmd_search,
        "choose a format per layer under a constraint",
        "lowbit search digits-cnn --max-drop 0.5 -o searched/",
    )
    model_args(p)
    p.add_argument("--max-drop", type=float, help="largest allowed metric drop (points)")
    p.add_argument("--target-bits", type=float, help="average bits per parameter")
    p.add_argument("--target-size", type=float, help="size as a fraction of float32 (0.2 = 20%%)")
    p.add_argument("--candidates", help="comma-separated formats, e.g. int8,int4,int2")
    p.add_argument("--budget-minutes", type=float, default=None)
    p.add_argument("-o", "--output", metavar="DIR", help="save the searched model as an artifact")
    p.add_argument("--force", action="store_true", help="replace an existing artifact in DIR")
    return parser
