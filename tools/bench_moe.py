"""Mixtral LoRA / QLoRA training speed of mft against transformers + peft, issue 16.

    python tools/bench_moe.py                                    # every group, Mixtral-8x7B shape
    python tools/bench_moe.py --groups moe4-lora,moe4-lora-attn  # 4 blocks, mft vs tf+peft
    python tools/bench_moe.py --groups mixtral-qlora             # 32 blocks, mft QLoRA nf4
    python tools/bench_moe.py --device cpu --shape tiny --moe 4,2 --layers 1 --seq 64 --steps 1 --warmup 0

The structure of tools/bench_train.py: every row in its own subprocess (a fresh CUDA context; a
row that fails or runs out of memory is printed as failed with the first line of its error, the
others go on), all on the same batch (seq + 1 token ids from seed 0), random bf16 weights drawn on
the device, batch 1, every position supervised, AdamW (foreach) on the LoRA factors, tokens/s =
seq / the median of --steps timed steps after --warmup, peak = torch.cuda.max_memory_allocated over
the timed steps. The router's load-balancing loss is off on both sides (mft's aux_loss_scale 0,
transformers' output_router_logits False), and the router is never adapted.

LoRA r=16 alpha=32. "attn+experts": mft targets wq wk wv wo w1 w2 w3, w1 w2 w3 being the stacked
experts (one adapter per expert); transformers + peft 0.21 cannot wrap its experts as modules
(transformers 5 holds them as two 3-D parameters, not nn.Linear), so peft targets q/k/v/o_proj
with target_modules and the experts with target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"] (peft's ParamWrapper: a rank r adapter per expert of the fused
gate+up weight, so w1 and w3 share their A, and of down_proj; each forward adds B A into a copy
of the whole expert stack). "attn": wq wk wv wo / q_proj k_proj v_proj o_proj only. Before timing,
each row counts its trainable parameters against the number its targets must give (and a QLoRA
row the bytes of each quantised kind against 4 bits a weight): a LoRA or a quantisation that
silently skipped the experts fails the row instead of being timed.

- mft eager / compiled: mft.build.build_model as bench_train builds it (attention "auto",
  Runtime(compile=...)), the step model(tokens, targets) inside lora_step_copies; "mft nf4": the
  base (wq wk wv wo w1 w2 w3, experts included) in NF4 with double quantisation.
- tf+peft <experts>: transformers' MixtralForCausalLM, attn_implementation "sdpa",
  experts_implementation <experts>, forward under bf16 autocast (the HF Trainer's bf16=True),
  labels = input_ids. transformers 5.24's implementations: "grouped_mm" (its default, torch's
  grouped GEMM over the expert-sorted tokens: the fastest that runs offline), "eager" (a loop
  over the experts), "batched_mm" (gathers one weight matrix per token and expert: for decoding;
  8,192 x 117M weights at seq 4096, never run here), "deepgemm" and "sonicmoe" (kernels fetched
  from the Hugging Face hub at run time: not run here).

Groups (--groups): moe4-lora (4 blocks of the shape, LoRA attn+experts, no checkpointing: mft
eager, compiled, tf+peft grouped_mm, eager), moe4-lora-attn (the same with LoRA on attention
only), mixtral-qlora (all blocks, LoRA attn+experts, mft nf4 compiled with checkpointing full and
auto at 40 GiB; transformers + peft + bitsandbytes is not run: bitsandbytes quantises nn.Linear
layers, so transformers' 3-D experts would stay bf16, 84 GiB for the 8x7B).

Columns: "vs tf+peft" = tokens/s over the tf+peft grouped_mm row of the same group; MFU =
tokens/s x F / 790 TFLOP/s, F = tools/bench_common.py flops_per_token over ACTIVE parameters:
4 x (attention + k experts' SwiGLU + router + head parameters) + 3 x 2 x 2 x mean keys x n_heads
x head_dim per layer (mean keys per query (doc + 1) / 2, causal), recompute not counted;
trainable = LoRA parameters (millions); loss = the last step's (each stack draws its own weights).
The mixtral-qlora goal (peak <= 40 GiB) follows the table as PASS / FAIL, with the mistral-finetune
reference (2,966 tokens/s per GPU, 8 x H100, bf16 LoRA) for comparison. Exit status 1 when a row
failed.
"""

import argparse
import json
import platform
import re
import shlex
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

import torch

from bench_common import PEAK_TFLOPS, SPECS, commit, flops_per_token, package_version, preset_args, preset_names
from bench_train import fmt, measure, print_result, run_child, token_batch, verdict
from mft.model.args import ModelArgs, MoeArgs

GROUPS = ("moe4-lora", "moe4-lora-attn", "mixtral-qlora")
SHORT_LAYERS = 4  # blocks of the moe4 groups
QLORA_GIB = 40.0  # issue 16's memory goal for QLoRA of the whole 8x7B at seq 4096
REFERENCE_TOKENS_PER_S = 2966  # mistral-finetune, Mixtral-8x7B bf16 LoRA, per GPU of 8 x H100 (issue 16)
LORA_RANK, LORA_ALPHA = 16, 32
ATTENTION = ("wq", "wk", "wv", "wo")
EXPERTS = ("w1", "w2", "w3")
HF_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
HF_EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
MAX_QUANT_BYTES_PER_WEIGHT = 1.0  # 4-bit codes + block constants: about 0.52; bf16: 2
PACKAGES = ("torch", "triton", "transformers", "peft", "bitsandbytes")


@dataclass(frozen=True)
class Row:
    """One measurement: which stack, adapting what, how it runs, on how many blocks and tokens."""

    group: str
    stack: str  # "mft" or "hf" (transformers + peft)
    layers: int  # transformer blocks
    seq: int  # tokens in the step (one document)
    experts_lora: bool = True  # LoRA on the experts as well as on attention
    checkpointing: str = "none"  # mft: none | full | selective | auto
    compile: bool = False  # mft: Runtime(compile=True)
    quant: Optional[str] = None  # mft: a tools/bench_common.py SPECS name
    budget_gib: Optional[float] = None  # mft auto's memory budget
    experts: str = "grouped_mm"  # hf: transformers' experts_implementation

    @property
    def name(self) -> str:
        if self.stack == "mft":
            return " ".join(["mft"] + ([self.quant] if self.quant else []) + ["compiled" if self.compile else "eager"])
        return f"tf+peft {self.experts}"

    @property
    def targets_label(self) -> str:
        return "attn+experts" if self.experts_lora else "attn"

    @property
    def checkpointing_label(self) -> str:
        return f"auto ({self.budget_gib:g} GiB)" if self.checkpointing == "auto" else self.checkpointing


def group_rows(group: str, opts) -> list[Row]:
    """The rows of `group`; --seq and --layers replace its token and block counts."""
    seq = opts.seq or 4096
    if group in ("moe4-lora", "moe4-lora-attn"):
        common = dict(group=group, layers=opts.layers or SHORT_LAYERS, seq=seq, experts_lora=group == "moe4-lora")
        return [Row(stack="mft", **common), Row(stack="mft", compile=True, **common),
                Row(stack="hf", experts="grouped_mm", **common), Row(stack="hf", experts="eager", **common)]
    if group == "mixtral-qlora":
        layers = opts.layers or base_args(opts).n_layers
        return [Row(group, "mft", layers, seq, checkpointing="full", compile=True, quant="nf4"),
                Row(group, "mft", layers, seq, checkpointing="auto", compile=True, quant="nf4", budget_gib=QLORA_GIB)]
    raise ValueError(group)


# -- one row, in its own process -------------------------------------------------------------------

def base_args(opts) -> ModelArgs:
    """The preset's shape, its feed-forward a mixture as --moe says (default: the preset's own)."""
    args = preset_args(opts.shape)
    if opts.moe:
        experts, per_token = (int(n) for n in opts.moe.split(","))
        args = replace(args, moe=MoeArgs(experts, per_token))
    return args


def row_args(row: Row, opts) -> ModelArgs:
    return replace(base_args(opts), n_layers=row.layers)


def linear_shapes(args: ModelArgs) -> dict[str, tuple[int, int, int]]:
    """(copies, out, in) of each mft linear kind in one block: the experts are `num_experts` copies."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    experts = args.moe.num_experts if args.moe else 1
    return {"wq": (1, q, args.dim), "wk": (1, kv, args.dim), "wv": (1, kv, args.dim), "wo": (1, args.dim, q),
            "w1": (experts, args.hidden_dim, args.dim), "w2": (experts, args.dim, args.hidden_dim),
            "w3": (experts, args.hidden_dim, args.dim)}


def expected_mft_lora_params(args: ModelArgs, targets: tuple[str, ...]) -> int:
    """LoRA parameters mft must train: r x (in + out) per adapted matrix, one per expert."""
    shapes = linear_shapes(args)
    return args.n_layers * sum(shapes[t][0] * LORA_RANK * (shapes[t][1] + shapes[t][2]) for t in targets)


def expected_peft_lora_params(args: ModelArgs, experts_lora: bool) -> int:
    """LoRA parameters peft must train: r x (in + out) per attention projection; on the experts
    (ParamWrapper) A (r x E, in) and B (out, r x E) of the fused gate_up_proj (out 2 x hidden)
    and of down_proj."""
    attention = expected_mft_lora_params(replace(args, n_layers=1), ATTENTION)
    experts = args.moe.num_experts * LORA_RANK * ((args.dim + 2 * args.hidden_dim) + (args.hidden_dim + args.dim))
    return args.n_layers * (attention + (experts if experts_lora else 0))


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_trainable(model: torch.nn.Module, expected: int, what: str) -> int:
    """The trainable parameter count, which must be `expected` (else the adapters are not all there)."""
    found = trainable_params(model)
    if found != expected:
        raise RuntimeError(f"{what}: {found:,} trainable parameters, expected {expected:,} from the LoRA targets; "
                           "an adapter is missing or shaped otherwise (experts not wrapped?), refusing to time it")
    return found


def check_quantised(model: torch.nn.Module, args: ModelArgs, kinds: tuple[str, ...]) -> None:
    """Each of `kinds` (wq .. w3) holds at most MAX_QUANT_BYTES_PER_WEIGHT bytes per weight over
    all blocks (its base tensors, LoRA factors left out): a kind left in bf16 (2 bytes) fails."""
    from mft.model.names import canonical_name

    pattern = re.compile(r"layers\.\d+\.(?:attention|feed_forward)\.(w[123qkvo])\.(?!lora_[ab]$)")
    stored = dict.fromkeys(kinds, 0)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        match = pattern.match(canonical_name(name))
        if match and match.group(1) in stored:
            stored[match.group(1)] += tensor.numel() * tensor.element_size()
    shapes = linear_shapes(args)
    for kind in kinds:
        copies, out, inp = shapes[kind]
        if stored[kind] == 0:
            raise RuntimeError(f"{kind}: no base tensor found under layers.<i>.attention|feed_forward.{kind}, "
                               "refusing to time a model whose quantised layers cannot be checked")
        per_weight = stored[kind] / (args.n_layers * copies * out * inp)
        if per_weight > MAX_QUANT_BYTES_PER_WEIGHT:
            raise RuntimeError(f"{kind}: {per_weight:.2f} bytes per weight over its base tensors, expected 4-bit "
                               f"storage (at most {MAX_QUANT_BYTES_PER_WEIGHT:g}); not quantised, refusing to time it")


def run_mft(row: Row, args: ModelArgs, opts, device: torch.device) -> dict:
    """mft's LoRA step, built as mft-train builds it, after checking what the build adapted."""
    from mft.build import ModelSpec, Runtime, build_model
    from mft.config import OptimConfig
    from mft.peft import lora
    from mft.train.optim import build_optimizer

    targets = ATTENTION + (EXPERTS if row.experts_lora else ())
    spec = ModelSpec(args, attn_backend="auto", quant=SPECS[row.quant] if row.quant else None,
                     lora=lora.LoRASettings(r=LORA_RANK, alpha=LORA_ALPHA, target_modules=list(targets)))
    what = f"{row.name} ({row.targets_label})"
    # The same conversions on the meta device first: a fallback fails here, before 90 GB are drawn.
    on_meta = build_model(spec, Runtime(device="meta", dtype=torch.bfloat16, train=True))
    check_trainable(on_meta, expected_mft_lora_params(args, targets), what)
    if row.quant:
        check_quantised(on_meta, args, ATTENTION + EXPERTS)
    runtime = Runtime(device=device, dtype=torch.bfloat16, train=True, compile=row.compile,
                      activation_checkpointing=row.checkpointing, memory_budget_gib=row.budget_gib,
                      tokens_per_microbatch=row.seq, loss_chunk_tokens=opts.ce_chunk)
    model = build_model(spec, runtime)
    trainable = check_trainable(model, expected_mft_lora_params(args, targets), what)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-5, weight_decay=0.0))
    tokens = token_batch(row, args.vocab_size).to(device)
    inputs, targets_ids = tokens[:-1], tokens[1:]
    positions = torch.arange(row.seq, device=device)
    cu_seqlens = torch.tensor([0, row.seq], dtype=torch.int32, device=device)

    def step() -> torch.Tensor:
        with lora.lora_step_copies(model):
            loss = model(inputs, positions, cu_seqlens, row.seq, targets=targets_ids, loss_chunk=opts.ce_chunk) / row.seq
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return {**measure(step, opts, device), "trainable": trainable}


def run_hf(row: Row, args: ModelArgs, opts, device: torch.device) -> dict:
    """transformers + peft's LoRA step on MixtralForCausalLM, after checking what peft adapted."""
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralConfig, MixtralForCausalLM

    from mft.checkpoint.hf import args_to_hf_config

    config = MixtralConfig(**{**args_to_hf_config(args, torch.bfloat16), "use_cache": False})
    with torch.device(device):
        model = MixtralForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                experts_implementation=row.experts)
    if model.config._experts_implementation != row.experts:
        raise RuntimeError(f"transformers runs experts_implementation {model.config._experts_implementation!r}, "
                           f"not the requested {row.experts!r}")
    lora_config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(HF_ATTENTION),
                             target_parameters=list(HF_EXPERT_PARAMETERS) if row.experts_lora else None,
                             task_type="CAUSAL_LM")
    model = get_peft_model(model, lora_config)
    trainable = check_trainable(model, expected_peft_lora_params(args, row.experts_lora), f"{row.name} ({row.targets_label})")
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

    return {**measure(step, opts, device), "trainable": trainable}


def run_row(row: Row, opts) -> dict:
    """One row's measurements, tokens/s included."""
    result = (run_mft if row.stack == "mft" else run_hf)(row, row_args(row, opts), opts, torch.device(opts.device))
    return {**result, "tokens_per_s": row.seq / result["step_s"]}


def child_main(row: Row, opts) -> int:
    """Run `row` and print its result as one marked JSON line (errors included)."""
    return print_result(lambda: run_row(row, opts))


# -- the parent: one subprocess per row, the table, the goals --------------------------------------

def child_command(row: Row, opts) -> list[str]:
    """This script, run for `row` alone with the parent's settings."""
    passed = ["--shape", opts.shape, "--steps", str(opts.steps), "--warmup", str(opts.warmup),
              "--device", opts.device, "--ce-chunk", str(opts.ce_chunk)]
    passed += ["--moe", opts.moe] if opts.moe else []
    return [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(asdict(row))] + passed


def run_in_subprocess(row: Row, opts) -> dict:
    """`row`'s result from a fresh process; a crash or a timeout is a failure with its reason."""
    return run_child(child_command(row, opts), opts.timeout, opts.verbose)


def reference(results: list[tuple[Row, dict]], row: Row) -> Optional[float]:
    """tokens/s of the tf+peft grouped_mm row of `row`'s group."""
    for other, result in results:
        if other.group == row.group and other.stack == "hf" and other.experts == "grouped_mm":
            return result.get("tokens_per_s")
    return None


def table(results: list[tuple[Row, dict]], opts, on_gpu: bool) -> list[str]:
    """The markdown table (MFU only on a GPU)."""
    lines = ["| group | row | LoRA on | layers | act. ckpt | seq | tokens/s | peak GiB | vs tf+peft | MFU | "
             "trainable M | loss | note |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row, r in results:
        tps, peak, ref = r.get("tokens_per_s"), r.get("peak_gib"), reference(results, row)
        ratio = tps / ref if tps and ref else None
        mfu = 100 * tps * flops_per_token(row_args(row, opts), row.seq) / (PEAK_TFLOPS * 1e12) if tps and on_gpu else None
        trainable = r["trainable"] / 1e6 if "trainable" in r else None
        if "error" in r:
            note = f"failed: {r['error']}"
        elif row.group == "mixtral-qlora" and tps:
            fits = "" if peak is None else (f"fits {QLORA_GIB:g} GiB; " if peak <= QLORA_GIB else f"over {QLORA_GIB:g} GiB; ")
            note = f"{fits}{tps / REFERENCE_TOKENS_PER_S:.2f}x mistral-finetune's {REFERENCE_TOKENS_PER_S:,}/GPU"
        else:
            note = ""
        lines.append(f"| {row.group} | {row.name} | {row.targets_label} | {row.layers} | {row.checkpointing_label} | "
                     f"{row.seq} | {fmt(tps, ',.0f')} | {fmt(peak, '.2f')} | {fmt(ratio, '.2f')}{'x' if ratio else ''} | "
                     f"{fmt(mfu, '.1f')}{'%' if mfu else ''} | {fmt(trainable, '.1f')} | {fmt(r.get('loss'), '.3f')} | "
                     f"{note} |")
    return lines


def goal_lines(results: list[tuple[Row, dict]]) -> list[str]:
    """Issue 16's QLoRA goal (PASS, FAIL, or n/a when no row has a peak) and the reference, when
    the mixtral-qlora group ran."""
    qlora = [(row, r) for row, r in results if row.group == "mixtral-qlora" and r.get("tokens_per_s")]
    if not any(row.group == "mixtral-qlora" for row, _ in results):
        return []
    peaks = [r["peak_gib"] for _, r in qlora if r["peak_gib"] is not None]
    lines = [f"{verdict(min(peaks) <= QLORA_GIB if peaks else None)} mixtral-qlora nf4: peak <= {QLORA_GIB:g} GiB"
             + (f": {min(peaks):.2f} GiB at best" if peaks else "")]
    fitting = [(row, r) for row, r in qlora if r["peak_gib"] is not None and r["peak_gib"] <= QLORA_GIB]
    best = max(fitting, key=lambda rr: rr[1]["tokens_per_s"], default=None)
    if best:
        row, r = best
        lines.append(f"info mixtral-qlora within {QLORA_GIB:g} GiB: {r['tokens_per_s']:,.0f} tokens/s on one GPU "
                     f"({row.name}, {row.checkpointing_label}) = {r['tokens_per_s'] / REFERENCE_TOKENS_PER_S:.2f}x "
                     f"mistral-finetune's {REFERENCE_TOKENS_PER_S:,} tokens/s per GPU (8 x H100, bf16 LoRA)")
    return lines


def header(opts) -> list[str]:
    """Device, software, commit, the exact command and the method in one paragraph."""
    device = torch.device(opts.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else (
        platform.processor() or platform.machine() or "cpu")
    versions = " | ".join(f"{p} {package_version(p)}" for p in PACKAGES)
    args = base_args(opts)
    moe = f"{args.moe.num_experts} experts, top {args.moe.num_experts_per_tok}" if args.moe else "dense"
    return [f"device: {name} | CUDA {torch.version.cuda} | {versions}",
            f"commit: {commit(opts.commit)}",
            f"command: python {shlex.join(sys.argv)}",
            f"shape {opts.shape} ({moe}), bf16 base, LoRA r={LORA_RANK} alpha={LORA_ALPHA} (attn+experts: mft wq wk wv "
            f"wo w1 w2 w3, peft target_modules q/k/v/o_proj + target_parameters {', '.join(HF_EXPERT_PARAMETERS)}; "
            f"attn: q/k/v/o only), router not adapted, no load-balancing loss, batch 1, AdamW; {opts.warmup} warm-up + "
            f"{opts.steps} timed steps (median), mft CE chunk {opts.ce_chunk}",
            f"MFU = tokens/s x (4 x ACTIVE params (attention + top-k experts + router + head) + 3 x 2 x 2 x mean keys "
            f"per query x n_heads x head_dim x n_layers) / {PEAK_TFLOPS:g} TFLOP/s; mean keys = (seq + 1) / 2 causal; "
            "recompute not counted"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    from mft.config import TrainConfig

    chunk = next(f.default for f in fields(TrainConfig) if f.name == "loss_chunk_tokens")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=preset_names(), default="mixtral-8x7b", help="a conf/model/ preset")
    parser.add_argument("--moe", help="E,K: the shape's feed-forward as E experts, K per token (default: the "
                        "preset's own; a dense preset needs it)")
    parser.add_argument("--layers", type=int, help=f"blocks in every group (default: {SHORT_LAYERS} in the moe4 "
                        "groups, the preset's in mixtral-qlora)")
    parser.add_argument("--groups", default="all", help=f"comma list of {', '.join(GROUPS)}, or all")
    parser.add_argument("--rows", help="comma list of row names to keep (e.g. 'mft compiled,tf+peft grouped_mm')")
    parser.add_argument("--seq", type=int, help="tokens per step (default 4096)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--ce-chunk", type=int, default=chunk, help="mft: tokens per chunk of the head + cross-entropy")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per row's subprocess")
    parser.add_argument("--commit", help="the commit to print (the GPU machine's git metadata may be stale)")
    parser.add_argument("--verbose", action="store_true", help="echo each row's subprocess output")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.steps < 1 or opts.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if opts.moe and not re.fullmatch(r"\d+,\d+", opts.moe):
        parser.error(f"--moe {opts.moe}: expected E,K (e.g. 8,2)")
    if base_args(opts).moe is None:
        parser.error(f"--shape {opts.shape} has no mixture of experts; add --moe E,K")
    return opts


def selected_rows(opts) -> list[Row]:
    """The rows of the chosen groups, filtered by --rows."""
    groups = list(GROUPS) if opts.groups == "all" else [g for g in opts.groups.split(",") if g]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise SystemExit(f"--groups: unknown {', '.join(unknown)}; expected a comma list of {', '.join(GROUPS)}, or all")
    rows = [row for g in groups for row in group_rows(g, opts)]
    if opts.rows:
        wanted = {name.strip() for name in opts.rows.split(",") if name.strip()}
        known = {row.name for g in GROUPS for row in group_rows(g, opts)}
        if wanted - known:
            raise SystemExit(f"--rows: unknown {', '.join(sorted(wanted - known))}; rows are {', '.join(sorted(known))}")
        rows = [row for row in rows if row.name in wanted]
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
        outcome = result.get("error") or f"{result['tokens_per_s']:,.0f} tokens/s"
        print(f"[{i}/{len(rows)}] {row.group} | {row.name} | {row.targets_label} | {row.checkpointing_label}: {outcome}",
              file=sys.stderr, flush=True)
    print("\n".join(header(opts)) + "\n")
    print("\n".join(table(results, opts, torch.device(opts.device).type == "cuda")) + "\n")
    print("\n".join(goal_lines(results)))
    return 1 if any("error" in r for _, r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
