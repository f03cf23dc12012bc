"""Generation: greedy equals transformers' generate, the rolling buffer equals a full cache,
batched rows equal single rows, sampling, stops, adapters with scales, run-dir resolution, and
Mistral chat with tool calls (the anagram example, with a scripted model)."""

import json
from dataclasses import asdict

import pytest
import torch
from conftest import build, tiny_args

from mft.checkpoint.adapter import load_adapter, save_adapter
from mft.checkpoint.consolidated import save_consolidated
from mft.generate.decode import GenerationSettings, Generator
from mft.generate.load import load_model, resolve_source
from mft.generate.sampling import SamplingSettings, filter_logits, sample
from mft.model.args import ModelArgs, QueryScalingArgs, YarnArgs
from mft.model.kv_cache import KVCache
from mft.peft.lora import LoRASettings, apply_lora, lora_modules, merge_and_unload
from mft.utils.errors import MftError

transformers = pytest.importorskip("transformers")

VOCAB, WINDOW = 160, 16
ARGS = tiny_args(vocab_size=VOCAB, rope_theta=5000.0, sliding_window=WINDOW)
# Ministral's interleaved full / windowed layers with Ministral 3's YaRN, query scale and tied head.
FAMILY_ARGS = tiny_args(vocab_size=VOCAB, rope_theta=5000.0, sliding_window=[None, WINDOW], yarn=YarnArgs(4.0, 16),
                        query_scaling=QueryScalingArgs(0.5, 16), tied_embeddings=True)


def hf_model(folder, window):
    """A tiny GQA Mistral from transformers, saved to `folder`; large init so logits are O(1..10)."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=5000.0, sliding_window=window,
        tie_word_embeddings=False, initializer_range=0.2, attn_implementation="eager",
    )
    model = transformers.MistralForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early, on either side
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    return model


def mft_model(folder):
    from mft.generate.load import ModelSource

    return load_model(ModelSource(folder), device="cpu", dtype=torch.float32)


def prompt(n, seed=1):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(model, ids, n):
    ids_t = torch.tensor([ids])  # an explicit mask: without one, transformers takes pad id 0 for padding
    with torch.no_grad():
        out = model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def gen_hf_pair(tmp_path_factory):
    """(transformers model, mft model) with the same weights and a window of 16."""
    folder = tmp_path_factory.mktemp("hf_window")
    hf = hf_model(folder, WINDOW)
    return hf, mft_model(folder)


@pytest.fixture(scope="module")
def gen_random_model():
    torch.manual_seed(0)
    model = build(ARGS, device="cpu", dtype=torch.float32)
    with torch.no_grad():  # O(1) logits, as in the transformers fixture
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.2)
    return model.eval()


# -- decoding against transformers ----------------------------------------------------------------
@pytest.mark.parametrize("chunk", [512, 7, 24])
def test_greedy_equals_transformers_past_the_window(gen_hf_pair, chunk):
    hf, model = gen_hf_pair
    ids = prompt(40)  # longer than the window; chunks shorter and longer than it
    expected = hf_greedy(hf, ids, 30)
    generator = Generator(model, prefill_chunk=chunk)
    out = generator.generate([ids], GenerationSettings(max_new_tokens=30))[0]
    assert out.tokens == expected and out.finish_reason == "length"
    assert generator.cache.groups[0].size == WINDOW  # the rolling buffer: W slots for 70 tokens


def test_greedy_equals_transformers_full_attention(tmp_path):
    hf = hf_model(tmp_path, None)
    model = mft_model(tmp_path)
    ids = prompt(25, seed=3)
    out = Generator(model, prefill_chunk=8).generate([ids], GenerationSettings(max_new_tokens=20))[0]
    assert out.tokens == hf_greedy(hf, ids, 20)


def test_batched_prompts_of_different_lengths(gen_hf_pair):
    hf, model = gen_hf_pair
    prompts = [prompt(40), prompt(3, seed=2), prompt(17, seed=3), prompt(1, seed=4), prompt(29, seed=5)]
    outs = Generator(model, prefill_chunk=6).generate(prompts, GenerationSettings(max_new_tokens=20))
    for ids, out in zip(prompts, outs):
        assert out.tokens == hf_greedy(hf, ids, 20)
        assert out.prompt_tokens == len(ids)


# -- the rolling buffer ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", [False, True], ids=["windowed", "interleaved-yarn-tied"])
def test_rolling_buffer_equals_full_cache_past_the_window(gen_random_model, family):
    """Step by step, W slots give the logits of a cache that keeps every position, and of the
    training forward over the whole sequence (the independent reference). Interleaved layers:
    the windowed ones roll over W slots while the full ones keep every position."""
    model, steps = gen_random_model, 3 * WINDOW
    if family:
        model = build(FAMILY_ARGS, device="cpu", dtype=torch.float32, std=0.2).eval()
    ids = prompt(21)
    rolling, full = Generator(model, prefill_chunk=5), Generator(model, prefill_chunk=5, rolling=False)
    caches = [g.cache_for(1, len(ids) + steps) for g in (rolling, full)]
    sizes = [[c.keys[layer].shape[2] for layer in range(model.args.n_layers)] for c in caches]
    assert sizes[0][-1] == WINDOW and min(sizes[1]) >= len(ids) + steps
    assert sizes[0][0] == (sizes[1][0] if family else WINDOW)  # a full layer keeps every position
    logits = [g.prefill([ids], c) for g, c in zip((rolling, full), caches)]
    sequence = list(ids)
    with torch.no_grad():
        for i in range(steps):
            torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
            n = len(sequence)
            reference = model(torch.tensor(sequence), torch.arange(n), torch.tensor([0, n], dtype=torch.int32), n)
            torch.testing.assert_close(logits[0][0], reference[-1], atol=1e-4, rtol=1e-4)
            token = logits[0].argmax(-1)
            sequence.append(int(token))
            logits = [g.decode_step(c, token, torch.tensor([n])) for g, c in zip((rolling, full), caches)]


def test_cache_memory_grows_with_the_window_not_the_length():
    sizes = {n: KVCache.allocate(ARGS, 1, n, device="cpu", dtype=torch.float32).nbytes for n in (10, 100, 10_000)}
    assert sizes[100] == sizes[10_000] > sizes[10]
    full = KVCache.allocate(ARGS, 1, 10_000, device="cpu", dtype=torch.float32, rolling=False)
    assert full.groups[0].size == 10_000


def test_generator_reuses_its_cache_across_calls(gen_random_model):
    generator = Generator(gen_random_model)
    settings = GenerationSettings(max_new_tokens=5)
    first = generator.generate([prompt(30)], settings)
    cache = generator.cache
    again = generator.generate([prompt(30)], settings)
    assert generator.cache is cache and again[0].tokens == first[0].tokens


# -- sampling and stopping ------------------------------------------------------------------------
def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # The nucleus is the smallest set reaching top_p: 0.5 alone for 0.5, 0.5 + 0.25 for 0.6.
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.6)).tolist() == [[False, False, True, True]]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()


def test_sampling_is_seeded_and_degenerate_filters_are_greedy(gen_random_model):
    generator = Generator(gen_random_model)
    ids = [prompt(12), prompt(5, seed=9)]
    greedy = generator.generate(ids, GenerationSettings(max_new_tokens=12))
    hot = SamplingSettings(temperature=1.5)
    runs = [generator.generate(ids, GenerationSettings(max_new_tokens=12, sampling=hot, seed=s)) for s in (1, 1, 2)]
    assert [r.tokens for r in runs[0]] == [r.tokens for r in runs[1]] != [r.tokens for r in runs[2]]
    for narrow in (SamplingSettings(temperature=1.0, top_k=1), SamplingSettings(temperature=1.0, top_p=1e-6)):
        out = generator.generate(ids, GenerationSettings(max_new_tokens=12, sampling=narrow, seed=3))
        assert [r.tokens for r in out] == [r.tokens for r in greedy]
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1])).expand(30000, 3)  # top-2 renormalised: 2/3, 1/3, 0
    counts = torch.bincount(sample(logits, SamplingSettings(temperature=1.0, top_k=2), torch.Generator().manual_seed(0)),
                            minlength=3)
    assert counts[2] == 0 and abs(counts[0].item() - 20000) < 500
    with pytest.raises(MftError, match="top_p"):
        SamplingSettings(top_p=0.0)


def test_stop_tokens_and_stop_strings(gen_random_model):
    generator = Generator(gen_random_model)
    ids = prompt(9)
    free = generator.generate([ids], GenerationSettings(max_new_tokens=10))[0].tokens
    stopped = generator.generate([ids], GenerationSettings(max_new_tokens=10, stop_token_ids=[free[4]]))[0]
    assert stopped.tokens == free[: free.index(free[4])] and stopped.finish_reason == "stop_token"

    def detokenize(tokens):
        return " ".join(str(t) for t in tokens)

    at_string = generator.generate([ids], GenerationSettings(max_new_tokens=10, stop_strings=[f"{free[2]} {free[3]}"]),
                                   detokenize=detokenize)[0]
    assert at_string.tokens == free[:4] and at_string.finish_reason == "stop_string"


def test_streaming_callback_sees_every_token_in_order(gen_random_model):
    seen = []
    outs = Generator(gen_random_model).generate([prompt(7), prompt(3, seed=5)], GenerationSettings(max_new_tokens=6),
                                                on_token=lambda row, token: seen.append((row, token)))
    for row, out in enumerate(outs):
        assert [t for r, t in seen if r == row] == out.tokens


# -- adapters -------------------------------------------------------------------------------------
def _adapter(model, folder, seed, targets=("wq", "wv", "w2")):
    torch.manual_seed(seed)
    settings = LoRASettings(r=4, alpha=8, target_modules=list(targets))
    apply_lora(model, settings)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.normal_(std=0.05)
    save_adapter(model, folder, settings, {"name": "t", "checkpoint": None, "tokenizer": "v3", "args": asdict(ARGS)})
    return settings


def _logits(model, ids):
    n = len(ids)
    with torch.no_grad():
        return model(torch.tensor(ids), torch.arange(n), torch.tensor([0, n], dtype=torch.int32), n)


def test_adapter_scales_and_stacking(tmp_path, gen_random_model):
    base = save_consolidated(gen_random_model, tmp_path / "base")
    ids = prompt(20)
    expected = _logits(gen_random_model, ids)
    deltas = []
    for i in range(2):
        model = build(ARGS, device="cpu", dtype=torch.float32)
        model.load_state_dict(gen_random_model.state_dict())
        _adapter(model, tmp_path / f"a{i}", seed=10 + i)
        deltas.append({n: m.delta_weight() for n, m in lora_modules(model).items()})

    from mft.generate.load import AdapterRef, ModelSource

    def run(adapters, merge=True):
        return _logits(load_model(ModelSource(base, adapters), device="cpu", dtype=torch.float32, merge=merge), ids)

    torch.testing.assert_close(run([AdapterRef(tmp_path / "a0", 0.0)], merge=False), expected)
    unmerged = run([AdapterRef(tmp_path / "a0", 0.5)], merge=False)
    torch.testing.assert_close(run([AdapterRef(tmp_path / "a0", 0.5)]), unmerged, atol=1e-5, rtol=1e-5)
    # Two adapters: the base plus 0.5 * the first update plus 2 * the second.
    stacked = run([AdapterRef(tmp_path / "a0", 0.5), AdapterRef(tmp_path / "a1", 2.0)])
    reference = build(ARGS, device="cpu", dtype=torch.float32)
    reference.load_state_dict(gen_random_model.state_dict())
    with torch.no_grad():
        for name in deltas[0]:
            reference.get_parameter(f"{name}.weight").add_(0.5 * deltas[0][name] + 2.0 * deltas[1][name])
    torch.testing.assert_close(stacked, _logits(reference, ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(MftError, match="merged"):
        run([AdapterRef(tmp_path / "a0"), AdapterRef(tmp_path / "a1")], merge=False)


def test_merge_and_unload_leaves_plain_linears(gen_random_model):
    model = build(ARGS, device="cpu", dtype=torch.float32)
    model.load_state_dict(gen_random_model.state_dict())
    apply_lora(model, LoRASettings(r=2, alpha=4))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.normal_(std=0.05)
    ids = prompt(10)
    adapted = _logits(model, ids)
    names = merge_and_unload(model)
    assert len(names) == 7 * ARGS.n_layers and not lora_modules(model)
    assert set(model.state_dict()) == set(gen_random_model.state_dict())
    torch.testing.assert_close(_logits(model, ids), adapted, atol=1e-5, rtol=1e-5)


def test_adapter_scale_keeps_the_file_format(tmp_path, gen_random_model):
    model = build(ARGS, device="cpu", dtype=torch.float32)
    model.load_state_dict(gen_random_model.state_dict())
    _adapter(model, tmp_path / "a", seed=1)
    fresh = build(ARGS, device="cpu", dtype=torch.float32)
    fresh.load_state_dict(gen_random_model.state_dict())
    settings = load_adapter(fresh, tmp_path / "a", ARGS, scale=0.25)
    assert all(m.scale == settings.scale * 0.25 for m in lora_modules(fresh).values())
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["alpha"] == 8


# -- run dirs -------------------------------------------------------------------------------------
def _run_dir(tmp_path, model, steps=(2, 10)):
    run = tmp_path / "run"
    base = save_consolidated(model, run / "base_model")
    copy = build(ARGS, device="cpu", dtype=torch.float32)
    copy.load_state_dict(model.state_dict())
    settings = _adapter(copy, tmp_path / "unused", seed=0)
    for step in steps:
        save_adapter(copy, run / "checkpoints" / f"step_{step:06d}", settings,
                     {"name": "t", "checkpoint": str(base), "tokenizer": "v7", "args": asdict(ARGS)}, step=step)
    (run / "resolved_config.yaml").write_text("model:\n  tokenizer: v3\n")
    return run


def test_run_dir_resolves_base_latest_adapter_and_tokenizer(tmp_path, gen_random_model):
    run = _run_dir(tmp_path, gen_random_model)
    source = resolve_source(run_dir=str(run))
    assert source.base == run / "base_model" and source.tokenizer == "v7"
    assert [a.path.name for a in source.adapters] == ["step_000010"]
    assert resolve_source(run_dir=str(run), step=2).adapters[0].path.name == "step_000002"
    # The adapter folder alone knows its base; extra adapters go after the run's own.
    from_adapter = resolve_source(base=str(run / "checkpoints" / "step_000002"), adapters=[(str(run), 0.5)])
    assert from_adapter.base == run / "base_model"
    assert [(a.path.name, a.scale) for a in from_adapter.adapters] == [("step_000002", 1.0), ("step_000010", 0.5)]


def test_moved_run_dir_finds_its_saved_base(tmp_path, gen_random_model):
    run = _run_dir(tmp_path, gen_random_model)
    moved = run.rename(tmp_path / "moved")
    assert resolve_source(run_dir=str(moved)).base == moved / "base_model"


@pytest.mark.parametrize("kwargs, message", [
    ({}, "nothing to load"),
    ({"base": "a", "run_dir": "b"}, "not both"),
    ({"base": "/no/such/folder"}, "does not exist"),
    ({"run_dir": "{run}", "step": 5}, "no checkpoint for step 5"),
    ({"base": "{empty}"}, "not a model checkpoint"),
    ({"base": "{run}", "adapters": [("{empty}", 1.0)]}, "not an mft adapter folder"),
])
def test_resolution_errors_are_clear(tmp_path, gen_random_model, kwargs, message):
    run = _run_dir(tmp_path, gen_random_model, steps=(2,))
    (tmp_path / "empty").mkdir()
    fill = {"run": str(run), "empty": str(tmp_path / "empty")}
    kwargs = {k: ([(p.format(**fill), s) for p, s in v] if k == "adapters" else v.format(**fill) if isinstance(v, str) else v)
              for k, v in kwargs.items()}
    with pytest.raises(MftError, match=message):
        resolve_source(**kwargs)


# -- chat -----------------------------------------------------------------------------------------
# The anagram function-calling example (Mistral's fine-tuning format): a tool, a system prompt,
# a call, its result, the answer, and a second turn.
SYSTEM = ("You are a helpful assistant who has access to the following functions to help the user, "
          "you can use the functions if needed")
ANAGRAM_TOOL = {
    "type": "function",
    "function": {
        "name": "generate_anagram",
        "description": "Generate an anagram of a given word",
        "parameters": {
            "type": "object",
            "properties": {"word": {"type": "string", "description": "The word to generate an anagram of"}},
            "required": ["word"],
        },
    },
}
ANAGRAMS = {"listen": "silent", "race": "care"}


def generate_anagram(word):
    return {"anagram": ANAGRAMS[word]}


@pytest.fixture(scope="module")
def gen_chat_format():
    from mft.data.tokenizer import load_tokenizer
    from mft.generate.chat import ChatFormat

    return ChatFormat(load_tokenizer("v3"))


def _text_ids(fmt, text):
    return fmt.tokenizer.encode_text(text, bos=False, eos=False)


def _call_ids(fmt, calls):
    return [fmt.tool_calls_id, *_text_ids(fmt, json.dumps(calls))]


class ScriptedModel:
    """Answers each prompt with the next scripted answer (ids), and records the prompts."""

    def __init__(self, answers):
        self.answers, self.prompts = list(answers), []

    def __call__(self, prompt_ids):
        self.prompts.append(prompt_ids)
        return self.answers[len(self.prompts) - 1]


def test_anagram_tool_call_round_trip(gen_chat_format):
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        ToolMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import (
        Function,
        FunctionCall,
        Tool,
        ToolCall,
    )
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mft.generate.chat import ChatSession

    fmt = gen_chat_format
    question = 'Can you help me generate an anagram of the word "listen"?'
    answer = 'The anagram of the word "listen" is "silent".'
    model = ScriptedModel([
        _call_ids(fmt, [{"name": "generate_anagram", "arguments": {"word": "listen"}, "id": "u8jzPde0I"}]),
        _text_ids(fmt, answer),
    ])
    session = ChatSession(fmt, system=SYSTEM, tools=[ANAGRAM_TOOL])
    session.add_user(question)

    reply = session.respond(model)  # the call is parsed ...
    assert reply.content == "" and len(reply.tool_calls) == 1
    call = reply.tool_calls[0]
    assert (call.name, call.arguments, call.id) == ("generate_anagram", {"word": "listen"}, "u8jzPde0I")
    session.add_tool_result(call, generate_anagram(**call.arguments))  # ... run, fed back ...
    final = session.respond(model)  # ... and answered
    assert final.content == answer and not final.tool_calls

    # The prompt after the tool result is mistral-common's own encoding of that conversation.
    reference = MistralTokenizer.from_file(fmt.tokenizer.path, mode=ValidationMode.test).encode_chat_completion(
        ChatCompletionRequest(
            tools=[Tool(function=Function(**ANAGRAM_TOOL["function"]))],
            messages=[
                SystemMessage(content=SYSTEM),
                UserMessage(content=question),
                AssistantMessage(tool_calls=[ToolCall(id="u8jzPde0I", function=FunctionCall(
                    name="generate_anagram", arguments='{"word": "listen"}'))]),
                ToolMessage(tool_call_id="u8jzPde0I", content='{"anagram": "silent"}'),
            ],
        )
    )
    assert model.prompts[1] == reference.tokens
    assert model.prompts[1][-1] == fmt._special("[/TOOL_RESULTS]")
    assert fmt.decode(model.prompts[1]).endswith('{"content": {"anagram": "silent"}, "call_id": "u8jzPde0I"}')


def test_chat_loop_prints_tool_calls_as_json_over_several_turns(gen_chat_format):
    import io

    from mft.generate.chat import ChatSession, chat_loop

    fmt = gen_chat_format
    model = ScriptedModel([
        _call_ids(fmt, [{"name": "generate_anagram", "arguments": {"word": "listen"}, "id": "u8jzPde0I"}]),
        _text_ids(fmt, 'The anagram of the word "listen" is "silent".'),
        _call_ids(fmt, [{"name": "generate_anagram", "arguments": {"word": "race"}}]),  # no id: one is made up
        _text_ids(fmt, 'The anagram of the word "race" is "care".'),
    ])
    inputs = iter(['Can you help me generate an anagram of the word "listen"?',
                   "That's amazing! Can you generate an anagram for the word \"race\"?", "/exit", "never read"])
    out = io.StringIO()
    session = ChatSession(fmt, system=SYSTEM, tools=[ANAGRAM_TOOL])
    chat_loop(session, model, read=lambda _: next(inputs), out=out, run_tool=lambda c: generate_anagram(**c.arguments))
    lines = out.getvalue().splitlines()
    assert json.loads(lines[0]) == {"tool_call": {"id": "u8jzPde0I", "name": "generate_anagram", "arguments": {"word": "listen"}}}
    assert lines[1] == 'assistant> The anagram of the word "listen" is "silent".'
    second = json.loads(lines[2])["tool_call"]
    assert second["arguments"] == {"word": "race"} and len(second["id"]) == 9 and second["id"].isalnum()
    assert lines[3] == 'assistant> The anagram of the word "race" is "care".'
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "assistant"] * 2
    # Each prompt lists the tool once (v3: before the last user turn, with the system prompt) and
    # the last one carries the whole conversation, the made-up call id included.
    assert all(p.count(fmt._special("[AVAILABLE_TOOLS]")) == 1 for p in model.prompts)
    last = fmt.decode(model.prompts[-1])
    assert SYSTEM in last and '"silent"' in last and second["id"] in last


def test_parse_keeps_text_when_tool_calls_are_not_json(gen_chat_format):
    fmt = gen_chat_format
    ids = [*_text_ids(fmt, "Sure."), fmt.tool_calls_id, *_text_ids(fmt, "[{not json")]
    reply = fmt.parse(ids)
    assert not reply.tool_calls and reply.content.startswith("Sure.")
    assert fmt.parse(_text_ids(fmt, "plain answer STOP more"), stop_strings=["STOP"]).content == "plain answer "


def test_text_streamer_prints_the_answer_and_holds_back_stop_strings(gen_chat_format):
    import io

    from mft.generate.chat import TextStreamer

    fmt = gen_chat_format
    ids = _text_ids(fmt, "Café au lait, s'il vous plaît. END and more")
    out = io.StringIO()
    streamer = TextStreamer(fmt, out, prefix="> ", stop_strings=["END"])
    for token in ids:
        streamer(0, token)
        streamer(1, token)  # other rows are not printed
    streamer.finish()
    assert out.getvalue() == "> Café au lait, s'il vous plaît. "


# -- quantised bases and the compiled step -------------------------------------------------------
def test_int4_base_generates_like_its_own_forward(tmp_path):
    """An mft quantised checkpoint loads with its packed layers and decodes as its training forward."""
    from mft.checkpoint.quantized import save_quantized
    from mft.generate.load import ModelSource
    from mft.quant.formats import QuantSpec

    args = ModelArgs(**{**vars(ARGS), "dim": 128, "head_dim": 32, "hidden_dim": 256})
    spec = QuantSpec(format="int4", block_size=128, double_quant=False, dq_block_size=256)
    torch.manual_seed(0)
    save_quantized(build(args, quant=spec, device="cpu", dtype=torch.float32), tmp_path / "q")
    model = load_model(ModelSource(tmp_path / "q"), device="cpu", dtype=torch.float32)
    assert "Quantized" in type(model.layers[0].attention.wq).__name__
    ids = prompt(30)
    out = Generator(model, prefill_chunk=7).generate([ids], GenerationSettings(max_new_tokens=8))[0].tokens
    sequence = list(ids)
    for token in out:
        assert int(_logits(model, sequence)[-1].argmax()) == token
        sequence.append(token)


@pytest.mark.gpu
@pytest.mark.parametrize("args", [ARGS, FAMILY_ARGS], ids=["windowed", "interleaved-yarn-tied"])
def test_compiled_cuda_graph_decoding_equals_eager(args):
    """On the GPU: the compiled step (CUDA graphs) gives eager's tokens, across calls and lengths."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    model = build(args, device="cuda", dtype=torch.float32).eval()
    prompts = [prompt(40), prompt(7, seed=2)]
    settings = GenerationSettings(max_new_tokens=40)
    eager = Generator(model).generate(prompts, settings)
    compiled = Generator(model, compile=True)
    for _ in range(2):  # the second call replays the recorded graph
        assert [g.tokens for g in compiled.generate(prompts, settings)] == [g.tokens for g in eager]
    # A chat on the compiled step: the second turn keeps the cached prefix and still agrees.
    chat = Generator(model, compile=True)
    first = chat.generate(prompts[:1], settings, reuse_prefix=True)[0].tokens
    second = prompts[0] + first + prompt(5, seed=3)
    assert chat.generate([second], settings, reuse_prefix=True)[0].tokens == \
        Generator(model).generate([second], settings)[0].tokens
    assert chat.prefilled == 5 + 1


def test_int4_kernel_layers_match_the_dequantised_path():
    """mft/generate/int4.py: int4 layers (plain and under LoRA) on torch's int4 matmul give the
    logits of mft.quant's dequantise + matmul (CPU kernel here; the CUDA one on the GPU)."""
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no CPU int4 matmul")
    from mft.generate.int4 import Int4Linear, Int4LoRALinear, use_int4_kernels
    from mft.quant.formats import QuantSpec

    args = ModelArgs(**{**vars(ARGS), "dim": 256, "head_dim": 32, "n_heads": 8, "hidden_dim": 512})
    torch.manual_seed(0)
    model = build(args, quant=QuantSpec(format="int4", block_size=128), device="cpu", dtype=torch.bfloat16)
    apply_lora(model, LoRASettings(r=4, alpha=8, target_modules=["wq", "w2"]))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.normal_(std=0.05)
    ids = prompt(24)
    reference = _logits(model, ids).float()
    assert len(use_int4_kernels(model)) == 7 * args.n_layers
    assert isinstance(model.layers[0].attention.wq, Int4LoRALinear) and isinstance(model.layers[0].attention.wk, Int4Linear)
    torch.testing.assert_close(_logits(model, ids).float(), reference, atol=0.05 * reference.abs().max().item(), rtol=0)


@pytest.mark.parametrize("window", [WINDOW, None])
def test_reused_prefix_gives_the_tokens_of_a_fresh_run(window):
    """A chat's next turn (reuse_prefix=True) runs only what is new, and generates what a fresh
    Generator does: a continued turn, an edit inside the history (stale keys dropped), and, with
    a window, a turn whose shared keys a rolling buffer already evicted (full prefill)."""
    torch.manual_seed(0)
    model = build(ModelArgs(**{**vars(ARGS), "sliding_window": window}), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.2)
    settings = GenerationSettings(max_new_tokens=6)
    chat = Generator(model, prefill_chunk=5)

    def turn(ids):
        out = chat.generate([ids], settings, reuse_prefix=True)[0].tokens
        assert out == Generator(model, prefill_chunk=5).generate([ids], settings)[0].tokens
        return out

    first = prompt(12)
    out = turn(first)
    assert chat.prefilled == 12
    second = first + out + prompt(4, seed=7)
    out2 = turn(second)
    assert chat.prefilled == len(second) - (12 + 5)  # all but the prompt and the 5 fed tokens of turn one
    edited = second + out2[:4] + prompt(3, seed=9)  # differs from the history (second + out2[:5]) at out2[4]
    assert edited[len(second) + 4] != out2[4]
    turn(edited)
    assert chat.prefilled == 3
    other = prompt(len(edited), seed=13)  # the cache used outside generate(), at the same positions ...
    chat.prefill([other], chat.cache_for(1, len(other) + 6))
    turn(edited)  # ... is not mistaken for the last call's tokens
    assert chat.prefilled == len(edited)
    long = edited + out2 + prompt(2 * WINDOW, seed=11)
    turn(long)
    turn(long[:5] + prompt(3, seed=12))  # shares 5 tokens, whose keys a rolling buffer has overwritten
    assert chat.prefilled == (8 if window else 3)
