"""Sliding-window attention, fwd+bwd, every available backend side by side, in one run.

    python tools/bench_attention.py            # the table (markdown) for docs/benchmarks.md
    python tools/bench_attention.py --tune     # first time each Triton kernel's candidate launch
                                               # configurations, then the table with the best

Shapes are issue 4's: bf16, 32 query heads, 8 KV heads, head dim 128, window W = 4096 keys; plus
plain causal attention over 8192 tokens, where torch SDPA's fused kernel is the ceiling. Times are
medians of triton.testing.do_bench (CUDA events, L2 flushed between runs); TFLOP/s count only
in-window work (4 * head_dim * heads * allowed (query, key) pairs forward, backward 2.5x that).
Per-forward precomputation (flex's block mask, the Triton tile tables) is built once per
PackedDocs, as in the model, where 32 layers share it, and stays out of the timed region.
Errors: ||out - ref|| / ||ref|| (worst of out, dq, dk, dv) against fp32 SDPA with an explicit mask.
Needs only torch and triton (runs where hydra and mistral-common are not installed).
"""

import argparse
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mft.model.attention import PackedDocs, get_attention_backend  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, WINDOW = 32, 8, 128, 4096
SHAPES = [  # (label, document lengths, window)
    ("8192 = 1 x 8192", [8192], WINDOW),
    ("32768 = 1 x 32768", [32768], WINDOW),
    ("32768 = 8 x 4096", [4096] * 8, WINDOW),
    ("16384 = 8 x 2048", [2048] * 8, WINDOW),
    ("8192 = 1 x 8192, causal, no window", [8192], None),
]


def window_pairs(lengths, window):
    """Allowed (query, key) pairs: query i of a document sees min(i + 1, W) keys."""
    total = 0
    for n in lengths:
        w = n if window is None else min(window, n)
        total += w * (w + 1) // 2 + (n - w) * w
    return total


def make_inputs(lengths, seed=0, device="cuda", dtype=torch.bfloat16):
    T = sum(lengths)
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(T, HEADS, HEAD_DIM, device=device, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(T, KV_HEADS, HEAD_DIM, device=device, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(T, KV_HEADS, HEAD_DIM, device=device, generator=g, dtype=dtype).requires_grad_()
    dout = torch.randn(T, HEADS, HEAD_DIM, device=device, generator=g, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, dout, cu


def reference(q, k, v, lengths, window):
    """fp32 SDPA per document, explicit mask, K/V repeated per group (the memory-efficient kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    outs = []
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        for qd, kd, vd in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
            n = qd.shape[0]
            lag = torch.arange(n, device=q.device)[:, None] - torch.arange(n, device=q.device)[None, :]
            mask = (lag >= 0) & (lag < (window or n + 1))
            qd, kd, vd = (x.float().transpose(0, 1)[None] for x in (qd, kd.repeat_interleave(group, 1),
                                                                      vd.repeat_interleave(group, 1)))
            outs.append(F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)[0].transpose(0, 1))
    return torch.cat(outs)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench(fn, rep=300):
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=rep, return_mode="median")


def available_backends():
    names = ["triton", "flex", "sdpa"]
    try:
        from mft.model.attention import _xformers_works

        if _xformers_works(torch.device("cuda")):
            names.append("xformers")
    except Exception:
        pass
    return names


# ---- tuning: each kernel alone over the four windowed shapes ------------------------------------

def candidates():
    from mft.kernels.swa_attention import TileConfig as C

    fwd = [C(128, 64, 8, 3), C(128, 64, 8, 4), C(128, 128, 8, 3), C(128, 128, 8, 2), C(128, 32, 8, 3),
           C(64, 64, 4, 4), C(64, 128, 4, 3), C(64, 64, 4, 3)]
    dq = [C(128, 64, 8, 3), C(128, 64, 8, 4), C(128, 128, 8, 2), C(128, 128, 8, 3), C(64, 64, 4, 4),
          C(64, 128, 4, 2), C(128, 32, 8, 3)]
    dkdv = [C(64, 32, 4, 3), C(64, 32, 4, 4), C(64, 16, 4, 3), C(64, 64, 4, 2), C(64, 64, 4, 3),
            C(128, 32, 8, 3), C(128, 64, 8, 2), C(128, 64, 8, 3), C(128, 32, 8, 2)]
    return {"fwd": fwd, "dq": dq, "dkdv": dkdv}


def tune(shapes):
    import mft.kernels.swa_attention as swa

    base = swa.config_for(HEAD_DIM, True)
    inputs = []
    for _, lengths, window in shapes:
        q, k, v, dout, cu = make_inputs(lengths)
        bounds = tuple(int(b) for b in cu.tolist())
        out, lse = swa._forward(q.detach(), k.detach(), v.detach(), swa.make_plan(bounds, window, q.shape[0], HEAD_DIM, q.device))
        inputs.append((q.detach(), k.detach(), v.detach(), dout, out, lse, bounds, window))
    best = {}
    for kind, cfgs in candidates().items():
        rows = []
        for cfg in cfgs:
            config = swa.SwaConfig(**{**base.__dict__, kind: cfg})
            try:
                total, per_shape = 0.0, []
                for q, k, v, dout, out, lse, bounds, window in inputs:
                    plan = swa.make_plan(bounds, window, q.shape[0], HEAD_DIM, q.device, {}, config)
                    if kind == "fwd":
                        fn = lambda: swa._forward(q, k, v, plan)  # noqa: E731
                    elif kind == "dq":
                        fn = lambda: swa._backward_dq(q, k, v, out, lse, dout, plan)  # noqa: E731
                    else:
                        delta = swa._backward_dq(q, k, v, out, lse, dout, plan)[1]
                        fn = lambda: swa._backward_dkdv(q, k, v, dout, lse, delta, plan)  # noqa: E731
                    ms = bench(fn, rep=100)
                    per_shape.append(ms)
                    total += ms
            except Exception as e:  # too much shared memory, say
                print(f"  {kind} {cfg}: failed ({str(e).splitlines()[0][:80]})", flush=True)
                continue
            rows.append((total, cfg))
            print(f"  {kind} {cfg}: " + " ".join(f"{ms:.3f}" for ms in per_shape) + f"  sum {total:.3f} ms", flush=True)
        rows.sort(key=lambda r: r[0])
        best[kind] = rows[0][1]
        print(f"best {kind}: {rows[0][1]}", flush=True)
    config = swa.SwaConfig(**best)
    swa.set_config(HEAD_DIM, config)
    print(f"tuned config for head dim {HEAD_DIM}: {config}", flush=True)
    return config


# ---- the table ----------------------------------------------------------------------------------

def run_shape(label, lengths, window, backends, check):
    q, k, v, dout, cu = make_inputs(lengths)
    T = q.shape[0]
    fwd_flops = 4 * HEAD_DIM * HEADS * window_pairs(lengths, window)
    ref = ref_grads = None
    if check:
        qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
        ref = reference(qr, kr, vr, lengths, window)
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout.float())
        del qr, kr, vr
    rows = []
    for name in backends:
        attn = get_attention_backend(name)
        docs = PackedDocs.from_cu_seqlens(cu, max(lengths), num_tokens=T)  # one per forward in the model
        try:
            err = float("nan")
            if check:
                out = attn(q, k, v, docs, window)
                grads = torch.autograd.grad(out, (q, k, v), dout)
                err = max(rel_err(a, b) for a, b in zip((out, *grads), (ref, *ref_grads)))
                del out, grads
            with torch.no_grad():
                fwd_ms = bench(lambda: attn(q, k, v, docs, window))
            total_ms = bench(lambda: torch.autograd.grad(attn(q, k, v, docs, window), (q, k, v), dout))
        except Exception as e:
            print(f"  {label} {name}: failed ({str(e).splitlines()[0][:120]})", flush=True)
            continue
        tflops = 3.5 * fwd_flops / total_ms * 1e-9
        rows.append(dict(shape=label, backend=name, fwd_ms=fwd_ms, total_ms=total_ms, tflops=tflops, err=err))
        print(f"  {label:38s} {name:8s} fwd {fwd_ms:7.3f} ms  fwd+bwd {total_ms:7.3f} ms  {tflops:6.1f} TFLOP/s"
              f"  err {err:.1e}", flush=True)
    del q, k, v, dout, ref, ref_grads
    torch.cuda.empty_cache()
    return rows


def commit():
    if os.environ.get("MFT_COMMIT"):
        return os.environ["MFT_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain"], cwd=here, text=True).strip()
        return sha + ("+uncommitted" if dirty else "")
    except Exception:
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tune", action="store_true", help="time candidate launch configs first, use the best")
    parser.add_argument("--no-check", action="store_true", help="skip the errors against the fp32 reference")
    parser.add_argument("--backends", default=None, help="comma-separated subset (default: all available)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA device")
    import triton

    for knob in ("recompile_limit", "cache_size_limit"):  # flex compiles once per shape
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    started = time.time()
    backends = args.backends.split(",") if args.backends else available_backends()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"python {platform.python_version()}, commit {commit()}", flush=True)
    print("command: python tools/bench_attention.py " + " ".join(argv if argv is not None else sys.argv[1:]), flush=True)
    if args.tune:
        tune([s for s in SHAPES if s[2] is not None])
    import mft.kernels.swa_attention as swa

    print(f"triton config (head dim {HEAD_DIM}): {swa.config_for(HEAD_DIM, True)}", flush=True)
    rows = []
    for label, lengths, window in SHAPES:
        rows += run_shape(label, lengths, window, backends, check=not args.no_check)

    print("\n| tokens = docs x length | backend | fwd ms | fwd+bwd ms | TFLOP/s | vs flex | err vs fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        flex = next((r for r in rows if r["shape"] == row["shape"] and r["backend"] == "flex"), None)
        speedup = f"{flex['total_ms'] / row['total_ms']:.2f}x" if flex else "-"
        print(f"| {row['shape']} | {row['backend']} | {row['fwd_ms']:.2f} | {row['total_ms']:.2f} | "
              f"{row['tflops']:.0f} | {speedup} | {row['err']:.1e} |")
    print(f"\n(wall time {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
