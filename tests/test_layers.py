"""Layer-index facts: CAA layer L = decoder block L = hidden_states[L + 1] = direction.L."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caa_local.core.errors import LayerRangeError
from caa_local.core.layers import (
    check_steerable,
    cvec_buffer,
    format_layers,
    hidden_state_index,
    layer_from_tensor_name,
    parse_layer_spec,
    steerable_range,
    tensor_name,
)


@pytest.mark.parametrize("layer", [0, 1, 5, 13, 29])
def test_hidden_state_index_is_layer_plus_one(layer: int) -> None:
    # hidden_states[0] is the embedding output; block L's output is hidden_states[L + 1]
    assert hidden_state_index(layer) == layer + 1


def test_tensor_names_round_trip() -> None:
    for layer in (1, 9, 13, 1024):
        assert tensor_name(layer) == f"direction.{layer}"
        assert layer_from_tensor_name(tensor_name(layer)) == layer
    assert layer_from_tensor_name("direction.0") == 0  # parsed, so it can be refused clearly
    for bad in ("direction.", "direction.01", "direction.-1", "direction.1x", "direction.+1",
                "direction. 1", "Direction.1", "direction.١", "blk.1.attn_q.weight", ""):
        assert layer_from_tensor_name(bad) is None, bad


def test_check_steerable_accepts_1_to_n_layer_minus_1() -> None:
    n_layer = 30
    assert list(steerable_range(n_layer)) == list(range(1, 30))
    for layer in range(1, n_layer):
        assert check_steerable(layer, n_layer) == layer


def test_check_steerable_refuses_block_0() -> None:
    with pytest.raises(LayerRangeError, match="block 0") as err:
        check_steerable(0, 30)
    assert "valid: 1..29" in str(err.value)


@pytest.mark.parametrize("layer", [30, 31, -1, 1000])
def test_check_steerable_refuses_out_of_range(layer: int) -> None:
    with pytest.raises(LayerRangeError, match=rf"layer {layer} is out of range .*valid: 1\.\.29"):
        check_steerable(layer, 30)


def test_check_steerable_names_what() -> None:
    with pytest.raises(LayerRangeError, match="^--layer 31 is out of range"):
        check_steerable(31, 30, what="--layer")


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("13", [13]),
        ("10-15", [10, 11, 12, 13, 14, 15]),
        ("4,8,12-14", [4, 8, 12, 13, 14]),
        (" 8 , 4 ,4 ", [4, 8]),
        ("12 - 13", [12, 13]),
        ("5-5", [5]),
        ("ALL", list(range(1, 30))),
        ("all", list(range(1, 30))),
    ],
)
def test_parse_layer_spec(spec: str, want: list[int]) -> None:
    assert parse_layer_spec(spec, 30) == want


@pytest.mark.parametrize("spec", ["3-1", "x", "", " ", "1,,2", "1-", "-1", "1-2-3", "1.5", "13a",
                                  "1;2", "a-b", "0x10"])
def test_parse_layer_spec_refuses_bad_specs(spec: str) -> None:
    with pytest.raises(LayerRangeError, match="bad layer spec"):
        parse_layer_spec(spec, 30)


@pytest.mark.parametrize("spec", ["0", "30", "28-30", "0-3", "5,31"])
def test_parse_layer_spec_checks_range_with_n_layer(spec: str) -> None:
    with pytest.raises(LayerRangeError, match="out of range"):
        parse_layer_spec(spec, 30)


def test_parse_layer_spec_without_n_layer() -> None:
    assert parse_layer_spec("0,40") == [0, 40]  # no model to check against yet
    with pytest.raises(LayerRangeError, match="'all' needs"):
        parse_layer_spec("all")


def test_cvec_buffer_layout_starts_at_layer_1() -> None:
    n_embd, n_layer = 4, 6
    directions = {
        1: np.full(n_embd, 1.0, np.float32),
        3: np.arange(n_embd, dtype=np.float32),
        5: np.full(n_embd, -2.0, np.float32),
    }
    buf = cvec_buffer(directions, n_embd, n_layer)
    assert buf.shape == (n_layer - 1, n_embd)  # the full buffer: layers 1 .. n_layer - 1
    assert buf.dtype == np.float32 and buf.flags.c_contiguous
    np.testing.assert_array_equal(buf[0], directions[1])  # row 0 is layer 1
    np.testing.assert_array_equal(buf[2], directions[3])
    np.testing.assert_array_equal(buf[4], directions[5])
    for row in (1, 3):
        assert not buf[row].any()  # layers 2 and 4 stay zero


def test_cvec_buffer_is_full_even_for_one_layer() -> None:
    buf = cvec_buffer({2: np.ones(3, np.float32)}, 3, 30)
    assert buf.shape == (29, 3)
    assert buf.sum() == 3 and buf[1].tolist() == [1, 1, 1]


@pytest.mark.parametrize("layer", [0, 6, 7])
def test_cvec_buffer_refuses_unsteerable_layers(layer: int) -> None:
    with pytest.raises(LayerRangeError):
        cvec_buffer({layer: np.ones(4, np.float32)}, 4, 6)


def test_format_layers() -> None:
    assert format_layers([4, 5, 6, 9]) == "4-6,9"
    assert format_layers([9, 4, 6, 5, 5]) == "4-6,9"
    assert format_layers([13]) == "13"
    assert format_layers([]) == ""


@settings(max_examples=200, derandomize=True, deadline=None)
@given(layers=st.sets(st.integers(1, 80), min_size=1, max_size=40))
def test_format_layers_round_trips_with_parse_layer_spec(layers: set[int]) -> None:
    text = format_layers(layers)
    assert parse_layer_spec(text) == sorted(layers)
    assert parse_layer_spec(text, 81) == sorted(layers)
    assert format_layers(parse_layer_spec(text)) == text
