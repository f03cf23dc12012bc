"""`mft-validate-data`: check data files before training, report statistics, write repaired copies.

    mft-validate-data train.jsonl more.csv --valid valid.jsonl --seq-len 2048
    mft-validate-data +experiment=chat_sft                  # the files of a config, as mft-train composes it
    mft-validate-data data.train_files=[my.jsonl] batch_size=4
    mft-validate-data bad.jsonl --fix                       # writes bad.fixed.jsonl next to it

Lists every bad row as `file:line: reason` (exactly what training would refuse, and every chat
that training would truncate, split or drop for its length), then per file, training and
validation files apart: samples, tokens, supervised tokens, share of each source per epoch,
sequences per epoch after packing, steps and epochs for the configured batch, and an ETA:
6 x the model's parameters x the tokens trained on, at --tflops. Exit status 1 when any row is
bad or a file has no rows, 2 on an error. Arguments with "=" are Hydra overrides of
conf/train.yaml; files given alone are checked for --model (default mistral-7b-v0.3).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mft.config import ModelConfig
from mft.data.config import AlpacaStyle, ControlTokens, DataConfig, DataFormat, TooLong
from mft.data.dataset import PackedDataset, Part, source_specs
from mft.data.encode import encode_sample
from mft.data.packing import (
    DROPPED,
    PACKED,
    SPLIT,
    TRUNCATED,
    UNSUPERVISED,
    plan_packing,
)
from mft.data.readers import decode, iter_records
from mft.data.samples import TOOL_CALL_ID, ChatSample, RowError, parse_row
from mft.data.store import (
    EncodeSettings,
    TokenStore,
    build_store,
    cannot_encode,
    no_rows,
)
from mft.data.tokenizer import Tokenizer, load_tokenizer
from mft.model.args import ModelArgs
from mft.utils.errors import MftError

DEFAULT_SEQ_LEN = 2048  # files checked without a config: a usual 7B fine-tuning length
DEFAULT_MODEL = "mistral-7b-v0.3"  # files checked without a config: the usual model to fine-tune
# Sustained training speed in the ETA's terms (6 x parameters x tokens per second): mft's bf16 LoRA
# of a 7B model measured 7,436 tokens/s on one H100 (docs/benchmarks.md), 6 x 7.1e9 x 7,436 = 317e12.
DEFAULT_TFLOPS = 300.0
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "function": "tool"}


@dataclass
class Settings:
    """What validation needs from a training config."""

    data: DataConfig
    model: ModelConfig  # its shape gives the ETA's FLOPs
    tokenizer: str = "v3"
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float | None = None


@dataclass
class FileReport:
    path: str
    store: TokenStore
    defects: list[tuple[int, str, str]]  # (line, code, message): training's errors, what packing leaves out
                                         # or cuts; line 0: the whole file (no rows)

    @property
    def ok(self) -> bool:
        return not self.defects


# ---------------------------------------------------------------- checking


def check_file(path: str, tokenizer: Tokenizer, settings: EncodeSettings, seq_len: int, too_long: TooLong) -> FileReport:
    store = build_store(path, tokenizer, settings, cache_dir=None, workers=None)
    defects = list(store.errors)
    if problem := no_rows(store):
        defects.append((0, "empty_file", problem))
    defects += packing_defects(store, seq_len, too_long)
    defects.sort(key=lambda d: d[0])
    return FileReport(path, store, defects)


def packing_defects(store: TokenStore, seq_len: int, too_long: TooLong) -> list[tuple[int, str, str]]:
    """The samples training would cut or leave out, from the packer's own plan (file order: what
    becomes of a sample over seq_len does not depend on its neighbours; a chat that fits, split
    to fill a sequence under too_long=split, is not a defect)."""
    plan = plan_packing(store.lengths, store.supervised, store.is_text, seq_len, too_long.value,
                        lambda k: store.doc(k)[1])
    setting = f"data.too_long={too_long.value}"
    verdicts = {
        TRUNCATED: f"training would truncate it to its first {seq_len + 1} tokens ({setting})",
        DROPPED: f"training would drop it ({setting})",
        SPLIT: f"training would split it across sequences ({setting})",
        UNSUPERVISED: f"training would drop it: its first {seq_len + 1} tokens, all that {setting} keeps, "
                      "hold no token to train on (data.too_long=split keeps the rest)",
    }
    defects = []
    for k in np.flatnonzero(plan.fate != PACKED).tolist():
        fate, length, line = int(plan.fate[k]), int(store.lengths[k]), int(store.lines[k])
        if fate == SPLIT and (store.is_text[k] or length - 1 <= seq_len):
            continue  # texts, and with too_long=split chats too, continue into the next sequence to fill it
        if length - 1 <= seq_len:
            defects.append((line, "unsupervised", "sample has no token to train on; training would drop it"))
        else:
            defects.append((line, "too_long", f"sample of {length} tokens is longer than seq_len={seq_len} (+1); "
                                              + verdicts[fate]))
    return defects


def flop_parameters(model: ModelArgs) -> int:
    """Parameters that a token is multiplied by: every linear layer and the output head (the input
    embedding is a lookup); of a mixture of experts, the router and the k experts a token reaches."""
    attention = model.dim * model.head_dim * (2 * model.n_heads + 2 * model.n_kv_heads)
    experts, router = (1, 0) if model.moe is None else (model.moe.num_experts_per_tok, model.dim * model.moe.num_experts)
    feed_forward = experts * 3 * model.dim * model.hidden_dim + router
    return model.n_layers * (attention + feed_forward) + model.dim * model.vocab_size


def _fmt_duration(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    if minutes < 60:
        return f"{minutes} min" if minutes else f"{seconds:.0f} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _print_files(title: str, reports: list[FileReport], out) -> None:
    print(f"{title}:", file=out)
    for r in reports:
        st = r.store
        kinds = Counter(code for _, code, _ in r.defects)
        lengths = st.lengths
        print(f"  {r.path}: {st.meta['rows']} rows, {len(st)} samples, {len(r.defects)} defects"
              + (f" ({', '.join(f'{k} {n}' for k, n in kinds.most_common())})" if kinds else "")
              + f"; {st.num_tokens} tokens, {int(st.supervised.sum())} supervised"
              + (f", longest {int(lengths.max())}, mean {lengths.mean():.0f}" if len(lengths) else ""), file=out)
        if st.meta.get("control_rows"):
            counts = ", ".join(f"{k} x{n}" for k, n in sorted(st.meta["control_counts"].items()))
            print(f"    {st.meta['control_rows']} samples hold literal control strings ({counts}); "
                  f"data.control_tokens={st.meta['settings']['control']}", file=out)


def print_report(reports: list[FileReport], valid: list[FileReport], s: Settings, weights: list[float | None],
                 tflops: float, tokenizer: Tokenizer, out=None) -> None:
    out = out or sys.stdout
    for r in reports + valid:
        for line, _, message in r.defects:
            print(f"{r.path}:{line}: {message}" if line else f"{r.path}: {message}", file=out)
    print(file=out)
    _print_files("training files", reports, out)
    if valid:
        _print_files("validation files", valid, out)
    usable = [r for r in reports if len(r.store)]
    if not usable:
        print("no usable training samples", file=out)
        return
    parts = [Part(r.store, np.arange(len(r.store)), w) for r, w in zip(reports, weights) if len(r.store)]
    ds = PackedDataset(parts, s.data.seq_len, tokenizer.eos_id, s.data.too_long.value, s.data.seed, True, "train")
    print(f"\ntokenizer {tokenizer.version} ({Path(tokenizer.path).name}); {ds.summary()}", file=out)
    if valid_parts := [Part(r.store, np.arange(len(r.store))) for r in valid if len(r.store)]:
        vds = PackedDataset(valid_parts, s.data.seq_len, tokenizer.eos_id, s.data.too_long.value, s.data.seed, False, "valid")
        print(vds.summary(), file=out)
    per_step = s.batch_size * s.grad_accum
    steps_per_epoch = max(1, math.ceil(len(ds) / per_step))
    if s.max_steps:
        steps, epochs = s.max_steps, s.max_steps / steps_per_epoch
    else:
        epochs = s.epochs or 1.0
        steps = max(1, math.ceil(epochs * steps_per_epoch))
    tokens = steps * per_step * s.data.seq_len
    print(f"training: batch_size {s.batch_size} x grad_accum {s.grad_accum} = {per_step} sequences "
          f"({per_step * s.data.seq_len} tokens) per step; {steps_per_epoch} steps per epoch; {steps} steps = "
          f"{epochs:.2f} epochs", file=out)
    params = flop_parameters(s.model)
    flops = 6 * params * tokens
    assumed = (" (the default: mft's measured 7B LoRA speed on one H100; give your device's with --tflops)"
               if tflops == DEFAULT_TFLOPS else " (--tflops)")
    print(f"ETA {_fmt_duration(flops / (tflops * 1e12))}: 6 x {params / 1e9:.3g}B parameters (model {s.model.name}) "
          f"x {tokens:,} tokens = {flops:.2e} FLOPs at {tflops:g} TFLOP/s{assumed}", file=out)


# ---------------------------------------------------------------- fixing


def _new_id(seed: str) -> str:
    digest = hashlib.sha256(seed.encode()).hexdigest()
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    n = int(digest, 16)
    return "".join(alphabet[(n >> (6 * i)) % len(alphabet)] for i in range(9))


def repair_row(row: Any, where: str) -> tuple[Any, list[str]]:
    """The safe repairs: role names, weight types, stray keys, number contents, bad tool call ids,
    trailing messages after the last assistant answer. Returns (row, what changed)."""
    changes: list[str] = []
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        return row, changes
    row = json.loads(json.dumps(row))  # a deep copy
    allowed = {"system": {"role", "content"}, "user": {"role", "content"},
               "assistant": {"role", "content", "tool_calls", "weight"}, "tool": {"role", "content", "tool_call_id", "name"}}
    renamed: dict[str, str] = {}
    for i, m in enumerate(row["messages"]):
        if not isinstance(m, dict):
            continue
        role = m.get("role")
        if isinstance(role, str) and role not in allowed:
            fixed = ROLE_ALIASES.get(role.strip().lower(), role.strip().lower())
            if fixed in allowed:
                m["role"] = fixed
                changes.append(f"message {i}: role {role!r} -> {fixed!r}")
        role = m.get("role")
        if isinstance(role, str) and role in allowed:
            for key in sorted(set(m) - allowed[role]):
                del m[key]
                changes.append(f"message {i}: removed unsupported key {key!r}")
        if isinstance(m.get("content"), (int, float)) and not isinstance(m.get("content"), bool):
            changes.append(f"message {i}: content {m['content']!r} -> string")
            m["content"] = str(m["content"])
        if "weight" in m and m["weight"] not in (0, 1) or isinstance(m.get("weight"), bool):
            w = m["weight"]
            if str(w).strip().lower() in ("0", "0.0", "false"):
                m["weight"] = 0
            elif str(w).strip().lower() in ("1", "1.0", "true"):
                m["weight"] = 1
            else:
                del m["weight"]
            changes.append(f"message {i}: weight {w!r} -> {m.get('weight', 'removed (trained on)')}")
        calls = m.get("tool_calls")
        for j, call in enumerate(calls if isinstance(calls, list) else []):
            if isinstance(call, dict) and isinstance(call.get("id"), str) and call["id"] != "null" \
                    and not TOOL_CALL_ID.match(call["id"]):
                new = _new_id(f"{where}:{i}:{j}:{call['id']}")
                renamed[call["id"]] = new
                changes.append(f"message {i}: tool call id {call['id']!r} -> {new!r}")
                call["id"] = new
        if role == "tool" and isinstance(m.get("tool_call_id"), str) and m["tool_call_id"] in renamed:
            m["tool_call_id"] = renamed[m["tool_call_id"]]
    roles = [m.get("role") if isinstance(m, dict) else None for m in row["messages"]]
    if roles and roles[-1] != "assistant" and "assistant" in roles:
        last = len(roles) - 1 - roles[::-1].index("assistant")
        if not (isinstance(row["messages"][last], dict) and row["messages"][last].get("tool_calls")):
            dropped = len(roles) - last - 1
            row["messages"] = row["messages"][: last + 1]
            changes.append(f"removed {dropped} message(s) after the last assistant message")
    return row, changes


def _check_row(row: Any, source: str, tokenizer: Tokenizer, settings: EncodeSettings, seq_len: int) -> str | None:
    try:
        sample = parse_row(row, source, settings.row)
        enc = encode_sample(sample, tokenizer, settings.control)
    except RowError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001
        return cannot_encode(e)
    if isinstance(sample, ChatSample) and len(enc.ids) - 1 > seq_len:
        return f"sample of {len(enc.ids)} tokens is longer than seq_len={seq_len} (+1)"
    return None


def _kept_line(rec) -> str:
    """A good row as one JSONL line: its own text when it is one line, else re-encoded."""
    text = rec.raw.strip() if rec.is_raw else None
    if text is None or "\n" in text:
        text = json.dumps(decode(rec), ensure_ascii=False, default=str)
    return text + "\n"


def fix_file(report: FileReport, tokenizer: Tokenizer, settings: EncodeSettings, seq_len: int, out=None) -> Path:
    """Write <stem>.fixed.jsonl beside the input: good rows as they were, repairable rows repaired,
    the rest removed; print each change."""
    out = out or sys.stdout
    src = Path(report.path)
    target = src.with_name(f"{src.stem}.fixed.jsonl")
    if target.resolve() == src.resolve():
        raise MftError(f"{src}: refusing to write the repaired copy over the input")
    bad = {line for line, _, _ in report.defects}
    kept = removed = repaired = 0
    with open(target, "w", encoding="utf-8") as f:
        for rec in iter_records(src):
            where = f"{src}:{rec.line}"
            if rec.line not in bad:
                f.write(_kept_line(rec))
                kept += 1
                continue
            try:
                row = decode(rec)
            except RowError as e:
                print(f"{where}: removed ({e})", file=out)
                removed += 1
                continue
            row, changes = repair_row(row, where)
            problem = _check_row(row, where, tokenizer, settings, seq_len)
            if problem is None and changes:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                print(f"{where}: repaired: {'; '.join(changes)}", file=out)
                repaired += 1
            else:
                print(f"{where}: removed ({problem or 'no repair'})", file=out)
                removed += 1
    print(f"wrote {target}: {kept} rows kept, {repaired} repaired, {removed} removed", file=out)
    return target


# ---------------------------------------------------------------- entry point


def _compose(overrides: list[str]):
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mft.compose import compose, to_dataclass
    from mft.config import register_configs

    register_configs()
    try:
        return to_dataclass(compose("train", overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise MftError(str(e)) from None


def settings_from(args: argparse.Namespace) -> Settings:
    model = [f"model={args.model}"] if args.model else []
    if args.overrides or not args.files:
        cfg = _compose(args.overrides + model)
        s = Settings(data=cfg.data, model=cfg.model, tokenizer=cfg.model.tokenizer, batch_size=cfg.batch_size,
                     grad_accum=cfg.grad_accum, max_steps=cfg.max_steps, epochs=cfg.epochs)
    else:
        preset = _compose(model or [f"model={DEFAULT_MODEL}"]).model
        s = Settings(data=DataConfig(train_files=[], seq_len=DEFAULT_SEQ_LEN), model=preset, tokenizer=preset.tokenizer)
    if args.files:
        s.data.train_files, s.data.valid_files = list(args.files), []
    if args.valid:
        s.data.valid_files = list(args.valid)
    for key, choice in (("format", DataFormat), ("alpaca", AlpacaStyle), ("control_tokens", ControlTokens),
                        ("too_long", TooLong)):
        if getattr(args, key) is not None:
            setattr(s.data, key, choice(getattr(args, key)))
    for key in ("text_column", "seq_len"):
        if getattr(args, key) is not None:
            setattr(s.data, key, getattr(args, key))
    for key in ("tokenizer", "batch_size", "grad_accum", "max_steps", "epochs"):
        if getattr(args, key) is not None:
            setattr(s, key, getattr(args, key))
    if args.max_steps is not None:
        s.epochs = None
    elif args.epochs is not None:
        s.max_steps = None
    return s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mft-validate-data", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("inputs", nargs="*", help="training data files, and/or Hydra overrides key=value")
    parser.add_argument("--valid", nargs="+", default=[], metavar="FILE",
                        help="validation data files (after the training files; default: the config's data.valid_files)")
    parser.add_argument("--model", help=f"a conf/model preset: its shape gives the ETA, its tokenizer is the default "
                                        f"(default: the config's; files alone: {DEFAULT_MODEL})")
    parser.add_argument("--tokenizer", help="v1 | v2 | v3 | v7 | v3-tekken | a tokenizer file (tekken.json of any version, "
                                            "tokenizer.model.vN) or model folder (default: the model's)")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--too-long", choices=[c.value for c in TooLong])
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--grad-accum", type=int)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--format", choices=[c.value for c in DataFormat])
    parser.add_argument("--text-column")
    parser.add_argument("--alpaca", choices=[c.value for c in AlpacaStyle])
    parser.add_argument("--control-tokens", choices=[c.value for c in ControlTokens])
    parser.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS,
                        help="sustained training speed of all devices together, in TFLOP/s of 6 x parameters x "
                             f"tokens, for the ETA (default {DEFAULT_TFLOPS:g}: mft's bf16 LoRA of a 7B model on one "
                             "H100, measured; LoRA skips most weight gradients, so this is below the device's peak)")
    parser.add_argument("--fix", action="store_true", help="write <name>.fixed.jsonl beside each file with defects")
    args = parser.parse_args(argv)
    if args.tflops <= 0:
        parser.error(f"--tflops {args.tflops:g}: expected a positive speed")
    args.overrides = [a for a in args.inputs if "=" in a and not Path(a).exists()]
    args.files = [a for a in args.inputs if a not in args.overrides]
    try:
        s = settings_from(args)
        tokenizer = load_tokenizer(s.tokenizer)
        train_specs = source_specs(s.data.train_files, "train_files", s.data, tokenizer.version)
        valid_specs = source_specs(s.data.valid_files, "valid_files", s.data, tokenizer.version)
        if not train_specs:
            raise MftError("no data files: give files or a config whose data.train_files is set")
        check = lambda spec: check_file(spec.file, tokenizer, spec.settings, s.data.seq_len, s.data.too_long)  # noqa: E731
        reports, valid = [check(spec) for spec in train_specs], [check(spec) for spec in valid_specs]
        weights = [spec.weight for spec in train_specs]
        if any(w is not None for w in weights) and any(w is None for w in weights):
            raise MftError(f"give every training file a weight or none (got {weights})")
        print_report(reports, valid, s, weights, args.tflops, tokenizer)
        bad = [(r, spec) for r, spec in zip(reports + valid, train_specs + valid_specs) if not r.ok]
        if args.fix:
            print()
            for r, spec in bad:
                fix_file(r, tokenizer, spec.settings, s.data.seq_len)
    except MftError as e:
        print(f"mft-validate-data: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the report piped into `head`: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    n = sum(len(r.defects) for r, _ in bad)
    print(f"\n{n} defect(s) in {len(bad)} file(s)" if n else "\nall rows valid")
    return 1 if n else 0


if __name__ == "__main__":
    sys.exit(main())
