import json

import pytest

from nanogpt.config import ModelConfig, TrainConfig, load_config, override, preset
from nanogpt.errors import UserError
from tests.card import CARD_TRAINING_CONFIGURATION


def test_card_block_loads_as_is(tmp_path):
    p = tmp_path / "card.json"
    p.write_text(json.dumps(CARD_TRAINING_CONFIGURATION))
    model, train = load_config(p)
    assert model == preset("card")
    assert (train.batch_size, train.learning_rate, train.weight_decay, train.max_iters) == (
        12,
        3e-4,
        0.1,
        20000,
    )


def test_unknown_key_names_key_and_known_ones(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"d_model": 64, "n_heads": 4, "n_layer": 2}))
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert "'n_layer'" in msg and "n_layers" in msg and "\n" not in msg


def test_json_round_trip(tmp_path):
    cfg = ModelConfig(d_model=64, n_heads=4, norm_position="post", activation="gelu_tanh")
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"d_model": 30, "n_heads": 4}, "divisible"),
        ({"norm_position": "middle"}, "norm_position"),
        ({"activation": "relu"}, "activation"),
        ({"dropout": 1.5}, "dropout"),
    ],
)
def test_invalid_values(kwargs, word):
    with pytest.raises(UserError, match=word):
        ModelConfig(**kwargs)


def test_presets_and_override():
    assert preset("card").d_model == 384
    with pytest.raises(UserError, match="known presets"):
        preset("huge")
    assert override(TrainConfig(), learning_rate=1e-3, batch_size=None).learning_rate == 1e-3
    with pytest.raises(UserError, match="unknown key"):
        override(TrainConfig(), lerning_rate=1.0)


def test_missing_and_invalid_json(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{oops")
    with pytest.raises(UserError, match="not valid JSON"):
        load_config(tmp_path / "x.json")
