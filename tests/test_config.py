from __future__ import annotations

import pytest

from qcore.config import ConfigError, QuantConfig, make_config


def test_hashable_and_order_insensitive():
    a = QuantConfig(float_layers=("fc2", "conv1"))
    b = QuantConfig(float_layers=("conv1", "fc2"))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1


def test_json_round_trip():
    config = QuantConfig(weight_bits=3, act_bits=5, observer="percentile", float_layers=("fc2",), quantize_input=False)
    assert QuantConfig.from_json(config.to_json()) == config


def test_query_round_trip_only_lists_changes():
    config = QuantConfig(weight_bits=4, float_layers=("conv1", "fc2"), quantize_input=False)
    query = config.to_query()
    assert query == {"weight_bits": "4", "float_layers": "conv1,fc2", "quantize_input": "0"}
    assert QuantConfig.from_query(query) == (config, [])


def test_bad_query_values_fall_back_with_warnings():
    config, warnings = QuantConfig.from_query(
        {"weight_bits": "1", "act_bits": "four", "observer": "bogus", "granularity": "per-tensor", "page": "x"}
    )
    assert config == QuantConfig(granularity="per-tensor")
    assert len(warnings) == 3
    assert any("weight_bits" in w and "between 2 and 16" in w for w in warnings)


def test_strict_constructor_lists_every_problem():
    with pytest.raises(ConfigError) as error:
        make_config(weight_bits=17, calib_batches=0, float_layers="fc9")
    assert len(error.value.problems) == 3


def test_calibration_cannot_exceed_training_split():
    assert make_config(calib_batches=938, batch_size=64).calib_batches == 938  # 60000 / 64 rounded up
    with pytest.raises(ConfigError, match="<= 938"):
        make_config(calib_batches=939, batch_size=64)


def test_unknown_json_key_is_refused():
    with pytest.raises(ConfigError, match="unknown setting"):
        QuantConfig.from_dict({"weight_bits": 8, "wieght_bits": 4})
