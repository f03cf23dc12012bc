"""QLoRA (nf4, int4) vs bf16 LoRA on a 7B-shaped Mistral: peak GPU memory and tokens/s.

    python tools/bench_qlora.py                              # the issue's settings, all three variants
    python tools/bench_qlora.py --variants nf4 --layers 4    # a quick look
    python tools/bench_qlora.py --shape mistral-small-24b --variants nf4   # any conf/model/ preset

Random weights built directly on the GPU (quantised layers drawn in bf16 one at a time and
quantised: the path of a streaming load), LoRA r=16 alpha=32 on wq wk wv wo w1 w2 w3, one
packed sequence of --seq tokens (batch 1, every position supervised), activation
checkpointing per block, chunked cross-entropy through the head, AdamW on the LoRA factors.
Peak memory is torch.cuda.max_memory_allocated over the training steps (weights, LoRA,
optimizer states, activations); "build peak" is the peak while building the model.
Imports torch, triton and mft's model/peft/quant/kernels only (no Hydra).
"""

import argparse
import gc
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import torch

from bench_common import GIB, PEAK_TFLOPS, SPECS, commit, flops_per_token, preset_args, preset_names
from mft.build import ModelSpec, Runtime, build_model
from mft.model.args import ModelArgs
from mft.peft.lora import LoRASettings
from mft.quant.dequant import dequantize, dequantize_torch
from mft.quant.formats import quantize
from mft.train.optim import build_optimizer


def build(variant: str, args: ModelArgs, device: torch.device, opts):
    """mft-train's build: the base (quantised for nf4/int4) with LoRA, checkpointed blocks."""
    spec = ModelSpec(args, attn_backend=opts.attn, quant=SPECS.get(variant), lora=LoRASettings(r=opts.rank, alpha=2 * opts.rank))
    runtime = Runtime(device=device, dtype=torch.bfloat16, train=True, activation_checkpointing="none" if opts.no_ac else "full")
    return build_model(spec, runtime)


def run_variant(variant: str, args: ModelArgs, opts, device: torch.device) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = build(variant, args, device, opts)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - start
    build_peak = torch.cuda.max_memory_allocated()
    weights = torch.cuda.memory_allocated()
    optimizer = build_optimizer(model, SimpleNamespace(lr=1e-5, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0))
    g = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (opts.seq + 1,), device=device, generator=g)
    inputs, targets = tokens[:-1], tokens[1:]
    positions = torch.arange(opts.seq, device=device)
    cu_seqlens = torch.tensor([0, opts.seq], dtype=torch.int32, device=device)
    torch.cuda.reset_peak_memory_stats()

    def step(model, optimizer) -> torch.Tensor:
        loss = model(inputs, positions, cu_seqlens, opts.seq, targets=targets, loss_chunk=opts.ce_chunk) / opts.seq
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(opts.warmup):
        step(model, optimizer)
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(opts.steps):
        loss = step(model, optimizer)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - begin
    result = {
        "variant": variant, "weights_gib": weights / GIB, "build_peak_gib": build_peak / GIB, "build_s": build_s,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB, "tokens_per_s": opts.steps * opts.seq / elapsed,
        "step_s": elapsed / opts.steps, "loss": float(loss),
    }
    del model, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return result


def dequant_bandwidth(args: ModelArgs, device: torch.device) -> list:
    """Triton vs torch dequantisation of the largest linear weight: GB/s of bytes moved."""
    w = torch.randn(args.hidden_dim, args.dim, device=device, dtype=torch.bfloat16) * 0.02
    rows = []
    for name, spec in SPECS.items():
        qt = quantize(w, spec)
        moved = sum(t.numel() * t.element_size() for t in qt.parts.values()) + w.numel() * 2
        for impl, fn in (("triton", dequantize), ("torch", dequantize_torch)):
            fn(qt, torch.bfloat16)
            torch.cuda.synchronize()
            begin, reps = time.perf_counter(), 20
            for _ in range(reps):
                fn(qt, torch.bfloat16)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - begin) / reps
            rows.append((name, impl, seconds * 1e6, moved / seconds / 1e9))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=preset_names(), default="mistral-7b-v0.3",
                        help="a conf/model/ preset")
    parser.add_argument("--variants", default="bf16,nf4,int4", help=f"comma list of bf16, {', '.join(SPECS)}")
    parser.add_argument("--layers", type=int, help="override n_layers (quick runs)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ce-chunk", type=int, default=1024, help="tokens per chunk of the head + cross-entropy")
    parser.add_argument("--attn", default="auto", help="attention backend name")
    parser.add_argument("--no-ac", action="store_true", help="no activation checkpointing")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-peak-gib", type=float, default=7.0, help="flag quantised variants above this")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_qlora needs a CUDA GPU", file=sys.stderr)
        return 1
    device = torch.device(opts.device)
    args = preset_args(opts.shape)
    if opts.layers:
        args = replace(args, n_layers=opts.layers)
        try:
            args.windows
        except ValueError as e:
            parser.error(f"--layers {opts.layers}: {e}")
    import triton

    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
          f"triton {triton.__version__} | commit {commit()}")
    print(f"command: {' '.join(sys.argv)}")
    print(f"shape {opts.shape} ({args.n_layers} layers), seq {opts.seq}, batch 1, LoRA r={opts.rank} on all linear "
          f"layers, activation checkpointing {'off' if opts.no_ac else 'on'}, CE chunk {opts.ce_chunk}\n")

    results = [run_variant(v, args, opts, device) for v in opts.variants.split(",") if v]
    base = next((r["tokens_per_s"] for r in results if r["variant"] == "bf16"), None)
    flops = flops_per_token(args, opts.seq)
    header = f"{'variant':<16}{'weights GiB':>12}{'build peak':>12}{'train peak':>12}{'tokens/s':>10}{'vs bf16':>9}{'MFU':>7}{'loss':>9}"
    print(header)
    print("-" * len(header))
    failed = False
    for r in results:
        ratio = f"{r['tokens_per_s'] / base:.3f}" if base else "-"
        mfu = r["tokens_per_s"] * flops / (PEAK_TFLOPS * 1e12)
        flag = ""
        if r["variant"] != "bf16" and r["peak_gib"] > opts.max_peak_gib:
            flag, failed = f"  > {opts.max_peak_gib} GiB", True
        print(f"{r['variant']:<16}{r['weights_gib']:>12.2f}{r['build_peak_gib']:>12.2f}{r['peak_gib']:>12.2f}"
              f"{r['tokens_per_s']:>10.0f}{ratio:>9}{mfu:>7.1%}{r['loss']:>9.3f}{flag}")
    print("\ndequantise the largest weight "
          f"({args.hidden_dim} x {args.dim}) to bf16:")
    for name, impl, us, gbs in dequant_bandwidth(args, device):
        print(f"  {name:<16}{impl:<8}{us:>9.1f} us {gbs:>8.0f} GB/s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
