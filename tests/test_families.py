"""Every Mistral family through mft's loaders against transformers' own classes, on tiny random
checkpoints that transformers writes: Nemo-style head_dim, Ministral's interleaved windows,
Ministral 3's YaRN + Llama 4 query scale (and its tied 3B head), Mistral3's text model.

For each: fp32 logits within 1e-4 over sequences longer than every window and than YaRN's
original context, packed equal to unpacked, greedy decoding equal to transformers' generate, and
the same model through a consolidated folder and through a Hugging Face export.
"""

import dataclasses
from dataclasses import asdict

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import build  # noqa: E402

from mft.checkpoint.adapter import save_adapter  # noqa: E402
from mft.checkpoint.consolidated import (  # noqa: E402
    args_to_params,
    params_to_args,
    save_consolidated,
)
from mft.checkpoint.export import export_hf, export_peft  # noqa: E402
from mft.checkpoint.load import load_weights, read_model_args  # noqa: E402
from mft.generate.decode import GenerationSettings, Generator  # noqa: E402
from mft.model.args import ModelArgs, QueryScalingArgs, YarnArgs  # noqa: E402
from mft.peft.lora import LoRASettings, lora_modules  # noqa: E402

VOCAB, SEQ, WINDOW, ORIGINAL = 160, 48, 8, 16
# A small shape whose head_dim is not dim / heads (Nemo's trait: 5120 / 32 = 160, head_dim 128).
SHAPE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, initializer_range=0.2)
# YaRN with factor 4 over an original context of 16 tokens, and the Llama 4 query scale stepping
# every 16 positions: both change the logits well inside a 48-token sequence.
YARN = dict(rope_type="yarn", rope_theta=5000.0, factor=4.0, original_max_position_embeddings=ORIGINAL,
            beta_fast=32.0, beta_slow=1.0)


def mistral_nemo_like():
    return transformers.MistralForCausalLM(transformers.MistralConfig(**SHAPE, rope_theta=5000.0, sliding_window=None))


def ministral_interleaved(vocab=VOCAB):
    config = transformers.MinistralConfig(
        **{**SHAPE, "vocab_size": vocab}, rope_theta=5000.0, sliding_window=WINDOW,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"])
    return transformers.MinistralForCausalLM(config)


def ministral3(tie=False, mscale=(1.0, 1.0), vocab=VOCAB):
    rope = {**YARN, "mscale": mscale[0], "mscale_all_dim": mscale[1], "llama_4_scaling_beta": 0.5}
    config = transformers.Ministral3Config(**{**SHAPE, "vocab_size": vocab}, rope_parameters=rope, max_position_embeddings=4 * ORIGINAL,
                                           tie_word_embeddings=tie)
    return transformers.Ministral3ForCausalLM(config)


def mistral_yarn():
    """YaRN with transformers' default attention factor (0.1 ln 4 + 1), in a plain Mistral."""
    config = transformers.MistralConfig(**SHAPE, rope_parameters=dict(YARN), max_position_embeddings=4 * ORIGINAL,
                                        sliding_window=None)
    return transformers.MistralForCausalLM(config)


def mistral3_text(text_model_type="mistral", tie=True):
    """A Mistral3ForConditionalGeneration (vision encoder + text model); mft reads its text model.
    Tied by default (transformers 5's Mistral3Config default); the hub's Small 3.1 is untied."""
    text = (transformers.MistralConfig(**SHAPE, rope_theta=5000.0, sliding_window=None) if text_model_type == "mistral"
            else transformers.Ministral3Config(**SHAPE, rope_parameters={**YARN, "llama_4_scaling_beta": 0.5},
                                               max_position_embeddings=4 * ORIGINAL))
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=32, patch_size=8, head_dim=16)
    config = transformers.Mistral3Config(vision_config=vision, text_config=text, image_token_id=VOCAB - 1,
                                         spatial_merge_size=2, tie_word_embeddings=tie)
    return transformers.Mistral3ForConditionalGeneration(config)


FAMILIES = {
    "mistral-head-dim": mistral_nemo_like,
    "ministral-interleaved": ministral_interleaved,
    "ministral3-yarn-llama4": ministral3,
    "ministral3-tied": lambda: ministral3(tie=True),
    "ministral3-mscale": lambda: ministral3(mscale=(1.0, 0.0)),
    "mistral-yarn": mistral_yarn,
    "mistral3-text": mistral3_text,
    "mistral3-text-untied": lambda: mistral3_text(tie=False),
    "mistral3-ministral3-text": lambda: mistral3_text("ministral3"),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers model, folder it saved itself to, mft model loaded from that folder)."""
    torch.manual_seed(0)
    hf_model = FAMILIES[request.param]().eval()
    folder = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(folder)
    model = build(read_model_args(folder), device="cpu", dtype=torch.float32, weights=folder).eval()
    return request.param, hf_model, folder, model


def tokens(n=SEQ, seed=1):
    return torch.randint(0, VOCAB - 1, (n,), generator=torch.Generator().manual_seed(seed))


def mft_forward(model, toks, lengths=None):
    lengths = lengths or [len(toks)]
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return model(toks, positions, cu, max(lengths))


def mft_logits(model, toks, lengths=None):
    with torch.no_grad():
        return mft_forward(model, toks, lengths)


def hf_logits(model, toks):
    with torch.no_grad():
        return model(input_ids=toks[None], use_cache=False).logits[0]


def test_args_read_the_family(family):
    name, _, folder, model = family
    args = model.args
    assert args.head_dim == 16 and args.dim == 48
    if name == "ministral-interleaved":
        assert args.sliding_window == [None, WINDOW, WINDOW, WINDOW]
        assert [layer.attention.window for layer in model.layers] == [None, WINDOW, WINDOW, WINDOW]
    if name.startswith("ministral3") or name == "mistral3-ministral3-text":
        assert args.yarn == YarnArgs(4.0, ORIGINAL, 32.0, 1.0, *( (1.0, 0.0) if name == "ministral3-mscale" else
                                                                  (1.0, 1.0) if name != "mistral3-ministral3-text"
                                                                  else (0.0, 0.0)))
        assert args.query_scaling == QueryScalingArgs(0.5, ORIGINAL)
    if name == "mistral-yarn":
        assert args.yarn.active and not args.query_scaling.active  # transformers' Mistral has no query scale
    tied = name == "ministral3-tied" or name.startswith("mistral3") and not name.endswith("untied")
    assert args.tied_embeddings == tied


def test_logits_match_transformers(family):
    _, hf_model, _, model = family
    toks = tokens()
    diff = (mft_logits(model, toks) - hf_logits(hf_model, toks)).abs().max().item()
    assert diff <= 1e-4, diff


def test_the_comparison_sees_each_feature(family):
    """Turning the family's feature off moves the logits far beyond the tolerance: the match above
    tests the feature, not a sequence too short to show it."""
    name, hf_model, folder, _ = family
    args = read_model_args(folder)
    changes = {"ministral-interleaved": {"sliding_window": WINDOW}, "mistral-yarn": {"yarn": YarnArgs()},
               "ministral3-yarn-llama4": {"query_scaling": QueryScalingArgs()}, "ministral3-mscale": {"yarn": YarnArgs()},
               "mistral3-ministral3-text": {"yarn": YarnArgs()}}
    if name not in changes:
        pytest.skip("no switchable feature")
    wrong = build(ModelArgs(**{**vars(args), **changes[name]}), device="cpu", dtype=torch.float32, weights=folder)
    toks = tokens()
    assert (mft_logits(wrong.eval(), toks) - hf_logits(hf_model, toks)).abs().max().item() > 1e-2


def test_packed_equals_unpacked(family):
    _, _, _, model = family
    lengths = [SEQ, 5, 29]
    toks = tokens(sum(lengths))
    packed = mft_logits(model, toks, lengths)
    start = 0
    for n in lengths:
        alone = mft_logits(model, toks[start:start + n])
        assert (packed[start:start + n] - alone).abs().max().item() <= 1e-5
        start += n


def test_greedy_equals_transformers_generate(family):
    _, hf_model, _, model = family
    ids = tokens(21).tolist()
    n = 40  # well past the window and YaRN's original context
    hf_model.generation_config.eos_token_id = None  # no stop token on either side
    with torch.no_grad():
        ids_t = torch.tensor([ids])
        theirs = hf_model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n, do_sample=False,
                                   pad_token_id=0)[0, len(ids):].tolist()
    ours = Generator(model, prefill_chunk=7).generate([ids], GenerationSettings(max_new_tokens=n))[0].tokens
    assert ours == theirs


def test_consolidated_folder_round_trip(family, tmp_path):
    """params.json in Mistral's names carries the family's settings; the weights give the same logits."""
    _, hf_model, _, model = family
    folder = save_consolidated(model, tmp_path / "consolidated")
    assert params_to_args(args_to_params(model.args), folder) == model.args
    again = build(read_model_args(folder), device="cpu", dtype=torch.float32, weights=folder).eval()
    toks = tokens()
    assert (mft_logits(again, toks) - hf_logits(hf_model, toks)).abs().max().item() <= 1e-4


def test_hf_export_loads_in_transformers(family, tmp_path):
    """export_hf writes the family transformers computes the same with (ministral, ministral3, ...)."""
    _, hf_model, _, model = family
    out = export_hf(model, tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    toks = tokens()
    assert (hf_logits(reloaded, toks) - hf_logits(hf_model, toks)).abs().max().item() <= 1e-4


def test_peft_export_loads_onto_transformers(family, tmp_path):
    """An adapter trained on the family, exported for peft with its base as a Hugging Face text
    model, gives mft's adapted logits in transformers + peft."""
    peft = pytest.importorskip("peft")
    _, _, folder, _ = family
    args = read_model_args(folder)
    adapted = build(args, device="cpu", dtype=torch.float32, weights=folder, lora=LoRASettings(r=4, alpha=8))
    with torch.no_grad():
        for module in lora_modules(adapted).values():
            module.lora_b.normal_(std=0.1)
    base = {"name": "family", "checkpoint": str(folder), "tokenizer": "v3", "args": asdict(args)}
    save_adapter(adapted, tmp_path / "adapter", LoRASettings(r=4, alpha=8), base)
    plain = build(args, device="cpu", dtype=torch.float32, weights=folder)
    out = export_peft(tmp_path / "adapter", tmp_path / "peft", base_model=plain)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf_base, out).eval()
    toks = tokens()
    expected = mft_logits(adapted.eval(), toks)
    assert (expected - mft_logits(plain.eval(), toks)).abs().max().item() > 1e-2  # the adapter matters
    assert (hf_logits(theirs, toks) - expected).abs().max().item() <= 1e-4


def test_vision_tensors_are_skipped_with_one_line(tmp_path, caplog):
    torch.manual_seed(0)
    mistral3_text().save_pretrained(tmp_path)
    model = build(read_model_args(tmp_path), device="cpu", dtype=torch.float32)
    with caplog.at_level("INFO", logger="mft.checkpoint.load"):
        load_weights(model, tmp_path)
    lines = [r.getMessage() for r in caplog.records if "vision encoder" in r.getMessage()]
    assert len(lines) == 1 and "skipped the" in lines[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "flex", "sdpa"])
def test_every_family_feature_on_the_gpu(backend):
    """Interleaved windows, YaRN, the query scale and a tied head together, packed, through each
    CUDA attention backend: the CPU forward's logits. fp32 inputs, but the Triton kernels multiply
    in tf32, so the tolerance is 5% of the logits' range; the same weights without the family's
    features are several times further off, so the tolerance still tells them apart."""
    args = ModelArgs(dim=64, n_layers=4, head_dim=32, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                     rope_theta=5000.0, sliding_window=[None, 24, 24, 24], yarn=YarnArgs(4.0, 64),
                     query_scaling=QueryScalingArgs(0.5, 64), tied_embeddings=True)
    lengths = [300, 37, 200]
    toks = tokens(sum(lengths))
    cpu = build(args, device="cpu", dtype=torch.float32, seed=3, std=0.2).eval()
    plain = build(dataclasses.replace(args, sliding_window=24, yarn=YarnArgs(), query_scaling=QueryScalingArgs()),
                  device="cpu", dtype=torch.float32).eval()
    plain.load_state_dict(cpu.state_dict())
    gpu = build(args, device="cuda", dtype=torch.float32, attn_backend=backend).eval()
    gpu.load_state_dict(cpu.state_dict())  # random weights are drawn per device: copy the CPU's
    expected = mft_logits(cpu, toks, lengths)
    tolerance = 0.05 * expected.abs().max().item()
    assert (mft_logits(plain, toks, lengths) - expected).abs().max().item() > 4 * tolerance
    positions = torch.cat([torch.arange(n) for n in lengths]).cuda()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        got = gpu(toks.cuda(), positions, cu, max(lengths)).cpu()
    assert (got - expected).abs().max().item() <= tolerance


@pytest.mark.parametrize("make", [ministral_interleaved, ministral3], ids=["ministral", "ministral3"])
def test_mft_generate_command_equals_transformers_generate(tmp_path, make):
    """The mft-generate command on a transformers-written folder with its own tekken.json: the
    chat prompt mistral-common builds, greedy, gives the text of transformers' generate."""
    torch.manual_seed(0)
    assert_mft_generate_command_equals_transformers(make(vocab=131072).eval(), tmp_path, 24)  # the tekken vocabulary


def assert_mft_generate_command_equals_transformers(hf_model, tmp_path, max_new_tokens: int) -> None:
    """`hf_model` (of the tekken vocabulary) saved with v3-tekken's tekken.json: `mft-generate` on
    the folder prints the text of transformers' greedy generate of the same chat prompt."""
    import shutil
    import subprocess
    import sys

    from mft.data.tokenizer import BUILTIN, load_tokenizer
    from mft.generate.chat import ChatFormat

    hf_model.save_pretrained(tmp_path / "model")
    shutil.copyfile(BUILTIN["v3-tekken"], tmp_path / "model" / "tekken.json")
    fmt = ChatFormat(load_tokenizer(tmp_path / "model"))
    ids = fmt.encode([{"role": "user", "content": "Name three rivers."}])
    with torch.no_grad():
        ids_t = torch.tensor([ids])
        out = hf_model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=fmt.tokenizer.eos_id, pad_token_id=fmt.tokenizer.eos_id)
    new = [t for t in out[0, len(ids):].tolist() if t != fmt.tokenizer.eos_id]
    cmd = [sys.executable, "-m", "mft.generate", f"base={tmp_path / 'model'}", "prompt=Name three rivers.",
           f"max_new_tokens={max_new_tokens}", "device=cpu", "precision=fp32", "stream=false"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == fmt.decode(new) + "\n"


def test_mistral3_tensor_names_of_both_layouts(tmp_path):
    """An untied Mistral3 (Small 3.1's layout) saved by transformers, and the same tensors renamed
    to transformers 5's module names (model.language_model.*, lm_head): the same logits."""
    import json

    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    hf_model = mistral3_text(tie=False).eval()
    hf_model.save_pretrained(tmp_path / "disk")
    tensors = load_file(str(tmp_path / "disk" / "model.safetensors"))
    assert any(k.startswith("language_model.model.") for k in tensors) and "language_model.lm_head.weight" in tensors
    renamed = {k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head."): v
               for k, v in tensors.items()}
    (tmp_path / "modules").mkdir()
    save_file(renamed, str(tmp_path / "modules" / "model.safetensors"))
    config = json.loads((tmp_path / "disk" / "config.json").read_text())
    (tmp_path / "modules" / "config.json").write_text(json.dumps(config))
    toks = tokens()
    expected = hf_logits(hf_model, toks)
    for folder in ("disk", "modules"):
        model = build(read_model_args(tmp_path / folder), device="cpu", dtype=torch.float32, weights=tmp_path / folder)
        assert not model.args.tied_embeddings
        assert (mft_logits(model.eval(), toks) - expected).abs().max().item() <= 1e-4


def test_mistral3_without_a_tying_key_or_a_head_is_tied(tmp_path):
    """No top-level tie_word_embeddings, the text config saying untied, no head in the files:
    transformers 5 ties (its Mistral3 default), and so does mft."""
    import json

    torch.manual_seed(0)
    hf_model = mistral3_text().eval()  # tied: the files hold no head
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("tie_word_embeddings")
    config["text_config"]["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_model_args(tmp_path).tied_embeddings


@pytest.mark.parametrize("rope, message", [
    ({"factor": "x"}, "'rope_parameters.factor' must be a number"),
    ({"beta_slow": -1.0}, "yarn.beta_slow is -1.0, expected a positive number"),
    ({"factor": 0.5}, "yarn.factor is 0.5, expected a number > 1"),
    ({"llama_4_scaling_beta": "x"}, "'rope_parameters.llama_4_scaling_beta' must be a number"),
])
def test_bad_rope_values_in_config_json_are_one_message(tmp_path, rope, message):
    import json
    import re

    from mft.utils.errors import MftError

    ministral3().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"].update(rope)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MftError, match=re.escape(message)):
        read_model_args(tmp_path)


def test_a_checkpoint_quantised_by_another_tool_is_one_message(tmp_path):
    import json

    from mft.utils.errors import MftError

    ministral3().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MftError, match="quantised by another tool.*'fp8'"):
        read_model_args(tmp_path)


def test_consolidated_multimodal_folder_loads_its_text_model(tmp_path, caplog):
    """A Small 3.1-style consolidated folder: the vision encoder's tensors are skipped, counted once."""
    import json

    from safetensors.torch import load_file, save_file

    args = ModelArgs(dim=48, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=VOCAB)
    model = build(args, device="cpu", dtype=torch.float32, seed=5).eval()
    folder = save_consolidated(model, tmp_path / "text")
    tensors = load_file(str(folder / "consolidated.safetensors"))
    extra = {"vision_encoder.patch_conv.weight": torch.zeros(8, 3, 2, 2), "patch_merger.merging_layer.weight":
             torch.zeros(8, 32), "vision_language_adapter.w_in.weight": torch.zeros(48, 8)}
    multimodal = tmp_path / "multimodal"
    multimodal.mkdir()
    save_file({**tensors, **extra}, str(multimodal / "consolidated.safetensors"))
    (multimodal / "params.json").write_text(json.dumps({**args_to_params(args), "vision_encoder": {"hidden_size": 8}}))
    with caplog.at_level("INFO", logger="mft.checkpoint.load"):
        again = build(read_model_args(multimodal), device="cpu", dtype=torch.float32, weights=multimodal).eval()
    assert [r.getMessage() for r in caplog.records if "vision encoder" in r.getMessage()] == [
        f"{multimodal}: skipped the 3 tensors of the vision encoder (mft trains the text model)"]
    toks = tokens()
    assert torch.equal(mft_logits(again, toks), mft_logits(model, toks))


def test_gradients_match_transformers(family):
    """Full fine-tuning: the loss's gradients equal transformers' (a tied head's gradient is the
    sum of its two uses, in one parameter on both sides)."""
    name, hf_model, folder, _ = family
    model = build(read_model_args(folder), device="cpu", dtype=torch.float32, weights=folder).eval()
    toks = tokens()
    loss = torch.nn.functional.cross_entropy(mft_forward(model, toks)[:-1], toks[1:])
    loss.backward()
    hf_model.zero_grad()
    theirs = torch.nn.functional.cross_entropy(hf_model(input_ids=toks[None]).logits[0, :-1], toks[1:])
    theirs.backward()
    ours = dict(model.named_parameters())
    hf_embed = hf_model.get_input_embeddings()
    rows = torch.arange(VOCAB) != (hf_embed.padding_idx if hf_embed.padding_idx is not None else -1)
    # transformers' Ministral3 embedding never trains its pad id's row (padding_idx); mft's does.
    assert (ours["tok_embeddings.weight"].grad - hf_embed.weight.grad)[rows].abs().max().item() <= 1e-5
    hf_wo = hf_model.get_decoder().layers[1].self_attn.o_proj.weight
    assert (ours["layers.1.attention.wo.weight"].grad - hf_wo.grad).abs().max().item() <= 1e-5
    hf_model.zero_grad()


def test_mistral3_head_is_untied_when_the_files_hold_one(tmp_path):
    """A Mistral3 config.json that says nothing of tying (transformers 5 then defaults to tied)
    over files with an lm_head of their own: that head is used, as transformers does."""
    import json

    torch.manual_seed(0)
    model = mistral3_text()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 48) * 0.2)
    model.eval().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("tie_word_embeddings")
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = read_model_args(tmp_path)
    assert not args.tied_embeddings
    ours = build(args, device="cpu", dtype=torch.float32, weights=tmp_path).eval()
    toks = tokens()
    assert (mft_logits(ours, toks) - hf_logits(model, toks)).abs().max().item() <= 1e-4


def test_params_json_yarn_attention_factor(tmp_path):
    """params.json's yarn: the attention factor of transformers' conversion (1 with a vision
    encoder, else YaRN's own), unless apply_scale says which."""
    from mft.model.rope import yarn_attention_factor

    base = {"dim": 48, "n_layers": 2, "hidden_dim": 96, "n_heads": 4, "vocab_size": VOCAB, "rope_theta": 1e6,
            "llama_4_scaling": {"original_max_position_embeddings": 16, "beta": 0.1}}
    yarn = {"factor": 16.0, "original_max_position_embeddings": 16, "beta": 32.0, "alpha": 1.0}
    own = 1 + 0.1 * torch.log(torch.tensor(16.0)).item()
    cases = [({**base, "yarn": yarn, "vision_encoder": {"hidden_size": 8}}, 1.0), ({**base, "yarn": yarn}, own),
             ({**base, "yarn": {**yarn, "apply_scale": False}}, 1.0),
             ({**base, "yarn": {**yarn, "apply_scale": True}, "vision_encoder": {}}, own)]
    for params, factor in cases:
        args = params_to_args(params, tmp_path)
        assert yarn_attention_factor(args.yarn) == pytest.approx(factor)
        assert args.query_scaling == QueryScalingArgs(0.1, 16)
        assert params_to_args(args_to_params(args), tmp_path) == args
