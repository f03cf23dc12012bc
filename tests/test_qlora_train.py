"""QLoRA through the Hydra app: converges like LoRA on the tiny model, and set-ups that cannot work fail clearly."""

import json

import pytest

from mft.checkpoint.adapter import read_adapter_config
from mft.checkpoint.load import detect_format
from mft.compose import compose, to_dataclass
from mft.config import register_configs
from mft.train.loop import train
from mft.utils.errors import MftError

# ~6 s per run on 2 CPU cores: 60 steps of 4 x 128 tokens, evaluated at the end on 8 batches.
SHORT = ["max_steps=60", "eval_every=0", "eval_batches=8", "progress=false", "data.seq_len=128", "batch_size=4",
         "optim.warmup_steps=5"]


def config(*overrides: str):
    register_configs()
    return to_dataclass(compose("train", overrides))


def test_qlora_converges_like_lora_on_the_tiny_model(tmp_path):
    results = {}
    for quant in ("none", "nf4", "int4"):
        results[quant] = train(config(f"quant={quant}", *SHORT), tmp_path / quant)
    base = results["none"]
    assert base.metrics["valid_loss"] < 0.7 * base.first_valid_loss  # it does learn in 60 steps
    for quant in ("nf4", "int4"):
        final = results[quant].metrics["valid_loss"]
        assert abs(final - base.metrics["valid_loss"]) <= 0.05 * base.metrics["valid_loss"], (quant, final, base.metrics)
        # The random base is kept quantised; the adapter records what it was trained on.
        assert detect_format(tmp_path / quant / "base_model") == "quantized"
        adapter = read_adapter_config(results[quant].checkpoint)
        assert adapter["base_model"]["quant"]["format"] == quant
    assert json.loads((tmp_path / "nf4" / "base_model" / "quant_config.json").read_text())["quant"]["double_quant"]


def test_quant_config_group_values():
    cfg = config("quant=nf4")
    assert (cfg.quant.format, cfg.quant.block_size, cfg.quant.double_quant) == ("nf4", 64, True)
    cfg = config("quant=int4")
    assert (cfg.quant.format, cfg.quant.block_size, cfg.quant.double_quant) == ("int4", 128, False)
    assert config().quant.format == "none"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["quant=nf4", "peft=none"], "needs peft=lora"),
        (["quant=int4", "quant.double_quant=true"], "nf4 only"),
        (["quant=nf4", "quant.modules=[wq,tok_embeddings]"], "tok_embeddings"),
    ],
)
def test_impossible_quant_setups_are_one_clear_error(tmp_path, overrides, message):
    with pytest.raises(MftError, match=message):
        train(config(*overrides, *SHORT), tmp_path / "run")
