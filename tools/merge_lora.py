"""Merge an mft LoRA adapter into its base and write a dense model that mft and transformers load.

    python tools/merge_lora.py outputs/2026-11-23/18-30-00/checkpoints/step_000150 merged/
    python tools/merge_lora.py ADAPTER OUT --base /models/Mistral-7B-v0.3 --format consolidated

The base defaults to the one named in the adapter's adapter_config.json. It may be a Hugging
Face, consolidated or mft quantised folder: a quantised base is dequantised layer by layer in
fp32 before the update is added, so an adapter trained with QLoRA merges into the weights it
was trained against. An adapter trained on a bf16 base merges onto a quantised one, and back.
"""

import argparse
import sys
from pathlib import Path

import torch

from mft.checkpoint.export import export_consolidated, export_hf
from mft.generate.load import load_model, resolve_source
from mft.utils.errors import MftError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="adapter folder (adapter.safetensors + adapter_config.json)")
    parser.add_argument("output", help="folder to write (replaced atomically if it exists)")
    parser.add_argument("--base", help="base model folder (default: the adapter's base)")
    parser.add_argument("--format", choices=["hf", "consolidated"], default="hf",
                        help="hf: config.json + safetensors shards (transformers and mft); consolidated: Mistral layout")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--device", default="cpu", help="where to merge (cuda is faster; the output goes to disk)")
    opts = parser.parse_args(argv)
    try:
        dtype = DTYPES[opts.dtype]
        source = resolve_source(base=opts.adapter)
        if opts.base:
            source.base = Path(opts.base)
        model = load_model(source, device=opts.device, dtype=dtype, merge=False, dense=True)
        export = export_hf if opts.format == "hf" else export_consolidated
        folder = export(model, opts.output, dtype=dtype)  # merged tensor by tensor (mft.checkpoint.merge)
    except MftError as e:
        print(f"merge_lora: error: {e}", file=sys.stderr)
        return 1
    print(f"{folder}: merged {opts.adapter} ({opts.format}, {opts.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
