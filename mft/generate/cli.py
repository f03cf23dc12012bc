"""`mft-generate` and `python -m mft.generate`: chat with, prompt or batch-run a model and its adapters.

Thin like mft-train: compose conf/generate.yaml (typed by mft.generate.config; converted once
into the GenerateConfig dataclass), load the model
(mft.generate.load), then one of three modes over mft.generate.decode.Generator. User errors
(MftError) print one paragraph and exit 1. Logs go to stderr, answers to stdout.

`prompt=`, `system=` and `prompt_file=` take free text, which Hydra's override grammar cannot
(an apostrophe, a comma, parentheses or a colon break it): main() takes them out of the command
line before Hydra parses it and sets them on the composed config, verbatim.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

import hydra
from omegaconf import DictConfig

from mft.compose import CONFIG_PATH, to_dataclass
from mft.generate.config import GenerateConfig, Mode, register_generate_configs
from mft.generate.decode import GenerationSettings, Generator
from mft.generate.load import guess_tokenizer, load_model, resolve_source
from mft.generate.sampling import SamplingSettings
from mft.utils.device import resolve_device, resolve_dtype
from mft.utils.errors import MftError

log = logging.getLogger("mft.generate")


# Keys whose value is free text, taken verbatim from the command line instead of through Hydra.
TEXT_KEYS = ("prompt", "prompt_file", "system")


def split_text_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """(the arguments for Hydra, {key: text} of every `key=text` argument for a key in TEXT_KEYS).

    Everything after the first `=` is the value, as the shell passed it; a key given twice keeps
    its last value, as Hydra does.
    """
    rest, texts = [], {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in TEXT_KEYS:
            texts[key] = value
        else:
            rest.append(arg)
    return rest, texts


def check_text(key: str, text: str) -> str:
    """`text` if it can be encoded: bytes that are not UTF-8 reach Python as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MftError(f"{key}=: the text is not valid UTF-8 (character {e.start} is a byte that is not); "
                       "pass UTF-8 text.") from None
    return text


def read_prompt_file(path: str, stdin: TextIO) -> str:
    """The prompt in `path` (`-`: standard input) as UTF-8, less one final line break."""
    try:
        if path == "-":
            text = stdin.buffer.read().decode("utf-8") if hasattr(stdin, "buffer") else stdin.read()
        else:
            text = Path(path).expanduser().read_bytes().decode("utf-8")
    except OSError as e:
        raise MftError(f"prompt_file={path}: cannot read it ({e.strerror or e}).") from None
    except UnicodeDecodeError as e:
        raise MftError(f"prompt_file={path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                       "save it as UTF-8.") from None
    # Editors end a file with a line break; it is not part of the prompt.
    ending = "\r\n" if text.endswith("\r\n") else "\n"
    return check_text("prompt_file", text.removesuffix(ending))


def with_prompt_file(cfg: GenerateConfig, stdin: Optional[TextIO] = None) -> GenerateConfig:
    """`cfg` with `prompt` read from `prompt_file` when that is set."""
    if cfg.prompt_file is None:
        return cfg
    if cfg.prompt is not None:
        raise MftError("give prompt=TEXT or prompt_file=PATH, not both.")
    return dataclasses.replace(cfg, prompt=read_prompt_file(cfg.prompt_file, stdin or sys.stdin))


def pick_mode(cfg: GenerateConfig) -> Mode:
    mode = cfg.mode
    if mode == Mode.auto:
        mode = Mode.prompt if cfg.prompt is not None else Mode.batch if cfg.input is not None else Mode.chat
    if mode == Mode.prompt and cfg.prompt is None:
        raise MftError("mode=prompt needs prompt=\"...\" or prompt_file=PATH (- for standard input).")
    if mode == Mode.batch and cfg.input is None:
        raise MftError("mode=batch needs input=<requests.jsonl>.")
    if mode == Mode.batch and not Path(cfg.input).is_file():
        raise MftError(f"input={cfg.input}: no such file.")
    return mode


def read_tools(path: Optional[str]) -> Optional[list[dict]]:
    if not path:
        return None
    try:
        tools = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MftError(f"tools={path}: could not read a JSON list of tool definitions ({e or type(e).__name__}).") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise MftError(f"tools={path}: expected a JSON list of tool definitions, got {type(tools).__name__}.")
    return tools


class App:
    """The loaded model, tokenizer and decoding settings, shared by the three modes."""

    def __init__(self, cfg: GenerateConfig):
        from mft.data.tokenizer import check_vocab, load_tokenizer
        from mft.generate.chat import ChatFormat

        self.cfg = cfg
        self.tools = read_tools(cfg.tools)  # user input first: fail before the slow loading
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.precision, device)
        source = resolve_source(cfg.base, cfg.run_dir, [(a.path, a.scale) for a in cfg.adapters], cfg.step)
        started = time.perf_counter()
        self.model = load_model(source, device=device, dtype=dtype, merge=cfg.merge_adapters)
        if device.type == "cuda":  # int4 bases: decode on torch's int4 matmul (no-op for other models)
            from mft.generate.int4 import use_int4_kernels

            use_int4_kernels(self.model)
        tokenizer_spec = cfg.tokenizer or guess_tokenizer(source, self.model.args.vocab_size)
        tokenizer = load_tokenizer(tokenizer_spec)
        check_vocab(tokenizer, self.model.args.vocab_size, str(source.base), tokenizer_spec)
        log.info("loaded %s on %s/%s in %.1fs (tokenizer %s)", source.describe(), device, dtype,
                 time.perf_counter() - started, tokenizer_spec)
        self.fmt = ChatFormat(tokenizer)
        self.generator = Generator(self.model, prefill_chunk=cfg.prefill_chunk, compile=cfg.compile)
        self.settings = GenerationSettings(
            max_new_tokens=cfg.max_new_tokens,
            sampling=SamplingSettings(cfg.temperature, cfg.top_p, cfg.top_k),
            stop_token_ids=self.fmt.stop_token_ids,
            stop_strings=list(cfg.stop),
            seed=cfg.seed,
        )

    def messages(self, user: str) -> list[dict]:
        system = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        return system + [{"role": "user", "content": user}]

    def generate_one(self, ids: list[int], streamer=None, reuse_prefix: bool = False):
        return self.generator.generate([ids], self.settings, detokenize=self.fmt.decode, on_token=streamer,
                                       reuse_prefix=reuse_prefix)[0]

    # -- modes --------------------------------------------------------------------------------
    def prompt(self, out: Optional[TextIO] = None) -> None:
        from mft.generate.chat import TextStreamer

        cfg, out = self.cfg, out or sys.stdout  # looked up now: a caller may have replaced sys.stdout
        ids = self.fmt.encode_text(cfg.prompt) if cfg.raw else self.fmt.encode(self.messages(cfg.prompt), self.tools)
        streamer = TextStreamer(self.fmt, out, stop_strings=cfg.stop) if cfg.stream else None
        result = self.generate_one(ids, streamer)
        reply = self.fmt.parse(result.tokens, cfg.stop)
        if streamer is not None:
            streamer.finish()
            if streamer.printed:
                out.write("\n")
        elif reply.content:
            out.write(reply.content + "\n")
        for call in reply.tool_calls:
            out.write(json.dumps({"tool_call": call.to_json()}, ensure_ascii=False) + "\n")
        out.flush()
        log.info("%d prompt tokens, %d generated (%s)", len(ids), len(result.tokens), result.finish_reason)

    def chat(self) -> None:
        from mft.generate.chat import ChatSession, TextStreamer, chat_loop

        cfg = self.cfg
        session = ChatSession(self.fmt, system=cfg.system, tools=self.tools, stop_strings=cfg.stop)

        def generate(ids: list[int]) -> list[int]:
            streamer = TextStreamer(self.fmt, sys.stdout, prefix="assistant> ", stop_strings=cfg.stop) if cfg.stream else None
            # Each turn's prompt repeats the conversation: keep the part the cache already holds.
            tokens = self.generate_one(ids, streamer, reuse_prefix=True).tokens
            if streamer is not None:
                streamer.finish()
                if streamer.printed:
                    print(flush=True)
            return tokens

        print("Chat: type a message; /reset starts over, /exit (or Ctrl-D) quits."
              + (f" Tools: {', '.join(t.get('function', {}).get('name', '?') for t in self.tools)}; "
                 "type each tool call's result when asked." if self.tools else ""), file=sys.stderr)
        chat_loop(session, generate, streaming=cfg.stream)

    def batch(self) -> None:
        from mft.generate.chat import cut_at_stop

        cfg = self.cfg
        requests = self.read_requests(Path(cfg.input))
        out = open(cfg.output, "w") if cfg.output else sys.stdout
        started, generated = time.perf_counter(), 0
        try:
            for first in range(0, len(requests), max(1, cfg.batch_size)):
                group = requests[first:first + max(1, cfg.batch_size)]
                results = self.generator.generate([r["ids"] for r in group], self.settings, detokenize=self.fmt.decode)
                for request, result in zip(group, results):
                    if request["raw"]:
                        record: dict[str, Any] = {"output": cut_at_stop(self.fmt.decode(result.tokens), cfg.stop)}
                    else:
                        reply = self.fmt.parse(result.tokens, cfg.stop)
                        record = {"output": reply.content}
                        if reply.tool_calls:
                            record["tool_calls"] = [c.to_json() for c in reply.tool_calls]
                    record.update(finish_reason=result.finish_reason, prompt_tokens=len(request["ids"]),
                                  completion_tokens=len(result.tokens))
                    head = {"index": request["index"], **({"id": request["id"]} if request["id"] is not None else {})}
                    out.write(json.dumps({**head, **record}, ensure_ascii=False) + "\n")
                    generated += len(result.tokens)
                out.flush()
        finally:
            if out is not sys.stdout:
                out.close()
        elapsed = time.perf_counter() - started
        log.info("%d requests, %d tokens generated in %.1fs (%.1f tokens/s)%s", len(requests), generated, elapsed,
                 generated / max(elapsed, 1e-9), f" -> {cfg.output}" if cfg.output else "")

    def read_requests(self, path: Path) -> list[dict]:
        """Every request encoded up front, so a bad line stops the run before any generation."""
        try:
            raw = path.read_bytes()
            lines = raw.decode("utf-8-sig").split("\n")
        except OSError as e:
            raise MftError(f"input={path}: {e}") from None
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise MftError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as "
                           "UTF-8.") from None
        requests, errors = [], []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                requests.append(self.encode_request(json.loads(line), len(requests)))
            except (MftError, TypeError, ValueError, AttributeError) as e:  # JSONDecodeError is a ValueError
                errors.append(f"{path}:{lineno}: {e}")
            except KeyError as e:
                errors.append(f"{path}:{lineno}: a message lacks the key {e}")
            except RecursionError:
                errors.append(f"{path}:{lineno}: JSON nested too deeply")
        if errors:
            raise MftError("bad requests:\n  " + "\n  ".join(errors[:20])
                           + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""))
        if not requests:
            raise MftError(f"input={path} has no requests.")
        return requests

    def encode_request(self, row: Any, index: int) -> dict:
        if not isinstance(row, dict):
            raise MftError(f"expected a JSON object, got {type(row).__name__}")
        tools = row.get("tools", self.tools)
        raw = "text" in row or (self.cfg.raw and "prompt" in row)
        if "messages" in row:
            ids = self.fmt.encode(row["messages"], tools)
        elif "prompt" in row and not raw:
            ids = self.fmt.encode(self.messages(row["prompt"]), tools)
        elif "prompt" in row or "text" in row:
            text = row.get("text", row.get("prompt"))
            if not isinstance(text, str):
                raise MftError("'text'/'prompt' must be a string")
            ids = self.fmt.encode_text(text)
        else:
            raise MftError("expected a 'prompt', 'messages' or 'text' key")
        return {"ids": ids, "raw": raw, "index": index, "id": row.get("id")}


def run(cfg: GenerateConfig) -> None:
    cfg = with_prompt_file(cfg)
    mode = pick_mode(cfg)
    app = App(cfg)
    getattr(app, mode.value)()


def main() -> None:
    register_generate_configs()
    sys.argv[1:], texts = split_text_overrides(sys.argv[1:])

    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="generate")
    def _run(composed: DictConfig) -> None:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
        try:
            run(dataclasses.replace(to_dataclass(composed),
                                    **{key: check_text(key, text) for key, text in texts.items()}))
        except MftError as e:
            print(f"mft-generate: error: {e}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)

    _run()
