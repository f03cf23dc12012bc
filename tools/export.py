"""Export an mft adapter or fine-tuned model for other tools.

  python tools/export.py peft SOURCE OUT            # PEFT adapter: PeftModel.from_pretrained(MistralForCausalLM, OUT)
  python tools/export.py hf SOURCE OUT              # merged model: MistralForCausalLM.from_pretrained(OUT)
  python tools/export.py consolidated SOURCE OUT    # Mistral layout: base + lora.safetensors (or --merge)

SOURCE is an mft run dir (its latest checkpoint; --step N for another), an mft adapter folder
(its config names the base) or a model folder (Hugging Face or consolidated). --adapter
PATH[:SCALE] adds adapters on top (repeatable); --scale scales the source's own adapter.
"""

import argparse
import sys
from pathlib import Path

import torch

from mft.checkpoint.export import export_consolidated, export_hf, export_peft
from mft.utils.errors import MftError
from mft.generate.load import AdapterRef, guess_tokenizer, load_model, resolve_source

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def adapter_arg(text: str) -> tuple[str, float]:
    path, sep, scale = text.rpartition(":")
    if sep and path and not Path(text).exists():
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=["peft", "hf", "consolidated"])
    parser.add_argument("source", help="run dir, adapter folder or model folder")
    parser.add_argument("out", help="folder to write (replaced atomically if it exists)")
    parser.add_argument("--step", type=int, help="checkpoint step of a run dir (default: the latest)")
    parser.add_argument("--scale", type=float, default=1.0, help="scale of the source's own adapter")
    parser.add_argument("--adapter", action="append", default=[], type=adapter_arg, metavar="PATH[:SCALE]",
                        help="another adapter to merge on top (hf, consolidated --merge)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the written weights")
    parser.add_argument("--tokenizer", help="tokenizer to ship (default: the run's / the folder's)")
    parser.add_argument("--max-shard-size", default="5GB", help="hf: largest safetensors shard")
    parser.add_argument("--merge", action="store_true", help="consolidated: merge adapters instead of writing lora.safetensors")
    args = parser.parse_args(argv)

    try:
        source = resolve_source(base=args.source, adapters=args.adapter, step=args.step)
        if source.adapters:
            source.adapters[0] = AdapterRef(source.adapters[0].path, source.adapters[0].scale * args.scale)
        if args.format == "peft":
            if len(source.adapters) != 1:
                raise MftError(f"peft export needs exactly one adapter; {args.source} gives {len(source.adapters)}.")
            out = export_peft(source.adapters[0].path, args.out, scale=source.adapters[0].scale,
                              base_name_or_path=str(source.base.resolve()))
            print(f"PEFT adapter: {out} (base: {source.base})")
            return
        from mft.data.tokenizer import load_tokenizer

        dtype = DTYPES[args.dtype]
        lora_adapter = None
        if args.format == "consolidated" and not args.merge and source.adapters:
            if len(source.adapters) > 1:
                raise MftError("consolidated export without --merge writes one lora.safetensors: give one adapter.")
            lora_adapter, source.adapters = source.adapters[0], []
        # Merging adds each update in fp32 and rounds once to the weights' dtype (see LoRALinear.merge).
        # A quantised base is dequantised on load: exports hold dense weights.
        model = load_model(source, device="cpu", dtype=dtype, merge=True, dense=True)
        tokenizer = load_tokenizer(args.tokenizer or guess_tokenizer(source, model.args.vocab_size))
        if args.format == "hf":
            out = export_hf(model, args.out, tokenizer_file=tokenizer.path, dtype=dtype,
                            max_shard_size=args.max_shard_size, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
            print(f"Hugging Face model: {out}")
        else:
            out = export_consolidated(model, args.out, tokenizer_file=tokenizer.path, dtype=dtype,
                                      lora_from=lora_adapter.path if lora_adapter else None,
                                      lora_scale=lora_adapter.scale if lora_adapter else 1.0)
            print(f"Consolidated model: {out}" + (" (+ lora.safetensors, mistral-inference scaling 2.0)" if lora_adapter else ""))
    except MftError as e:
        print(f"export: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
