"""Decoding speed: mft's Generator vs transformers' generate on the same weights, batch 1.

  python tools/bench_generate.py                       # 7B (Mistral-7B-v0.3 shape), bf16, CUDA
  python tools/bench_generate.py --window 4096         # v0.1 shape: sliding window, rolling cache
  python tools/bench_generate.py --tiny --device cpu   # a smoke run of the script itself
  python tools/bench_generate.py --model mixtral-8x7b  # Mixtral 8x7B shape, int4 base (~26 GiB)
  python tools/bench_generate.py --model mixtral-8x7b --tiny --device cpu  # its smoke run

Random weights (no download), drawn once by mft and copied into transformers' MistralForCausalLM
(wq/wk in HF's rotary layout), so both decode the same model. Token ids only: no tokenizer, no
Hydra, no mistral-common. EOS never stops a run (every row generates --new tokens). Rows:
- transformers generate, default settings (dynamic cache, SDPA attention);
- transformers generate with its static cache + torch.compile (when that works in this version);
- mft eager, and mft compiled (static cache, torch.compile "reduce-overhead" = CUDA graphs), with
  wq/wk/wv and w1/w3 fused for decoding (the default), and compiled without that fusion;
- mft int4 (mft.quant, when installed): the same weights quantised (int4, groups of 128), run
  through mft.quant's dequantise + matmul, then on torch's int4 matmul (mft/generate/int4.py),
  each eager and compiled.
--model mixtral-8x7b builds Mixtral 8x7B's shape directly int4-quantised (random weights, the
dense model never exists) and runs the int4 rows only (no transformers rows: they need the dense
model): the experts on torch's int4 matmul compute only the experts each token chose (the note
says whether the experts were int4 at all: an mft.quant that leaves experts dense keeps them bf16).
--layers cuts the model for a quick check.
"argmax gap": see argmax_gap (each row's tokens scored by mft's packed forward on the weights as
they are for that row).
tokens/s = new tokens / wall time of a whole generate call (prefill included: a short prompt),
median of --repeats timed runs after --warmup untimed ones (compilation happens there); peak GiB
is the row's own peak of allocated GPU memory (the other model, when still held, included).
On a 10-minute budget per command, split the rows: e.g. --skip hf_compile,int4 then
--skip hf,hf_compile,mft,mft_compile,mft_unfused.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mft.build import ModelSpec, Runtime, build_model  # noqa: E402
from mft.checkpoint.hf import mft_to_hf_name, permute_rotary  # noqa: E402
from mft.generate.decode import GenerationSettings, Generator  # noqa: E402
from mft.model.args import ModelArgs, MoeArgs  # noqa: E402
from mft.quant.formats import QuantSpec  # noqa: E402

SEVEN_B = ModelArgs(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                    vocab_size=32768, rope_theta=1e6, sliding_window=None)
TINY = ModelArgs(dim=256, n_layers=4, head_dim=64, hidden_dim=512, n_heads=4, n_kv_heads=2, vocab_size=1024,
                 rope_theta=1e6, sliding_window=None)
MIXTRAL_8X7B = ModelArgs(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                         vocab_size=32000, rope_theta=1e6, sliding_window=None, moe=MoeArgs(8, 2))
TINY_MOE = ModelArgs(**{**vars(TINY), "moe": MoeArgs(4, 2)})
# (--model, --tiny) -> shape, title
MODELS = {("mistral-7b", False): (SEVEN_B, "7B (Mistral-7B-v0.3 shape)"), ("mistral-7b", True): (TINY, "tiny"),
          ("mixtral-8x7b", False): (MIXTRAL_8X7B, "Mixtral 8x7B shape, int4 base"),
          ("mixtral-8x7b", True): (TINY_MOE, "tiny Mixtral, int4 base")}
INT4 = QuantSpec(format="int4", block_size=128, double_quant=False, dq_block_size=256)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def hf_model_from(model, args, dtype, device):
    """transformers' MistralForCausalLM holding `model`'s weights."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
        sliding_window=args.sliding_window, tie_word_embeddings=False, max_position_embeddings=32768,
    )
    with torch.device(device):
        hf = MistralForCausalLM._from_config(config, dtype=dtype).eval()
    heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads}
    state = {}
    for name, tensor in model.state_dict().items():
        rotary = heads.get(name.split(".", 2)[-1]) if name.startswith("layers.") else None
        state[mft_to_hf_name(name)] = permute_rotary(tensor, rotary) if rotary else tensor
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto transformers: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


@torch.no_grad()
def argmax_gap(model, prompt, tokens):
    """Largest (top logit - logit of the generated token) over the generated tokens, the logits
    being mft's packed (training) forward over prompt + tokens in the model's dtype, and the
    standard deviation of those logits for scale. 0 means every token was that forward's argmax;
    in bf16, different matmul shapes round differently, so near-ties may flip and one flip makes
    the rest of a greedy sequence differ: a gap at the rounding level is agreement, a large one is a bug."""
    seq = torch.tensor(list(prompt) + list(tokens[:-1]), device=model.tok_embeddings.weight.device)
    n = seq.numel()
    cu = torch.tensor([0, n], dtype=torch.int32, device=seq.device)
    logits = model(seq, torch.arange(n, device=seq.device), cu, n)[len(prompt) - 1:].float()
    chosen = logits.gather(1, torch.tensor(tokens, device=seq.device)[:, None])[:, 0]
    return float((logits.max(dim=1).values - chosen).max()), float(logits.std())


def commit():
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--model", choices=["mistral-7b", "mixtral-8x7b"], default="mistral-7b",
                        help="mixtral-8x7b: int4 base, int4 rows only")
    parser.add_argument("--tiny", action="store_true", help="a small model (smoke test of the script)")
    parser.add_argument("--layers", type=int, default=None, help="blocks (default: the model's)")
    parser.add_argument("--window", type=int, default=None, help="sliding window (4096 = Mistral-7B-v0.1 shape)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new", type=int, default=256, help="generated tokens")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (compilation, CUDA graph recording)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated rows to skip: hf,hf_compile,mft,mft_compile,mft_unfused,int4,int4_dequant")
    parser.add_argument("--json", help="also write the results to this JSON file")
    opts = parser.parse_args(argv)
    skip = set(filter(None, opts.skip.split(",")))

    device = torch.device(opts.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[opts.dtype]
    args, title = MODELS[opts.model, opts.tiny]
    args = ModelArgs(**{**vars(args), "sliding_window": opts.window, "n_layers": opts.layers or args.n_layers})
    moe = args.moe is not None
    if moe:  # built quantised: only the int4 rows exist
        skip |= {"hf", "hf_compile", "mft", "mft_unfused", "mft_compile"}
    model = build_model(ModelSpec(args, quant=INT4 if moe else None), Runtime(device=device, dtype=dtype)).eval()
    prompt = torch.randint(3, args.vocab_size, (opts.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    settings = GenerationSettings(max_new_tokens=opts.new)
    rows, outputs = [], {}

    def record(name, fn, note=""):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            seconds, tokens = timed(fn, device, opts.warmup, opts.repeats)
        except Exception as e:  # noqa: BLE001 - a row that cannot run is reported, the others still run
            rows.append({"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            print(f"{name}: failed: {rows[-1]['error']}", file=sys.stderr)
            return
        outputs[name] = tokens
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        gap, scale = argmax_gap(model, prompt, tokens)
        rows.append({"name": name, "tokens_per_s": opts.new / seconds, "seconds": seconds, "peak_gib": peak, "note": note,
                     "argmax_gap": gap, "logit_std": scale})
        print(f"{name}: {opts.new / seconds:.1f} tokens/s", file=sys.stderr, flush=True)

    if not {"hf", "hf_compile"} <= skip:
        hf = hf_model_from(model, args, dtype, device)
        ids = torch.tensor([prompt], device=device)
        mask = torch.ones_like(ids)

        def hf_generate(**kwargs):
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=opts.new, min_new_tokens=opts.new,
                                  do_sample=False, **kwargs)
            return out[0, len(prompt):].tolist()

        if "hf" not in skip:
            record("transformers generate (default)", hf_generate, "dynamic cache, sdpa")
        if "hf_compile" not in skip:
            record("transformers generate (static cache + compile)",
                   lambda: hf_generate(cache_implementation="static"), "transformers compiles static-cache decoding")
        del hf
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def mft_row(name, gen_model, compile, note, fuse=True):
        generator = Generator(gen_model, compile=compile, fuse=fuse)
        record(name, lambda: generator.generate([prompt], settings)[0].tokens, note)

    graphs = "torch.compile reduce-overhead (CUDA graphs)" if device.type == "cuda" else "torch.compile"
    if "mft" not in skip:
        mft_row("mft (eager)", model, False, "static rolling cache, SDPA, fused qkv and w13")
    if "mft_unfused" not in skip:
        mft_row("mft (compile, unfused)", model, True, graphs + ", seven separate projections", fuse=False)
    if "mft_compile" not in skip:
        mft_row("mft (compile)", model, True, graphs + ", fused qkv and w13")

    if "int4" not in skip:
        try:
            from mft.quant.model import quantize_model_

            if not moe:
                quantize_model_(model, INT4)
            if "int4_dequant" not in skip:
                mft_row("mft int4 (eager)", model, False, "int4 g128, mft.quant's dequantise + matmul")
                mft_row("mft int4 (compile)", model, True, "int4 g128, mft.quant's dequantise + matmul")
            from mft.generate.int4 import Int4GroupedLinear, use_int4_kernels

            if use_int4_kernels(model):
                experts = ""
                if moe:
                    stacks = sum(isinstance(m, Int4GroupedLinear) for m in model.modules())
                    experts = (f"; experts: {stacks} int4 stacks, chosen experts only" if stacks else
                               "; experts bf16 (this mft.quant does not quantise them)")
                mft_row("mft int4 kernel (eager)", model, False, "int4 g128 on torch's int4 matmul (tinygemm)" + experts)
                mft_row("mft int4 kernel (compile)", model, True,
                        "int4 g128 on torch's int4 matmul, CUDA graphs" + experts)
            else:
                rows.append({"name": "mft int4 kernel", "error": f"torch has no int4 matmul for {device}"})
        except ImportError as e:
            rows.append({"name": "mft int4", "error": f"mft.quant unavailable: {e}"})
        except Exception as e:  # noqa: BLE001 - e.g. the kernel's layout check
            rows.append({"name": "mft int4", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})

    # -- report -----------------------------------------------------------------------------------
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\n## Decoding, batch 1: {title}{f', {args.n_layers} layers' if opts.layers else ''}"
          f"{f', window {opts.window}' if opts.window else ''}, {opts.dtype}, prompt {opts.prompt}, new {opts.new}")
    print(f"device: {gpu}; torch {torch.__version__}; transformers {transformers.__version__}; "
          f"triton {getattr(sys.modules.get('triton'), '__version__', 'n/a')}; commit {commit()}")
    print(f"command: python tools/bench_generate.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    base = next((r for r in rows if r["name"].startswith("transformers generate (default)") and "error" not in r), None)
    print("| run | tokens/s | vs transformers default | s per call | peak GiB | argmax gap (logit std) | note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | failed | | | | | {r['error']} |")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        print(f"| {r['name']} | {r['tokens_per_s']:.1f} | {ratio} | {r['seconds']:.2f} | {r['peak_gib']:.1f} | "
              f"{r['argmax_gap']:.3f} ({r['logit_std']:.2f}) | {r['note']} |")
    reference = outputs.get("transformers generate (default)")
    if reference is not None:
        for name, tokens in outputs.items():
            same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))
            print(f"greedy tokens equal to transformers' for the first {same}/{len(reference)}: {name}")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"rows": rows, "device": gpu, "torch": torch.__version__,
                                               "commit": commit(), "args": vars(opts)}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
