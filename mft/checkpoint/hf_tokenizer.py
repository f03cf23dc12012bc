"""A Mistral SentencePiece tokenizer (v1, v2, v3, v7 `.model` files) as Hugging Face tokenizer files.

`AutoTokenizer.from_pretrained(folder)` then gives the token ids mistral-common gives for plain
text. transformers' own conversion (LlamaTokenizer) differs on runs of spaces: it ranks merges by
vocabulary order, while SentencePiece's BPE joins the adjacent pair whose joined piece scores
highest (Mistral's whitespace pieces score lowest), and its Metaspace adds no `▁` before text that
already starts with a space, while SentencePiece always does. So the tokenizer.json is built here
from the model's pieces and scores, and tokenizer_config.json names the generic fast class, which
takes tokenizer.json as it is. Control tokens written in the text ([INST], </s>) are matched as
special tokens, as in Mistral's own Hugging Face repos (mistral-common reads them as plain text).
A tekken tokenizer needs no conversion: transformers reads tekken.json through mistral-common
(MistralCommonBackend), which tokenizer_config.json names so that a folder without a config.json
(a consolidated export) gets it too; otherwise transformers converts tekken.json and adds no BOS.
"""

import json
from pathlib import Path

HF_TOKENIZER, HF_TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
_SPACE = "\u2581"  # SentencePiece's visible space


def _merges(pieces: list[str], scores: list[float], mergeable: list[bool]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a piece, ranked as SentencePiece applies them:
    highest score of the joined piece first, then lower id."""
    vocab = {piece: i for i, piece in enumerate(pieces)}
    ranked = sorted((i for i in range(len(pieces)) if mergeable[i]), key=lambda i: (-scores[i], i))
    merges = []
    for i in ranked:
        piece = pieces[i]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab and mergeable[vocab[left]] and mergeable[vocab[right]]:
                merges.append((left, right))
    return merges


def write_sentencepiece_as_hf(model_file: str | Path, folder: str | Path) -> None:
    """tokenizer.json + tokenizer_config.json in `folder` for the SentencePiece model `model_file`."""
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    mergeable = [not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)) for i in range(n)]
    bos, eos, unk = pieces[sp.bos_id()], pieces[sp.eos_id()], pieces[sp.unk_id()]

    tokenizer = Tokenizer(BPE({p: i for i, p in enumerate(pieces)}, _merges(pieces, [sp.get_score(i) for i in range(n)],
                                                                              mergeable),
                              unk_token=unk, byte_fallback=True, fuse_unk=True))
    # SentencePiece's add_dummy_prefix: always one `▁` in front, then every space becomes `▁`.
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in special])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())])
    folder = Path(folder)
    tokenizer.save(str(folder / HF_TOKENIZER))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "unk_token": unk,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
    }
    (folder / HF_TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def write_tekken_config(folder: str | Path) -> None:
    """tokenizer_config.json that has AutoTokenizer read the folder's tekken.json with mistral-common."""
    config = {"tokenizer_class": "MistralCommonBackend"}
    (Path(folder) / HF_TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
