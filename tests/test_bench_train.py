"""tools/bench_train.py runs on CPU (its smoke-test form): every row of the seq4096 group but the
compiled one (inductor's CPU compile alone takes a minute on two cores) gives tokens/s and a loss
in its own subprocess, or says why it was skipped; none fails."""

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from mft.build import Runtime

REPO = Path(__file__).resolve().parent.parent


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The table's cells by row name (second column), the header and rule lines left out."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("group", "---"):
            rows[cells[1]] = cells
    return rows


@pytest.mark.slow
@pytest.mark.skipif("memory_budget_gib" not in {f.name for f in fields(Runtime)},
                    reason="needs Runtime's activation checkpointing policies (issue 14, helper 'ac')")
def test_bench_train_smoke_on_cpu():
    command = [sys.executable, "tools/bench_train.py", "--device", "cpu", "--shape", "tiny", "--seq", "64",
               "--steps", "1", "--warmup", "0", "--layers", "1", "--groups", "seq4096",
               "--rows", "mft eager,tf+peft,tf+peft+liger"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = table_rows(done.stdout)
    assert set(rows) == {"mft eager", "tf+peft", "tf+peft+liger"}, done.stdout
    for name in ("mft eager", "tf+peft"):
        group, _, checkpointing, seq, tokens_per_s, peak, ratio, mfu, loss, note = rows[name]
        assert (group, checkpointing, seq, peak, mfu, note) == ("seq4096", "none", "64", "-", "-", ""), rows[name]
        assert float(tokens_per_s.replace(",", "")) > 0 and 0 < float(loss) < 20, rows[name]
    assert rows["tf+peft"][6] == "1.00x"
    liger_note = rows["tf+peft+liger"][-1]
    assert liger_note in ("skipped: liger-kernel not installed", "skipped: liger-kernel's Triton kernels need a GPU")
    assert "failed" not in done.stdout
    assert "command: python tools/bench_train.py --device cpu" in done.stdout


def test_breakdown_sorts_kernels_by_kind_and_bounds_the_step():
    sys.path.insert(0, str(REPO / "tools"))
    import bench_train

    kinds = {name: bench_train.kernel_kind(name) for name in (
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma",
        "void cudnn::fusion::compute_dot_do_o_specialized<true, 128>", "_swa_fwd_kernel",
        "triton_poi_fused_add_mul_silu_silu_backward_0", "_add_low_rank_kernel", "Memcpy DtoD (Device -> Device)")}
    assert list(kinds.values()) == ["matmul", "attention", "attention", "attention", "other", "other", "other"]
    row = bench_train.Row("seq4096", "mft", seq=4096, compile=True)
    result = {"step_s": 0.25, "kernels_s": {"matmul": 0.17, "attention": 0.035, "other": 0.03}}
    lines = bench_train.breakdown_table([(row, result), (bench_train.Row("seq4096", "hf"), {"step_s": 0.4})])
    assert len(lines) == 3  # header, rule, the one row with a breakdown
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[3:] == ["250.0", "170.0", "35.0", "30.0", "15.0", "19,980"]
    unnamed = {"step_s": 0.1, "kernels_s": {"matmul": 0.0, "attention": 0.0, "other": 0.09}}  # GEMMs it cannot name
    assert bench_train.breakdown_table([(row, unnamed)])[2].rstrip(" |").endswith("| -")


def test_top_kernels_and_the_idle_each_kernel_is_followed_by():
    sys.path.insert(0, str(REPO / "tools"))
    import bench_train

    # (name, start us, end us) over 2 steps, on two streams: "copy" overlaps "gemm" and hides no gap.
    kernels = [("gemm", 0, 100), ("copy", 50, 120), ("norm", 121, 131), ("gemm", 200, 300), ("norm", 304, 314),
               ("gemm", 400, 500)]
    assert bench_train.top_kernels(kernels, steps=2, top=2) == [("gemm", 0.15, 1.5), ("copy", 0.035, 0.5)]
    # 69 us after norm (131 -> 200), 86 after the second norm; 4 us after gemm is under the 5 us floor
    # and copy's end, not gemm's, is where the first norm starts.
    assert bench_train.idle_after(kernels, steps=2, top=3) == [("norm", 0.0775, 1.0)]
    row = bench_train.Row("seq4096", "mft", compile=True)
    lines = bench_train.kernel_lines([(row, {"top": [("gemm", 0.15, 1.5)], "idle_after": [("norm", 0.0775, 1.0)]})])
    assert lines[1].split() == ["0.15", "ms", "x1.5", "gemm"] and lines[3].split() == ["0.08", "idle", "ms", "x1", "norm"]


def test_policies_keep_the_mft_rows_they_name_and_refuse_a_misspelt_one():
    sys.path.insert(0, str(REPO / "tools"))
    import bench_train

    opts = bench_train.parse_args(["--groups", "seq4096-ac", "--rows", "mft compiled,tf+peft", "--policies", "auto"])
    assert [(r.stack, r.checkpointing) for r in bench_train.selected_rows(opts)] == [("mft", "auto"), ("hf", "on")]
    with pytest.raises(SystemExit, match="unknown ful; expected"):
        bench_train.selected_rows(bench_train.parse_args(["--groups", "seq4096-ac", "--policies", "ful"]))
