"""LoRA training speed of mft against transformers + peft (+ Liger, + bitsandbytes), issue 14.

    python tools/bench_train.py                                  # every training group, 7B v0.1 shape
    python tools/bench_train.py --groups seq4096 --layers 4      # a quick look
    python tools/bench_train.py --groups qlora --rows "mft nf4 compiled,tf+peft+bnb nf4"
    python tools/bench_train.py --load-7b --groups none          # only mft's loading of a 7B HF folder
    python tools/bench_train.py --device cpu --shape tiny --seq 64 --steps 1 --warmup 0   # smoke test

Every row runs in its own subprocess (a fresh CUDA context, so peaks and compile caches do not
mix; a row that fails or runs out of memory is printed as failed with the first line of its error,
and the others go on), on the same batch: seq + 1 token ids drawn on the CPU from seed 0. Common
to all rows: a conf/model/ shape (--shape, default the 7B v0.1 one) with random bf16 weights drawn
directly on the device, LoRA r=16 alpha=32 (fp32 factors) on wq wk wv wo w1 w2 w3 (q_proj k_proj
v_proj o_proj gate_proj down_proj up_proj), AdamW (foreach) on the LoRA factors, batch 1, every
position supervised.

- mft eager / compiled: mft.build.build_model, attention "auto", Runtime(compile=...,
  activation_checkpointing=none | full | selective | auto, memory_budget_gib for auto), the step
  model(tokens, targets) (the head and cross-entropy in chunks of --ce-chunk tokens), inside
  mft.peft.lora.lora_step_copies when that exists; "mft nf4" / "mft int4": the base quantised
  (tools/bench_common.py SPECS).
- tf+peft: transformers' MistralForCausalLM of the same shape, attn_implementation "sdpa", peft's
  LoRA, labels = input_ids (transformers shifts them), the forward under torch.autocast(bf16) as
  the HF Trainer runs it with bf16=True; checkpointing "on" is gradient_checkpointing_enable with
  use_reentrant=False.
- tf+peft+liger: the same after liger_kernel.transformers.apply_liger_kernel_to_mistral() (fused
  linear cross-entropy, RMSNorm, RoPE, SwiGLU).
- tf+peft+bnb nf4: the same with every decoder linear layer turned into a bitsandbytes Linear4bit
  (nf4, double quant, bf16 compute), quantised one at a time from the random bf16 model; the
  other weights stay bf16 (no fp32 upcast of prepare_model_for_kbit_training: the faster baseline).

Groups (--groups): seq4096 (no checkpointing: mft eager and compiled, tf+peft, +liger),
seq4096-ac (checkpointing on: mft eager and compiled x full, selective, auto at 17 GiB, tf+peft,
+liger; the note says whether each row fits 17 GiB), seq16k (one 16384-token document: mft
compiled x full, selective, auto at the free memory, tf+peft), packed32k (8 documents x 4096 in
one 32768-token stream: mft compiled x the same three), qlora (seq 4096, checkpointing on: mft
compiled bf16, nf4, int4 full, nf4 and int4 auto at 7 GiB, tf+peft+bnb nf4), and
load-7b (not in "all"; --load-7b adds it): a random model of the shape written as a sharded
Hugging Face folder (10 GB shards, as the hub's Mistral-7B-v0.1) to --tmp-dir, then mft's load of
it (checkpoint_spec + build_model, bf16, on the device) in GB/s of safetensors, page cache warm
(the files were just written; nothing is dropped).

Columns: tokens/s = seq / the median step time of --steps timed steps after --warmup; peak =
torch.cuda.max_memory_allocated over the timed steps ("-" on CPU); "vs tf+peft" = tokens/s over
the tf+peft row of the same seq with checkpointing equally on or off (mft's auto counts as on);
MFU = tokens/s x F / 790 TFLOP/s, F = tools/bench_common.py flops_per_token: 4 x (linear + head
parameters) + 3 x 2 x 2 x mean keys x n_heads x head_dim per layer (mean keys per query: (doc + 1)
/ 2 in a causal document no longer than the window), recompute not counted; loss = the last
step's (each stack draws its own random weights, so losses differ; NaN fails the row). The goals
of the issue follow the table as PASS / FAIL lines. Exit status 1 when a row failed.
"""

import argparse
import gc
import itertools
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from bench_common import GIB, PEAK_TFLOPS, SPECS, commit, flops_per_token, package_version, preset_args, preset_names
from mft.build.memory import POLICIES
from mft.model.args import ModelArgs

TRAINING_GROUPS = ("seq4096", "seq4096-ac", "seq16k", "packed32k", "qlora")
GROUPS = TRAINING_GROUPS + ("load-7b",)
FIT_GIB = 17.0  # the issue's memory limit for bf16 LoRA at seq 4096
QLORA_GIB = 7.0  # the issue's memory limit for QLoRA at seq 4096
LORA_RANK, LORA_ALPHA = 16, 32
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HUB_SHARD_SIZE = "10GB"  # Mistral-7B-v0.1 on the hub: two shards of up to 10 GB
RESULT_MARK = "BENCH_RESULT "
PACKAGES = ("torch", "triton", "transformers", "peft", "liger-kernel", "bitsandbytes")


@dataclass(frozen=True)
class Row:
    """One measurement: which stack, how it runs, on how many tokens."""

    group: str
    stack: str  # "mft", "hf" (transformers + peft) or "load" (mft loading a checkpoint)
    checkpointing: str = "none"  # mft: none | full | selective | auto; hf: none | on
    seq: int = 4096  # tokens in the step
    docs: int = 1  # equal-length documents packed in them
    compile: bool = False  # mft: Runtime(compile=True)
    quant: Optional[str] = None  # mft: a SPECS name; hf: "nf4" through bitsandbytes
    liger: bool = False  # hf: Liger's kernels patched in
    budget_gib: Optional[float] = None  # mft auto's memory budget; None: the device's free memory

    @property
    def name(self) -> str:
        if self.stack == "load":
            return "mft load"
        if self.stack == "mft":
            return " ".join(["mft"] + ([self.quant] if self.quant else []) + ["compiled" if self.compile else "eager"])
        return "tf+peft" + ("+liger" if self.liger else "") + (f"+bnb {self.quant}" if self.quant else "")

    @property
    def checkpointing_on(self) -> bool:
        return self.checkpointing != "none"

    @property
    def checkpointing_label(self) -> str:
        if self.checkpointing != "auto":
            return self.checkpointing
        return f"auto ({self.budget_gib:g} GiB)" if self.budget_gib else "auto (free memory)"

    @property
    def seq_label(self) -> str:
        return str(self.seq) if self.docs == 1 else f"{self.seq} = {self.docs} x {self.seq // self.docs}"


def group_rows(group: str, seq: Optional[int], seq_list: list[int]) -> list[Row]:
    """The rows of `group`; `seq` replaces its token count, `seq_list` the seq4096 groups' counts."""
    short = seq_list or [seq or 4096]
    if group == "seq4096":
        return [r for s in short for r in (
            Row(group, "mft", seq=s), Row(group, "mft", seq=s, compile=True),
            Row(group, "hf", seq=s), Row(group, "hf", seq=s, liger=True))]
    if group == "seq4096-ac":
        return [r for s in short for r in (
            [Row(group, "mft", policy, s, compile=compiled, budget_gib=FIT_GIB if policy == "auto" else None)
             for compiled in (False, True) for policy in ("full", "selective", "auto")]
            + [Row(group, "hf", "on", s), Row(group, "hf", "on", s, liger=True)])]
    if group == "seq16k":
        s = seq or 16384
        return [Row(group, "mft", policy, s, compile=True) for policy in ("full", "selective", "auto")] + [
            Row(group, "hf", "on", s)]
    if group == "packed32k":
        s = seq or 32768
        return [Row(group, "mft", policy, s, docs=8, compile=True) for policy in ("full", "selective", "auto")]
    if group == "qlora":
        s = seq or 4096
        full = [Row(group, "mft", "full", s, compile=True, quant=q) for q in (None, "nf4", "int4")]
        auto = [Row(group, "mft", "auto", s, compile=True, quant=q, budget_gib=QLORA_GIB) for q in ("nf4", "int4")]
        return full + auto + [Row(group, "hf", "on", s, quant="nf4")]
    if group == "load-7b":
        return [Row(group, "load", seq=0)]
    raise ValueError(group)


# -- one row, in its own process -------------------------------------------------------------------

def model_args(opts) -> ModelArgs:
    """The preset's shape, with --layers blocks when given."""
    args = preset_args(opts.shape)
    return replace(args, n_layers=opts.layers) if opts.layers else args


def token_batch(row: Row, vocab_size: int) -> torch.Tensor:
    """seq + 1 token ids, the same for every row of this seq whatever the device."""
    return torch.randint(0, vocab_size, (row.seq + 1,), generator=torch.Generator().manual_seed(0))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[], torch.Tensor], opts, device: torch.device) -> dict:
    """Median step time over the timed steps, their peak memory, and the last loss."""
    for _ in range(opts.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(opts.steps):
        begin = time.perf_counter()
        loss = step()
        synchronize(device)
        times.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    result = {"step_s": statistics.median(times), "peak_gib": peak, "loss": float(loss)}
    if getattr(opts, "breakdown", False) and device.type == "cuda":  # bench_moe.py measures without it
        profile = kernel_breakdown(step, top=getattr(opts, "top_kernels", 0))
        result["kernels_s"] = profile.pop("kinds")
        result.update(profile)
    return result


# Substrings of CUDA kernel names, by kind (cuBLAS's nvjet/cutlass GEMMs; cuDNN's, FlashAttention's
# and mft's Triton attention kernels); every other kernel (elementwise, reductions, copies) is "other".
KERNEL_KINDS = (("attention", ("flash", "fmha", "sdpa", "cudnn::fusion", "_swa_", "attn")),
                ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "splitk", "grouped_mm")))


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(m in lowered for m in marks)), "other")


def kernel_breakdown(step: Callable[[], torch.Tensor], steps: int = 2, top: int = 0) -> dict:
    """GPU time per step by kernel kind (seconds), from torch.profiler over `steps` more steps; the
    profiler's own annotations of compiled graphs ("## Call CompiledFxGraph ...") are not kernels.
    With `top`, also the `top` kernels by time and the `top` kernels followed by the most GPU idle."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == DeviceType.CUDA and not e.name.startswith("## ")]
    totals = {kind: 0.0 for kind in ("matmul", "attention", "other")}
    for name, start, end in kernels:
        totals[kernel_kind(name)] += (end - start) / 1e6 / steps
    if not top:
        return {"kinds": totals}
    return {"kinds": totals, "top": top_kernels(kernels, steps, top), "idle_after": idle_after(kernels, steps, top)}


def top_kernels(kernels: list[tuple[str, float, float]], steps: int, top: int) -> list[tuple[str, float, float]]:
    """The `top` kernel names by GPU time: (name, ms per step, launches per step)."""
    time_us, calls = Counter(), Counter()
    for name, start, end in kernels:
        time_us[name] += end - start
        calls[name] += 1
    return [(name, us / 1e3 / steps, calls[name] / steps) for name, us in time_us.most_common(top)]


def idle_after(kernels: list[tuple[str, float, float]], steps: int, top: int) -> list[tuple[str, float, float]]:
    """GPU idle attributed to the kernel that ran before it (gaps over 5 us between one kernel's end and
    the next one's start, on any stream): (name, idle ms per step, gaps per step), the `top` largest."""
    ordered = sorted(kernels, key=lambda k: k[1])
    idle_us, gaps = Counter(), Counter()
    end_so_far = ordered[0][2] if ordered else 0.0
    for (name, _, _), (_, start, end) in itertools.pairwise(ordered):
        if start - end_so_far > 5:
            idle_us[name] += start - end_so_far
            gaps[name] += 1
        end_so_far = max(end_so_far, end)
    return [(name, us / 1e3 / steps, gaps[name] / steps) for name, us in idle_us.most_common(top)]


def run_mft(row: Row, args: ModelArgs, opts, device: torch.device) -> dict:
    """mft's LoRA step, built as mft-train builds it."""
    from mft.build import ModelSpec, Runtime, build_model
    from mft.config import OptimConfig
    from mft.peft import lora
    from mft.train.optim import build_optimizer

    spec = ModelSpec(args, attn_backend="auto", quant=SPECS[row.quant] if row.quant else None,
                     lora=lora.LoRASettings(r=LORA_RANK, alpha=LORA_ALPHA))
    runtime = Runtime(device=device, dtype=torch.bfloat16, train=True, compile=row.compile,
                      activation_checkpointing=row.checkpointing, memory_budget_gib=row.budget_gib,
                      tokens_per_microbatch=row.seq)
    model = build_model(spec, runtime)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-5, weight_decay=0.0))
    tokens = token_batch(row, args.vocab_size).to(device)
    inputs, targets = tokens[:-1], tokens[1:]
    doc = row.seq // row.docs
    positions = torch.arange(doc, device=device).repeat(row.docs)
    cu_seqlens = torch.arange(0, row.seq + 1, doc, dtype=torch.int32, device=device)
    step_copies = getattr(lora, "lora_step_copies", None)

    def step() -> torch.Tensor:
        with step_copies(model) if step_copies else nullcontext():
            loss = model(inputs, positions, cu_seqlens, doc, targets=targets, loss_chunk=opts.ce_chunk) / row.seq
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return measure(step, opts, device)


def quantize_with_bnb(model: torch.nn.Module, device: torch.device) -> None:
    """Every decoder linear layer of a transformers Mistral model, in place, as a bitsandbytes
    nf4 Linear4bit (double quant, bf16 compute), one layer at a time (its bf16 weight then freed)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear) or name not in HF_TARGETS:
                    continue
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", module=q).to(device)
                setattr(parent, name, q)
    model.is_loaded_in_4bit = True  # as transformers' bnb quantiser marks it: peft then wraps with its bnb LoRA layer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_hf(row: Row, args: ModelArgs, opts, device: torch.device) -> dict:
    """transformers + peft's LoRA step (+ Liger's kernels, + a bitsandbytes base)."""
    if row.liger:
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_mistral
        except ImportError:
            return {"skipped": "liger-kernel not installed"}
        if device.type != "cuda":
            return {"skipped": "liger-kernel's Triton kernels need a GPU"}
        apply_liger_kernel_to_mistral()  # patches transformers' Mistral classes: before the model is made
    if row.quant:
        try:
            import bitsandbytes  # noqa: F401  (only whether it imports)
        except ImportError:
            return {"skipped": "bitsandbytes not installed"}
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    from mft.checkpoint.hf import args_to_hf_config

    config = MistralConfig(**{**args_to_hf_config(args, torch.bfloat16), "use_cache": False})
    with torch.device(device):
        model = MistralForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    if row.quant:
        quantize_with_bnb(model, device)
    if row.checkpointing_on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                             target_modules=list(HF_TARGETS), task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0,
                                  foreach=True)
    input_ids = token_batch(row, args.vocab_size)[:-1].to(device)[None]

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return measure(step, opts, device)


def run_load(args: ModelArgs, opts, device: torch.device) -> dict:
    """Write a random model as a sharded Hugging Face folder, then time mft's load of it."""
    from mft.build import ModelSpec, Runtime, build_model, checkpoint_spec
    from mft.checkpoint.export import write_hf

    runtime = Runtime(device=device, dtype=torch.bfloat16)
    model = build_model(ModelSpec(args), runtime)
    probes = {"layers.0.attention.wq.weight": model.layers[0].attention.wq.weight.cpu(),
              "output.weight": model.output.weight.cpu()}
    folder = Path(tempfile.mkdtemp(prefix="bench_train_load_", dir=opts.tmp_dir))
    try:
        begin = time.perf_counter()
        write_hf(model, folder, max_shard_size=HUB_SHARD_SIZE)
        write_s = time.perf_counter() - begin
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        shards = sorted(folder.glob("*.safetensors"))
        nbytes = sum(f.stat().st_size for f in shards)
        synchronize(device)
        begin = time.perf_counter()
        model = build_model(checkpoint_spec(folder), runtime)
        synchronize(device)
        load_s = time.perf_counter() - begin
        state = model.state_dict()
        same = all(torch.equal(state[name].cpu(), tensor) for name, tensor in probes.items())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"bytes": nbytes, "shards": len(shards), "write_s": write_s, "load_s": load_s, "weights_equal": same}


def run_row(row: Row, opts) -> dict:
    """One row's result: measurements, or {"skipped": why}."""
    device = torch.device(opts.device)
    args = model_args(opts)
    if row.stack == "load":
        return run_load(args, opts, device)
    result = run_mft(row, args, opts, device) if row.stack == "mft" else run_hf(row, args, opts, device)
    if "step_s" in result:
        result["tokens_per_s"] = row.seq / result["step_s"]
    return result


def child_main(row: Row, opts) -> int:
    """Run `row` and print its result as one marked JSON line (errors included)."""
    return print_result(lambda: run_row(row, opts))


def print_result(run: Callable[[], dict]) -> int:
    """Print what `run` returns, or its error's first line, as the marked JSON line the parent reads."""
    try:
        result = run()
    except Exception as e:  # the parent prints the row as failed, with this first line
        message = str(e).strip().splitlines()
        result = {"error": type(e).__name__ + (f": {message[0]}" if message else "")}
    if "loss" in result and result["loss"] != result["loss"]:
        result = {**result, "error": "loss is NaN"}
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


# -- the parent: one subprocess per row, the table, the goals --------------------------------------

def child_command(row: Row, opts) -> list[str]:
    """This script, run for `row` alone with the parent's settings."""
    passed = ["--shape", opts.shape, "--steps", str(opts.steps), "--warmup", str(opts.warmup),
              "--device", opts.device, "--ce-chunk", str(opts.ce_chunk)] + (["--breakdown"] if opts.breakdown else [])
    passed += ["--top-kernels", str(opts.top_kernels)] if opts.top_kernels else []
    passed += ["--layers", str(opts.layers)] if opts.layers else []
    passed += ["--tmp-dir", opts.tmp_dir] if opts.tmp_dir else []
    return [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(asdict(row))] + passed


def run_in_subprocess(row: Row, opts) -> dict:
    """`row`'s result from a fresh process; a crash or a timeout is a failure with its reason."""
    return run_child(child_command(row, opts), opts.timeout, opts.verbose)


def run_child(command: list[str], timeout: float, verbose: bool) -> dict:
    """The result line a child process printed (after RESULT_MARK), or its failure with the reason."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if verbose:
        sys.stderr.write(done.stdout + done.stderr)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    last = [line for line in done.stderr.splitlines() if line.strip()]
    return {"error": f"exit status {done.returncode}: {last[-1].strip() if last else 'no output'}"}


def reference(results: list[tuple[Row, dict]], row: Row, liger: bool = False) -> Optional[float]:
    """tokens/s of the tf+peft (bf16, or + Liger) row of `row`'s seq with checkpointing equally on/off,
    from `row`'s group if it has one."""
    for other, result in sorted(results, key=lambda rr: rr[0].group != row.group):
        if (other.stack == "hf" and not other.quant and other.liger == liger and other.seq == row.seq
                and other.docs == row.docs and other.checkpointing_on == row.checkpointing_on):
            return result.get("tokens_per_s")
    return None


def fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[tuple[Row, dict]], args: ModelArgs, on_gpu: bool) -> list[str]:
    """The markdown table of the training rows (MFU only on a GPU: the peak is a GPU's)."""
    lines = ["| group | row | act. ckpt | seq | tokens/s | peak GiB | vs tf+peft | MFU | loss | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row, r in results:
        if row.stack == "load":
            continue
        tps, peak, ref = r.get("tokens_per_s"), r.get("peak_gib"), reference(results, row)
        ratio = tps / ref if tps and ref else None
        mfu = 100 * tps * flops_per_token(args, row.seq // row.docs) / (PEAK_TFLOPS * 1e12) if tps and on_gpu else None
        if "error" in r:
            note = f"failed: {r['error']}"
        elif "skipped" in r:
            note = f"skipped: {r['skipped']}"
        elif row.group in ("seq4096-ac", "qlora") and peak is not None:
            limit = FIT_GIB if row.group == "seq4096-ac" else QLORA_GIB
            note = f"fits {limit:g} GiB" if peak <= limit else f"over {limit:g} GiB"
        else:
            note = ""
        lines.append(f"| {row.group} | {row.name} | {row.checkpointing_label} | {row.seq_label} | {fmt(tps, ',.0f')} | "
                     f"{fmt(peak, '.2f')} | {fmt(ratio, '.2f')}{'x' if ratio else ''} | "
                     f"{fmt(mfu, '.1f')}{'%' if mfu else ''} | {fmt(r.get('loss'), '.3f')} | {note} |")
    return lines


def breakdown_table(results: list[tuple[Row, dict]]) -> list[str]:
    """Where each row's step goes (--breakdown): GPU kernel time by kind, and the GPU idle rest of the
    step; "bound" is the tokens/s the row would reach if its matmuls and attention took all the time."""
    lines = ["| group | row | act. ckpt | step ms | matmul ms | attention ms | other kernels ms | GPU idle ms | "
             "bound tokens/s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row, r in results:
        kernels = r.get("kernels_s")
        if not kernels:
            continue
        # Kernels on several streams may overlap, so idle can come out negative; kernels the kinds do
        # not name (an unknown GEMM) count as "other", so matmul + attention may be 0.
        idle = r["step_s"] - sum(kernels.values())
        compute = kernels["matmul"] + kernels["attention"]
        bound = row.seq / compute if compute > 0 else None
        lines.append(f"| {row.group} | {row.name} | {row.checkpointing_label} | {1e3 * r['step_s']:.1f} | "
                     f"{1e3 * kernels['matmul']:.1f} | {1e3 * kernels['attention']:.1f} | {1e3 * kernels['other']:.1f} | "
                     f"{1e3 * idle:.1f} | {fmt(bound, ',.0f')} |")
    return lines if len(lines) > 2 else []


def kernel_lines(results: list[tuple[Row, dict]]) -> list[str]:
    """Each row's top kernels and the kernels idle follows (--top-kernels), as indented lists."""
    lines = []
    for row, r in results:
        for key, title, unit in (("top", "kernels by GPU time", "ms"), ("idle_after", "idle after", "idle ms")):
            if r.get(key):
                lines.append(f"\n{row.group} | {row.name} | {row.checkpointing_label}: {title} (per step)")
                lines += [f"  {ms:8.2f} {unit}  x{count:<6g} {name[:140]}" for name, ms, count in r[key]]
    return lines


def verdict(ok: Optional[bool]) -> str:
    return "n/a " if ok is None else "PASS" if ok else "FAIL"


def goal_lines(results: list[tuple[Row, dict]]) -> list[str]:
    """The issue's goals for the groups that ran, each PASS, FAIL or n/a (a row it needs did not
    run, failed, or has no peak); a goal is judged on mft's best row that qualifies."""
    ran = {row.group for row, _ in results}
    ok = [(row, r) for row, r in results if r.get("tokens_per_s")]

    def mft_rows(group: str, limit: Optional[float] = None, quant: Optional[str] = None) -> list[tuple[Row, dict]]:
        return [(row, r) for row, r in ok if row.group == group and row.stack == "mft" and row.quant == quant
                and (limit is None or (r["peak_gib"] is not None and r["peak_gib"] <= limit))]

    def ratio_line(text: str, target: float, pairs: list[tuple[tuple[Row, dict], Optional[float]]]) -> str:
        """`text` judged on the best ratio among (row, reference tokens/s) pairs."""
        ratios = [(r["tokens_per_s"] / ref, row) for (row, r), ref in pairs if ref]
        if not ratios:
            return f"{verdict(None)} {text}"
        value, row = max(ratios, key=lambda vr: vr[0])
        return f"{verdict(value >= target)} {text}: {value:.2f}x ({row.name}, {row.checkpointing_label}, seq {row.seq})"

    lines = []
    if "seq4096" in ran:
        plain = mft_rows("seq4096")
        lines.append(ratio_line("seq4096 no checkpointing: mft >= 2.2x tf+peft", 2.2,
                                [(rr, reference(results, rr[0])) for rr in plain]))
        lines.append(ratio_line("seq4096 no checkpointing: mft >= 1.9x tf+peft+liger", 1.9,
                                [(rr, reference(results, rr[0], liger=True)) for rr in plain]))
    if "seq4096-ac" in ran:
        lines.append(ratio_line(f"seq4096 within {FIT_GIB:g} GiB: mft >= 2.0x tf+peft (checkpointing)", 2.0,
                                [(rr, reference(results, rr[0])) for rr in mft_rows("seq4096-ac", FIT_GIB)]))
    if "packed32k" in ran:
        packed = max(mft_rows("packed32k"), key=lambda rr: rr[1]["tokens_per_s"], default=None)
        tps = packed[1]["tokens_per_s"] if packed else None
        lines.append(f"{verdict(None if tps is None else tps >= 11000)} packed32k: mft >= 11,000 tokens/s"
                     + (f": {tps:,.0f} ({packed[0].name}, {packed[0].checkpointing_label})" if packed else ""))
    bnb = next((r["tokens_per_s"] for row, r in ok if row.group == "qlora" and row.stack == "hf"), None)
    for quant in ("nf4", "int4") if "qlora" in ran else ():
        peaks = [r["peak_gib"] for _, r in mft_rows("qlora", quant=quant) if r["peak_gib"] is not None]
        lines.append(f"{verdict(min(peaks) <= QLORA_GIB if peaks else None)} QLoRA {quant}: peak <= {QLORA_GIB:g} GiB"
                     + (f": {min(peaks):.2f} GiB at best" if peaks else ""))
        small = mft_rows("qlora", QLORA_GIB, quant)
        bf16 = {(row.checkpointing, row.compile): r["tokens_per_s"] for row, r in mft_rows("qlora")}
        lines.append(ratio_line(f"QLoRA {quant} within {QLORA_GIB:g} GiB: >= 0.9x bf16 LoRA (same checkpointing)", 0.9,
                                [(rr, bf16.get((rr[0].checkpointing, rr[0].compile))) for rr in small]))
        lines.append(ratio_line(f"QLoRA {quant} within {QLORA_GIB:g} GiB: >= 2.2x tf+peft+bnb", 2.2,
                                [(rr, bnb) for rr in small]))
    return lines


def load_lines(results: list[tuple[Row, dict]]) -> list[str]:
    """The load-7b group's result, in words."""
    lines = []
    for row, r in results:
        if row.stack != "load":
            continue
        if "error" in r:
            lines.append(f"load: failed: {r['error']}")
            continue
        lines.append(f"load: {r['bytes'] / 1e9:.2f} GB in {r['shards']} safetensors shard(s) ({HUB_SHARD_SIZE} max) "
                     f"read and built in {r['load_s']:.2f} s = {r['bytes'] / 1e9 / r['load_s']:.2f} GB/s "
                     f"(checkpoint_spec + build_model, bf16; page cache warm: written {r['write_s']:.1f} s before, "
                     f"nothing dropped); weights equal to the written ones: {'yes' if r['weights_equal'] else 'NO'}")
    return lines


def header(opts, args: ModelArgs) -> list[str]:
    """Device, software, commit and the exact command."""
    device = torch.device(opts.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else (
        platform.processor() or platform.machine() or "cpu")
    versions = " | ".join(f"{p} {package_version(p)}" for p in PACKAGES)
    return [f"device: {name} | CUDA {torch.version.cuda} | {versions}",
            f"commit: {commit(opts.commit)}",
            f"command: python {shlex.join(sys.argv)}",
            f"shape {opts.shape} ({args.n_layers} layers), bf16 base, LoRA r={LORA_RANK} alpha={LORA_ALPHA} on the seven "
            f"linear layers, batch 1, every position supervised, AdamW; {opts.warmup} warm-up + {opts.steps} timed steps "
            f"(median), mft CE chunk {opts.ce_chunk}",
            f"MFU = tokens/s x (4 x (linear + head params) + 3 x 2 x 2 x mean keys per query x n_heads x head_dim x "
            f"n_layers) / {PEAK_TFLOPS:g} TFLOP/s; mean keys = (doc + 1) / 2 causal within the window; recompute not counted"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    from mft.config import TrainConfig

    chunk = next(f.default for f in fields(TrainConfig) if f.name == "loss_chunk_tokens")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=preset_names(), default="mistral-7b-v0.1", help="a conf/model/ preset")
    parser.add_argument("--layers", type=int, help="override n_layers (quick runs)")
    parser.add_argument("--groups", default="all", help=f"comma list of {', '.join(GROUPS)}; all: the training "
                        "groups; none: no training group")
    parser.add_argument("--load-7b", action="store_true", help="also run the load-7b group")
    parser.add_argument("--rows", help="comma list of row names to keep (e.g. 'mft compiled,tf+peft')")
    parser.add_argument("--policies", help="comma list: keep only mft rows with these activation checkpointing "
                        "policies (none, full, selective, auto)")
    parser.add_argument("--seq", type=int, help="tokens per step in every group (default: each group's own)")
    parser.add_argument("--seq-list", help="comma list of token counts for the seq4096 groups")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--ce-chunk", type=int, default=chunk, help="mft: tokens per chunk of the head + cross-entropy")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per row's subprocess")
    parser.add_argument("--commit", help="the commit to print (the GPU machine's git metadata may be stale)")
    parser.add_argument("--tmp-dir", help="where load-7b writes its folder (default: the system's temp dir)")
    parser.add_argument("--verbose", action="store_true", help="echo each row's subprocess output")
    parser.add_argument("--breakdown", action="store_true", help="also profile 2 steps per row (CUDA): GPU time "
                        "by kernel kind and GPU idle time, in a second table")
    parser.add_argument("--top-kernels", type=int, default=0, help="with --breakdown: list each row's N kernels "
                        "with the most GPU time and the N most often followed by GPU idle")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.steps < 1 or opts.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if opts.layers:
        try:
            model_args(opts).windows
        except ValueError as e:
            parser.error(f"--layers {opts.layers}: {e}")
    return opts


def comma_set(text: str) -> set[str]:
    """The names of a comma list, stripped, empty ones left out."""
    return {name.strip() for name in text.split(",") if name.strip()}


def selected_rows(opts) -> list[Row]:
    """The rows of the chosen groups, filtered by --rows."""
    names = {"all": list(TRAINING_GROUPS), "none": []}
    groups = [g for part in opts.groups.split(",") if part for g in names.get(part, [part])]
    groups += ["load-7b"] if opts.load_7b and "load-7b" not in groups else []
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise SystemExit(f"--groups: unknown {', '.join(unknown)}; expected a comma list of {', '.join(GROUPS)}, "
                         "all or none")
    seq_list = [int(s) for s in opts.seq_list.split(",") if s] if opts.seq_list else []
    rows = [row for g in groups for row in group_rows(g, opts.seq, seq_list)]
    if opts.rows:
        wanted = comma_set(opts.rows)
        known = {row.name for g in GROUPS for row in group_rows(g, opts.seq, seq_list)}
        if wanted - known:
            raise SystemExit(f"--rows: unknown {', '.join(sorted(wanted - known))}; rows are {', '.join(sorted(known))}")
        rows = [row for row in rows if row.name in wanted]
    if opts.policies:
        policies = comma_set(opts.policies)
        unknown = policies - {*POLICIES, "auto"}
        if unknown:
            raise SystemExit(f"--policies: unknown {', '.join(sorted(unknown))}; expected a comma list of "
                             f"{', '.join(POLICIES)} or auto")
        rows = [row for row in rows if row.stack != "mft" or row.checkpointing in policies]
    return rows


def main() -> int:
    opts = parse_args()
    if opts.child:
        return child_main(Row(**json.loads(opts.child)), opts)
    rows = selected_rows(opts)
    results = []
    for i, row in enumerate(rows, 1):
        result = run_in_subprocess(row, opts)
        results.append((row, result))
        outcome = result.get("error") or result.get("skipped") or (
            f"{result['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in result
            else f"{result['bytes'] / 1e9 / result['load_s']:.2f} GB/s")
        print(f"[{i}/{len(rows)}] {row.group} | {row.name} | {row.checkpointing_label} | {row.seq_label}: {outcome}",
              file=sys.stderr, flush=True)
    args = model_args(opts)
    print("\n".join(header(opts, args)) + "\n")
    if any(row.stack != "load" for row in rows):
        print("\n".join(table(results, args, torch.device(opts.device).type == "cuda")) + "\n")
        print("\n".join(goal_lines(results)))
        if opts.breakdown:
            print("\n" + "\n".join(breakdown_table(results)))
            print("\n".join(kernel_lines(results)))
    print("\n".join(load_lines(results)))
    return 1 if any("error" in r for _, r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
