"""mft's chat encoding against mistral-common's own encode_chat_completion (the reference)."""

import functools
import shutil

import pytest
import sentencepiece
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mft.data.tokenizer import BUILTIN, load_tokenizer
from mft.errors import MftError

VERSIONS = ["v1", "v3", "v7", "v3-tekken"]
SYSTEM = {"role": "system", "content": "You answer briefly."}
CONVERSATIONS = {
    "single": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    "multi": [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "2 + 3 = 5."},
        {"role": "user", "content": "Reverse the words: cat dog sun"},
        {"role": "assistant", "content": "sun dog cat"},
        {"role": "user", "content": "And [INST] this </s>?"},  # control strings stay plain text
        {"role": "assistant", "content": "Plain text: [/INST] <s>"},
    ],
}
CASES = [(name, system) for name in CONVERSATIONS for system in (False, True)]
MC_CLASSES = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


@pytest.fixture(scope="module")
def data_tokenizers():
    return {v: load_tokenizer(v) for v in VERSIONS}


def _messages(name, system):
    return ([SYSTEM] if system else []) + CONVERSATIONS[name]


@functools.cache
def _reference(path):
    return MistralTokenizer.from_file(path, mode=ValidationMode.finetuning)


def _reference_ids(tok, messages):
    """mistral-common, end to end: validator (finetuning mode) + normalizer + encode_instruct."""
    ref = _reference(tok.path)
    request = ChatCompletionRequest(messages=[MC_CLASSES[m["role"]](content=m["content"]) for m in messages])
    return ref.encode_chat_completion(request).tokens


def _runs(mask):
    """(start, end) of each maximal run of True."""
    runs, start = [], None
    for i, m in enumerate(mask + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name,system", CASES)
def test_chat_ids_equal_mistral_common(data_tokenizers, version, name, system):
    tok = data_tokenizers[version]
    messages = _messages(name, system)
    ids, mask = tok.encode_chat(messages)
    assert ids == _reference_ids(tok, messages)
    assert len(mask) == len(ids)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name,system", CASES)
def test_chat_mask_covers_exactly_assistant_tokens(data_tokenizers, version, name, system):
    tok = data_tokenizers[version]
    messages = _messages(name, system)
    ids, mask = tok.encode_chat(messages)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = _runs(mask)
    assert len(runs) == len(answers)
    for (start, end), answer in zip(runs, answers):
        assert ids[end - 1] == tok.eos_id  # each answer ends with its EOS, supervised
        assert tok.decode(ids[start : end - 1]).strip() == answer
    # Everything else (BOS, system prompt, [INST] ... [/INST]) is unsupervised and holds no EOS.
    assert not mask[0] and ids[0] == tok.bos_id
    unsupervised = [i for i, m in zip(ids, mask) if not m]
    assert tok.eos_id not in unsupervised
    prompt_text = tok.decode(unsupervised)
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"].split()[0] in prompt_text


def test_system_prompt_placement_follows_the_version(data_tokenizers):
    """v1: first user message; v3: last user message; v7: its own [SYSTEM_PROMPT] block."""
    messages = [SYSTEM] + CONVERSATIONS["multi"]
    texts = {v: data_tokenizers[v].decode(data_tokenizers[v].encode_chat(messages)[0], keep_special=True)
             for v in ("v1", "v3", "v7")}
    sys_text = SYSTEM["content"]
    assert texts["v1"].replace("▁", " ").index(sys_text) < texts["v1"].replace("▁", " ").index("Add 2")
    assert texts["v3"].replace("▁", " ").index(sys_text) > texts["v3"].replace("▁", " ").index("sun dog cat")
    assert "[SYSTEM_PROMPT]" in texts["v7"]


@pytest.mark.parametrize("version", ["v1", "v3", "v7"])
def test_text_is_bos_sentencepiece_eos(data_tokenizers, version):
    tok = data_tokenizers[version]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(BUILTIN[version]))
    text = "Hello world. [INST] is plain text here </s>\nnew line"
    assert tok.encode_text(text) == [tok.bos_id, *sp.encode(text), tok.eos_id]
    assert tok.encode_text(text, bos=False, eos=False) == sp.encode(text)
    assert tok.decode(tok.encode_text(text)) == text


def test_attributes(data_tokenizers):
    assert [data_tokenizers[v].version for v in VERSIONS] == ["v1", "v3", "v7", "v3"]
    assert data_tokenizers["v1"].vocab_size == 32000
    assert data_tokenizers["v3"].vocab_size == 32768
    assert data_tokenizers["v3-tekken"].vocab_size == 131072
    for tok in data_tokenizers.values():
        assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_load_from_file_and_folder(tmp_path):
    assert load_tokenizer(str(BUILTIN["v7"])).version == "v7"
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(BUILTIN["v1"], folder / "tokenizer.model")  # HF-style unversioned file
    shutil.copy(BUILTIN["v3"], folder / "tokenizer.model.v3")
    (folder / "tokenizer.json").write_text("{}")  # an HF tokenizer.json is not a Mistral tokenizer
    assert load_tokenizer(folder).path == str(folder / "tokenizer.model.v3")
    shutil.copy(BUILTIN["v3-tekken"], folder / "tekken.json")
    assert load_tokenizer(folder).path == str(folder / "tekken.json")


def test_bad_specs(tmp_path):
    with pytest.raises(MftError, match="v1, v3, v7"):
        load_tokenizer("v42")
    with pytest.raises(MftError, match="no Mistral tokenizer file"):
        load_tokenizer(tmp_path)
    with pytest.raises(MftError, match="message role 'tool'"):
        load_tokenizer("v3").encode_chat([{"role": "tool", "content": "x"}])
