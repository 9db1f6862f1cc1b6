from __future__ import annotations

import json
import re

import pytest

from qcore.quantize.config import DASHBOARD, ConfigError, QuantConfig, integer_path_problems, make_config


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


def test_seed_outside_the_sidebar_range_is_corrected_with_a_warning():
    for text in ("-1", str(2**31)):
        config, warnings = QuantConfig.from_query({"seed": text})
        assert config.seed == 0
        assert len(warnings) == 1 and f"seed='{text}'" in warnings[0] and "between 0 and 2147483647" in warnings[0]


def test_url_is_bounded_by_what_the_dashboard_offers():
    query = {"batch_size": "16", "calib_batches": "3750", "weight_bits": "9", "act_bits": "6"}
    config, warnings = QuantConfig.from_query(query, DASHBOARD)
    # 3750 batches of 16 is the whole training split, allowed by the CLI but not offered by the sidebar
    assert QuantConfig.from_query(query)[0].calib_batches == 3750
    assert (config.batch_size, config.calib_batches, config.weight_bits, config.act_bits) == (16, 16, 8, 6)
    assert any("calib_batches='3750'" in w and f"{DASHBOARD.max_calib_images} images" in w for w in warnings)
    assert any("weight_bits='9'" in w for w in warnings)


def test_long_and_hostile_url_values_are_shortened_in_warnings():
    link = "[Click here to re-login](http://evil.example/phish) ![t](http://127.0.0.1:9/pixel.png)"
    config, warnings = QuantConfig.from_query({"observer": link, "act_bits": "4" * 100_000})
    assert config == QuantConfig()
    assert all(len(w) < 400 for w in warnings)
    assert any("act_bits" in w and "100000 characters" in w for w in warnings)
    assert not any("pixel.png" in w for w in warnings)  # cut at 60 characters, before the image


def test_edge_bits_round_trip_and_are_bounded():
    config = QuantConfig(weight_bits=2, act_bits=2, edge_bits=8)
    assert config.to_query() == {"weight_bits": "2", "act_bits": "2", "edge_bits": "8"}
    assert QuantConfig.from_query(config.to_query(), DASHBOARD) == (config, [])
    assert QuantConfig.from_json(config.to_json()) == config
    for text in ("1", "9", "17", "8.0"):  # 9 is a valid bit-width the sidebar does not offer
        corrected, warnings = QuantConfig.from_query({"edge_bits": text}, DASHBOARD)
        assert corrected.edge_bits == 0 and len(warnings) == 1 and f"edge_bits='{text}'" in warnings[0]
    with pytest.raises(ConfigError, match="set one of them"):
        make_config(edge_bits=8, weight_bits_budget=4)
    assert integer_path_problems(QuantConfig(weight_bits=4, act_bits=4, edge_bits=16)) == [
        "at most 8 bits fit int32 accumulators (got first and last layers at 16)"
    ]


def test_integer_path_problems_are_known_before_calibration():
    assert integer_path_problems(QuantConfig()) == []
    problems = integer_path_problems(QuantConfig(weight_bits=16, float_layers=("fc2",), quantize_input=False))
    assert len(problems) == 3 and "fc2" in problems[0]


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("weight_bits", 2.0, "weight_bits must be a whole number (got 2.0, a float)"),
        ("batch_size", 64.0, "batch_size must be a whole number"),
        ("calib_batches", 16.0, "calib_batches must be a whole number"),
        ("act_bits", True, "act_bits must be a whole number (got True, a bool)"),
        ("seed", "3", "seed must be a whole number"),
        ("quantize_input", 1, "quantize_input must be bool"),
        ("observer", 5, "observer must be str"),
        ("weight_bits_budget", True, "weight_bits_budget must be a whole number or float"),
        ("float_layers", [1], "expected a list of names"),
    ],
)
def test_a_setting_of_the_wrong_type_is_refused_though_it_compares_equal(key, value, needle):
    """2.0 == 2 and True == 1 in Python: issue 16's config with 2.0, 64.0 and 16.0 passed every check."""
    with pytest.raises(ConfigError, match=re.escape(needle)):
        QuantConfig.from_json(json.dumps({**QuantConfig().to_dict(), key: value}))
    with pytest.raises(ConfigError, match=re.escape(needle)):
        make_config(**{key: value})


def test_whole_numbers_stay_accepted_where_a_float_is_meant():
    assert make_config(weight_bits_budget=4).weight_bits_budget == 4
    assert make_config(weight_bits_budget=4.5).weight_bits_budget == 4.5


@pytest.mark.parametrize("text", ["٢", "+4", " 4", "4_0", "４", "²", "0x4", "4.0"])
def test_url_whole_numbers_are_ascii_digits_only(text):
    config, warnings = QuantConfig.from_query({"weight_bits": text})
    assert config.weight_bits == QuantConfig().weight_bits and len(warnings) == 1
    assert "expected a whole number in digits 0-9" in warnings[0]


@pytest.mark.parametrize("text", ["nan", "inf", "1e1", "٤", "-4"])
def test_url_budget_is_a_plain_decimal(text):
    config, warnings = QuantConfig.from_query({"weight_bits_budget": text})
    assert config.weight_bits_budget == 0 and len(warnings) == 1


def test_a_url_whole_number_of_many_digits_is_refused_by_range_not_by_a_crash():
    config, warnings = QuantConfig.from_query({"seed": "9" * 20})
    assert config.seed == 0 and "seed must be between 0 and" in warnings[0]
