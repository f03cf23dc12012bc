"""mft-quantize: write mft's quantised checkpoint (nf4 or int4) from a Hugging Face or consolidated folder.

  mft-quantize /models/Mistral-7B-v0.3 /models/Mistral-7B-v0.3-nf4 --format nf4
  mft-train model=mistral-7b-v0.3 model.checkpoint=/models/Mistral-7B-v0.3-nf4 quant=nf4

Tensors stream one at a time from the source and are quantised on --device (cuda when there
is one); only the quantised model is ever held (~3.9 GiB for a 7B). Training from the output
copies the packed tensors as they are: no bf16 copy of the base is ever made.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from mft.build import Runtime, build_model, checkpoint_spec
from mft.checkpoint.quantized import save_quantized
from mft.cli import DTYPES, report_error
from mft.data.tokenizer_files import find_tokenizer_file
from mft.quant.formats import QuantSpec
from mft.quant.model import LINEAR_TARGETS
from mft.utils.errors import MftError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mft-quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="Hugging Face or Mistral consolidated folder")
    parser.add_argument("out", help="folder to write (replaced atomically if it exists)")
    parser.add_argument("--format", choices=["nf4", "int4"], default="nf4")
    parser.add_argument("--block-size", type=int, help="nf4: weights per absmax (64); int4: group size (128)")
    parser.add_argument("--no-double-quant", action="store_true", help="nf4: keep the absmax in fp32")
    parser.add_argument("--modules", help="comma-separated layers to quantise (default: wq,wk,wv,wo,w1,w2,w3; "
                        "add output for the head)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="dtype of the layers left dense")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv=None) -> int:
    opts = build_parser().parse_args(argv)
    modules = None if opts.modules is None else [m for m in opts.modules.split(",") if m]  # None: the default
    start = time.perf_counter()
    try:
        spec = QuantSpec(
            format=opts.format,
            block_size=opts.block_size or (64 if opts.format == "nf4" else 128),
            double_quant=opts.format == "nf4" and not opts.no_double_quant,
        )
        quant_modules = LINEAR_TARGETS if modules is None else tuple(modules)
        model = build_model(checkpoint_spec(opts.source, dense=True, quant=spec, quant_modules=quant_modules),
                            Runtime(device=opts.device, dtype=DTYPES[opts.dtype]))
        # The source's tokenizer file goes along, so the quantised folder names the same tokenizer.
        tokenizer = find_tokenizer_file(Path(opts.source))
        folder = save_quantized(model, opts.out, source=str(opts.source), extra_files=[tokenizer] if tokenizer else [])
    except MftError as e:
        return report_error("mft-quantize", e)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**30
    print(f"{folder}: {spec.describe()}, {size:.2f} GiB, {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
