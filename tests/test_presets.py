"""The conf/model/ presets of the current Mistral models. Each one composes through Hydra into the
schema and passes the model checks; equals, field by field, its model's published config.json
read by the transformers config class and mapped as mft/checkpoint/hf.py maps config.json; and,
built on the meta device, has the published parameter count, which transformers' own model of
the same config.json has too."""

import dataclasses
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import (
    Ministral3ForCausalLM,
    MinistralConfig,
    MinistralForCausalLM,
    Mistral3Config,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedConfig,
)

from mft.checkpoint.hf import hf_config_to_args
from mft.compose import compose, to_dataclass
from mft.config import register_configs
from mft.data.tokenizer import load_tokenizer
from mft.model.args import ModelArgs
from mft.model.transformer import Transformer
from mft.train.checks import model_args

# What every model below shares: 128-wide heads, 32 query and 8 KV heads, RMSNorm eps 1e-5, no
# biases. TEKKEN adds the 2**17-token tekken vocabulary of every model after Codestral.
HEADS = dict(head_dim=128, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5)
TEKKEN = dict(HEADS, vocab_size=131072)


def small_31_text() -> dict:
    """Mistral Small 3.1's text model: config.json's text_config of Mistral-Small-3.1-24B-*-2503
    and Mistral-Small-3.2-24B-Instruct-2506 (the same numbers in both)."""
    return dict(TEKKEN, model_type="mistral", hidden_size=5120, num_hidden_layers=40, intermediate_size=32768,
                rope_theta=1e9, max_position_embeddings=131072, sliding_window=None, tie_word_embeddings=False)


def ministral3_text(hidden_size: int, num_hidden_layers: int, intermediate_size: int, rope_theta: float,
                    tie_word_embeddings: bool) -> dict:
    """text_config of a Ministral-3-*-2512 checkpoint: YaRN x16 over 16384 positions with mscale =
    mscale_all_dim = 1 (no cos/sin factor), and Llama 4's query scale with beta 0.1."""
    rope = dict(rope_type="yarn", rope_theta=rope_theta, factor=16.0, original_max_position_embeddings=16384,
                beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)
    return dict(TEKKEN, model_type="ministral3", hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                intermediate_size=intermediate_size, max_position_embeddings=262144, sliding_window=None,
                tie_word_embeddings=tie_word_embeddings, rope_parameters=rope)


def mistral3(text: dict) -> Mistral3Config:
    """A vision + text checkpoint's config. transformers 5 ties the head by the top-level key (its
    default: tied); it is set here to the text model's own value, as a faithful config.json has it
    (with none, mft and transformers both go by whether the files hold a head)."""
    return Mistral3Config(text_config=text, tie_word_embeddings=text["tie_word_embeddings"])


def published() -> dict[str, PreTrainedConfig]:
    """Each preset's model, as transformers reads its published config.json."""
    return {
        # mistralai/Mistral-Nemo-Base-2407 config.json (transformers 4.43.3).
        "mistral-nemo-12b": MistralConfig(**TEKKEN, hidden_size=5120, num_hidden_layers=40, intermediate_size=14336,
                                          rope_theta=1e6, max_position_embeddings=128000, sliding_window=None,
                                          tie_word_embeddings=False),
        # mistralai/Mistral-Small-24B-Base-2501 / Instruct-2501 config.json.
        "mistral-small-24b": MistralConfig(**TEKKEN, hidden_size=5120, num_hidden_layers=40, intermediate_size=32768,
                                           rope_theta=1e8, max_position_embeddings=32768, sliding_window=None,
                                           tie_word_embeddings=False),
        # mistralai/Mistral-Small-3.1-24B-Instruct-2503 and 3.2-24B-Instruct-2506 (Mistral3ForConditionalGeneration).
        "mistral-small-3.1-24b": mistral3(small_31_text()),
        # mistralai/Magistral-Small-2509: a Mistral3 checkpoint over Small 3.2; 2506 and 2507 carry
        # the same text model as a MistralForCausalLM. The model cards name the base; no verbatim
        # Magistral config.json was at hand, so these are Small 3.1's numbers.
        "magistral-small": mistral3(small_31_text()),
        # mistralai/Devstral-Small-2505 / 2507: Small 3.1's text model alone, MistralForCausalLM (the
        # cards name the base; no verbatim Devstral config.json was at hand).
        "devstral-small": MistralConfig(**{k: v for k, v in small_31_text().items() if k != "model_type"}),
        # mistralai/Codestral-22B-v0.1: Mixtral-8x22B's attention (6144 wide, 56 layers, 48/8 heads,
        # theta 1e6) with one dense 16384 SwiGLU, vocabulary tokenizer.model.v3; from secondary
        # sources (no verbatim config.json was at hand); the count they give matches the Hub's 22.2B.
        "codestral-22b": MistralConfig(**dict(HEADS, num_attention_heads=48), vocab_size=32768, hidden_size=6144,
                                       num_hidden_layers=56, intermediate_size=16384, rope_theta=1e6,
                                       max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False),
        # mistralai/Ministral-8B-Instruct-2410: params.json's sliding_window [null, 32768, 32768, 32768]
        # over 36 layers, which transformers' Ministral spells as layer_types (one full layer, then 3
        # sliding). The Hub's config.json of October 2024 (model_type mistral) says 32768 for all.
        "ministral-8b": MinistralConfig(**TEKKEN, hidden_size=4096, num_hidden_layers=36, intermediate_size=12288,
                                        rope_theta=1e8, max_position_embeddings=32768, sliding_window=32768,
                                        layer_types=(["full_attention"] + ["sliding_attention"] * 3) * 9,
                                        tie_word_embeddings=False),
        # mistralai/Ministral-3-{3B,8B,14B}-*-2512: Mistral3ForConditionalGeneration, ministral3 text.
        "ministral-3-3b": mistral3(ministral3_text(3072, 26, 9216, 1e6, tie_word_embeddings=True)),
        "ministral-3-8b": mistral3(ministral3_text(4096, 34, 14336, 1e6, tie_word_embeddings=False)),
        "ministral-3-14b": mistral3(ministral3_text(5120, 40, 16384, 1e9, tie_word_embeddings=False)),
        # mistralai/Mixtral-8x7B-v0.1 / Instruct-v0.1 config.json (transformers 4.36): 8 experts, top 2.
        "mixtral-8x7b": MixtralConfig(**HEADS, vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                                      intermediate_size=14336, rope_theta=1e6, max_position_embeddings=32768,
                                      sliding_window=None, num_local_experts=8, num_experts_per_tok=2,
                                      output_router_logits=False, router_aux_loss_coef=0.02, tie_word_embeddings=False),
        # mistralai/Mixtral-8x22B-v0.1 / Instruct-v0.1 config.json: 56 layers at 6144, 48 query heads,
        # the v3 vocabulary (32768).
        "mixtral-8x22b": MixtralConfig(**dict(HEADS, num_attention_heads=48), vocab_size=32768, hidden_size=6144,
                                       num_hidden_layers=56, intermediate_size=16384, rope_theta=1e6,
                                       max_position_embeddings=65536, sliding_window=None, num_local_experts=8,
                                       num_experts_per_tok=2, output_router_logits=False, router_aux_loss_coef=0.001,
                                       tie_word_embeddings=False),
    }


PUBLISHED = published()
PRESETS = list(PUBLISHED)

# Unique parameters of each text model (a tied head counted once), computed from the published
# shapes: embedding + n_layers x (attention + SwiGLU + 2 norms) + final norm + output head. The
# model cards' rounded figures are in the comments; Ministral 8B's card gives the exact number.
PARAMS = {
    "mistral-nemo-12b": 12_247_782_400,  # "12.2B"
    "mistral-small-24b": 23_572_403_200,  # "24B" (the Hub shows 23.6B)
    "mistral-small-3.1-24b": 23_572_403_200,  # the language model of the 24B (vision tower not counted)
    "magistral-small": 23_572_403_200,  # likewise
    "devstral-small": 23_572_403_200,  # likewise
    "codestral-22b": 22_247_282_688,  # "22.2B"
    "ministral-8b": 8_019_808_256,  # the model card's exact count
    "ministral-3-3b": 3_429_006_336,  # "3.4B Language Model" (+ 0.4B vision)
    "ministral-3-8b": 8_489_553_920,  # "8.4B" on the cards and in NVIDIA's docs (+ 0.4B vision)
    "ministral-3-14b": 13_506_073_600,  # "13.5B Language Model" (+ 0.4B vision)
    "mixtral-8x7b": 46_702_792_704,  # "46.7B total parameters" (12.9B active per token)
    "mixtral-8x22b": 140_630_071_296,  # "141B" (39B active per token)
}

CAUSAL_LM = {"mistral": MistralForCausalLM, "ministral": MinistralForCausalLM, "ministral3": Ministral3ForCausalLM,
             "mixtral": MixtralForCausalLM}

def text_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The language model's config: a Mistral3 checkpoint's text_config, else the config itself."""
    return config.text_config if isinstance(config, Mistral3Config) else config


def published_args(name: str) -> ModelArgs:
    """The published config.json as mft reads it (a Mistral3 checkpoint: its text model)."""
    return hf_config_to_args(PUBLISHED[name].to_dict(), Path(f"{name}/config.json"))


def comparable(args: ModelArgs) -> dict:
    """Every field, nested settings as dicts, the window as one entry per layer (a 4-entry pattern
    and its 36-entry expansion are the same model)."""
    return {**dataclasses.asdict(args), "sliding_window": args.windows}


@cache
def preset(name: str):
    register_configs()
    return to_dataclass(compose("train", [f"model={name}"])).model


def preset_args(name: str) -> ModelArgs:
    return model_args(preset(name))  # the schema's ModelArgs, through mft-train's model checks


def unique_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_into_the_schema_and_passes_the_checks(name):
    cfg = preset(name)
    assert cfg.name == name and cfg.checkpoint is None
    args = preset_args(name)
    assert len(args.windows) == args.n_layers


@pytest.mark.parametrize("name", PRESETS)
def test_preset_equals_the_published_config(name):
    assert comparable(preset_args(name)) == comparable(published_args(name))


@pytest.mark.parametrize("name", PRESETS)
def test_published_count_is_transformers_count(name):
    text = text_config(PUBLISHED[name])
    with torch.device("meta"):
        model = CAUSAL_LM[text.model_type](text)
    assert unique_parameters(model) == PARAMS[name]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_has_the_published_parameter_count(name):
    with torch.device("meta"):
        model = Transformer(preset_args(name))
    assert unique_parameters(model) == PARAMS[name]


@cache
def tokenizer_vocab(spec: str) -> int:
    return load_tokenizer(spec).vocab_size


@pytest.mark.parametrize("name", PRESETS)
def test_preset_tokenizer_fills_the_vocabulary(name):
    assert tokenizer_vocab(preset(name).tokenizer) == preset(name).vocab_size
