"""The canonical encoding behind key commitments: the same bytes for the same values, whatever
numpy version or scalar type holds them."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ncbench.canonical import canonical_json

SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.binary(max_size=16),
    st.none(),
)
TREES = st.recursive(
    SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(), inner, max_size=4))
)


def test_numpy_scalars_encode_as_the_python_values_they_hold():
    assert canonical_json(np.float64(1.0)) == canonical_json(1.0) == b'{"float":"0x1.0000000000000p+0"}'
    assert canonical_json(np.int64(1)) == canonical_json(1) == b'{"int":"1"}'
    assert canonical_json(np.float32(0.5)) == canonical_json(0.5)
    assert canonical_json(np.bool_(True)) == canonical_json(True) == b"true"
    assert canonical_json(np.str_("nc7")) == canonical_json("nc7") == b'"nc7"'


def test_types_are_explicit_so_equal_text_of_other_types_differs():
    assert len({canonical_json(v) for v in (1, 1.0, "1", True, b"\x01", [1])}) == 6


def test_nan_and_infinities_have_one_spelling_each():
    assert canonical_json(float("nan")) == canonical_json(np.float64("nan")) == b'{"float":"nan"}'
    assert canonical_json(-math.inf) == b'{"float":"-inf"}'
    assert canonical_json(math.inf) == b'{"float":"inf"}'


def test_unicode_is_utf8_and_mapping_order_does_not_matter():
    assert canonical_json({"b": "é", "a": "漢"}) == canonical_json({"a": "漢", "b": "é"})
    assert canonical_json({"a": "漢"}) == '{"a":"漢"}'.encode()


def test_arrays_carry_dtype_and_shape():
    assert canonical_json(np.arange(4, dtype="<i2").reshape(2, 2)) == (
        b'{"array":"<i2","items":[{"int":"0"},{"int":"1"},{"int":"2"},{"int":"3"}],"shape":[2,2]}'
    )
    assert canonical_json(np.zeros(2, "<f4")) != canonical_json(np.zeros(2, "<f8"))


def test_values_without_a_canonical_form_are_refused():
    with pytest.raises(TypeError):
        canonical_json(object())
    with pytest.raises(TypeError):
        canonical_json({1: "a"})


@given(TREES)
def test_encoding_is_deterministic_and_exact_for_any_tree(value):
    first = canonical_json(value)
    assert first == canonical_json(value)
    first.decode("utf-8")  # always valid UTF-8


@given(st.floats(allow_nan=False))
def test_floats_round_trip_exactly(number):
    text = canonical_json(number).decode()
    assert float.fromhex(text.split('"')[3]) == number


def test_key_digest_hashes_attributes_canonically(tmp_path):
    """A fixed test vector: a key-like file whose digest must be the same on every machine."""
    import h5py

    from ncbench.challenge.files import DIGEST_CANONICAL, canonical_digest

    with h5py.File(tmp_path / "k.h5", "w") as h5:
        h5.attrs["digest"] = DIGEST_CANONICAL
        h5.attrs["schema_version"] = np.int64(1)
        h5.attrs["scale"] = np.float64(0.25)
        h5.attrs["challenge_id"] = "nc7-reid-0000"
        h5.create_dataset("encoder/pos", data=np.arange(6, dtype="<f4").reshape(2, 3))
        h5.create_dataset("commitment/salt", data=np.zeros(32, "u1"))
    with h5py.File(tmp_path / "k.h5", "r") as h5:
        assert canonical_digest(h5).hex() == EXPECTED_KEY_DIGEST


EXPECTED_KEY_DIGEST = "97b18c3c28358fb0cff86e604a6d6633f707d5d03ba82d2dddc3abfb7586c5a4"
