"""mft-export: an mft run, adapter or model as a PEFT adapter, a merged Hugging Face folder or Mistral's layout.

  mft-export peft SOURCE OUT           # PeftModel.from_pretrained(MistralForCausalLM, OUT)
  mft-export hf SOURCE OUT             # merged: MistralForCausalLM / AutoTokenizer.from_pretrained(OUT)
  mft-export consolidated SOURCE OUT   # Mistral layout: base + lora.safetensors (mistral-inference), or --merge
  mft-export hf ADAPTER OUT --base /models/Mistral-7B-v0.3   # e.g. a QLoRA adapter onto the bf16 base

SOURCE is an mft run dir (its latest checkpoint; --step N for another), an mft adapter folder
(its config names the base; --base puts it onto another) or a model folder (Hugging Face,
consolidated or mft quantised). One adapter is merged tensor by tensor as W + scale * B @ A in
fp32 over the base (a quantised base dequantised to fp32) and rounded once to --dtype. Several
adapters (--adapter) are merged into the loaded model one after the other, each rounded to
--dtype, over a quantised base first dequantised into --dtype.

--dtype defaults to the dtype the base checkpoint stores (fp32 for a random base saved by
mft-train on CPU, bf16 for Mistral's releases); the dtype written is printed and recorded in
config.json's torch_dtype. hf and consolidated folders ship the tokenizer for mistral-common and
for transformers' AutoTokenizer (a Hugging Face base's own tokenizer files, else files built from
the Mistral tokenizer). A peft export of an adapter whose base transformers cannot read
(consolidated, a run's random base_model/, 4-bit) or reads as a vision model (mistral3) also writes OUT/base, that base as a Hugging
Face folder in --dtype, and adapter_config.json names it.
"""

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from mft.checkpoint.export import (
    PEFT_BASE,
    export_consolidated,
    export_hf,
    export_peft,
    has_hf_tokenizer,
    stored_dtype,
)
from mft.checkpoint.hf import is_hf_folder, is_multimodal_folder
from mft.checkpoint.load import read_model_args
from mft.cli import DTYPES, report_error
from mft.generate.load import ModelSource, guess_tokenizer, load_model, resolve_source
from mft.utils.errors import MftError


def adapter_arg(text: str) -> tuple[str, float]:
    """PATH or PATH:SCALE (a path that exists as written is never split)."""
    path, sep, scale = text.rpartition(":")
    if sep and path and not Path(text).exists():
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mft-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=["peft", "hf", "consolidated"])
    parser.add_argument("source", help="run dir, adapter folder or model folder")
    parser.add_argument("out", help="folder to write (replaced atomically if it exists)")
    parser.add_argument("--base", help="model folder to put SOURCE's adapter on instead of the one its config names")
    parser.add_argument("--step", type=int, help="checkpoint step of a run dir (default: the latest)")
    parser.add_argument("--scale", type=float, default=1.0, help="scale of SOURCE's adapter")
    parser.add_argument("--adapter", action="append", default=[], type=adapter_arg, metavar="PATH[:SCALE]",
                        help="another adapter (folder or run dir) merged on top, in order (hf, consolidated --merge)")
    parser.add_argument("--dtype", choices=list(DTYPES),
                        help="dtype of the written weights (default: the dtype the base checkpoint stores)")
    parser.add_argument("--device", default="cpu", help="where to load and merge (cuda is faster; the output goes to disk)")
    parser.add_argument("--tokenizer", help="tokenizer to ship: a file, a folder holding one, a name (v1 v2 v3 v7 v3-tekken ...), "
                        "or none (default: the run's, the base folder's, else by vocabulary size)")
    parser.add_argument("--max-shard-size", default="5GB", help="hf: largest safetensors shard")
    parser.add_argument("--merge", action="store_true",
                        help="consolidated: merge the adapter instead of writing lora.safetensors")
    return parser


def resolve(opts: argparse.Namespace) -> ModelSource:
    """The base and adapters to export, SOURCE's own adapter first (scaled by --scale)."""
    if opts.base is None:
        source = resolve_source(base=opts.source, adapters=opts.adapter, step=opts.step)
        own = source.adapters[: len(source.adapters) - len(opts.adapter)]
    else:
        # SOURCE is taken as an adapter for --base, so the base its config records need not exist here.
        if opts.step is not None:
            raise MftError("--step picks a run dir's checkpoint, which --base does not; give the checkpoint "
                           "folder (RUN/checkpoints/step_N) as SOURCE.")
        source = resolve_source(base=opts.base, adapters=[(opts.source, 1.0), *opts.adapter])
        if len(source.adapters) != 1 + len(opts.adapter):
            raise MftError(f"--base {opts.base} is an adapter or run dir; --base takes a model folder.")
        own = source.adapters[:1]
    if own:
        own[0].scale *= opts.scale
    elif opts.scale != 1.0:
        raise MftError(f"--scale scales SOURCE's adapter, and {opts.source} is a model folder with none.")
    return source


def tokenizer_of(opts: argparse.Namespace, source: ModelSource, vocab_size: int):
    """The tokenizer to ship, or None for --tokenizer none."""
    from mft.data.tokenizer import (
        load_tokenizer,  # mistral-common only for the exports that ship one
    )

    if opts.tokenizer == "none":
        return None
    try:
        spec = opts.tokenizer or guess_tokenizer(source, vocab_size)
    except MftError:
        raise MftError(f"{source.base} has no tokenizer file and its vocabulary size ({vocab_size}) names none: "
                       "pass --tokenizer (a file, a folder or a name: v1 v2 v3 v7 v3-tekken ...), or --tokenizer none.") from None
    return load_tokenizer(spec)


def export_dtype(opts: argparse.Namespace, source: ModelSource) -> tuple[torch.dtype, str]:
    """(dtype, its --dtype name): --dtype, else the dtype the base stores its weights in."""
    dtype = DTYPES[opts.dtype] if opts.dtype else stored_dtype(source.base) or torch.float32
    return dtype, next(name for name, d in DTYPES.items() if d == dtype)


def hf_tokenizer_from(opts: argparse.Namespace, source: ModelSource) -> Optional[Path]:
    """The base folder whose own Hugging Face tokenizer files to ship, unless --tokenizer chose another."""
    return source.base if opts.tokenizer is None and has_hf_tokenizer(source.base) else None


def write_peft(opts: argparse.Namespace, source: ModelSource) -> str:
    if len(source.adapters) != 1:
        raise MftError(f"peft export needs exactly one adapter; {opts.source} gives {len(source.adapters)}.")
    adapter = source.adapters[0]
    if is_hf_folder(source.base) and not is_multimodal_folder(source.base):
        out = export_peft(adapter.path, opts.out, scale=adapter.scale, base_name_or_path=str(source.base.resolve()))
        return f"PEFT adapter: {out} (base: {source.base})"
    # transformers reads only its own layout: the base goes with the adapter as a Hugging Face folder.
    base = ModelSource(source.base, [], source.tokenizer)
    dtype, name = export_dtype(opts, base)
    tokenizer = tokenizer_of(opts, base, read_model_args(base.base).vocab_size)
    model = load_model(base, device=opts.device, dtype=dtype, dense=True)
    ids = {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id} if tokenizer else {}
    out = export_peft(adapter.path, opts.out, scale=adapter.scale, base_model=model, dtype=dtype,
                      tokenizer_file=tokenizer.path if tokenizer else None, max_shard_size=opts.max_shard_size, **ids)
    return f"PEFT adapter: {out} (base: {out / PEFT_BASE}, {source.base} as a Hugging Face model in {name})"


def write_model(opts: argparse.Namespace, source: ModelSource) -> str:
    """hf, or consolidated: the merged model, or the base + lora.safetensors of its one adapter."""
    dtype, name = export_dtype(opts, source)
    lora = None
    if opts.format == "consolidated" and not opts.merge and source.adapters:
        if len(source.adapters) > 1:
            raise MftError("consolidated export without --merge writes one lora.safetensors: give one adapter.")
        lora, source = source.adapters[0], ModelSource(source.base, [], source.tokenizer)
    tokenizer = tokenizer_of(opts, source, read_model_args(source.base).vocab_size)  # before a long load
    # One adapter stays unmerged: the export merges it in fp32 over the (dequantised) base and
    # rounds once. Several can only be merged into the model as it loads, which needs a dense base.
    several = len(source.adapters) > 1
    model = load_model(source, device=opts.device, dtype=dtype, merge=several, dense=several)
    files = {"tokenizer_file": tokenizer.path if tokenizer else None,
             "hf_tokenizer_from": hf_tokenizer_from(opts, source) if tokenizer else None}
    if opts.format == "hf":
        ids = {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id} if tokenizer else {}
        out = export_hf(model, opts.out, dtype=dtype, max_shard_size=opts.max_shard_size, **files, **ids)
        return f"Hugging Face model: {out} ({source.describe()}, {name})"
    out = export_consolidated(model, opts.out, dtype=dtype, lora_from=lora.path if lora else None,
                              lora_scale=lora.scale if lora else 1.0, **files)
    extra = f" + lora.safetensors of {lora.path} (mistral-inference scaling 2.0)" if lora else ""
    return f"Consolidated model: {out} ({source.describe()}, {name}){extra}"


def main(argv=None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.merge and opts.format != "consolidated":
        parser.error("--merge is for consolidated exports (hf is always merged, peft never).")
    try:
        source = resolve(opts)
        print(write_peft(opts, source) if opts.format == "peft" else write_model(opts, source))
    except MftError as e:
        return report_error("mft-export", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
