"""A canonical byte encoding of attribute values, the same on every machine and numpy version.

Commitments hash what a file holds; ``repr()`` of a value is no encoding for that, since it
changes between numpy 1 and 2 (``1.0`` became ``np.float64(1.0)``). Values become JSON with
sorted keys and no whitespace (as RFC 8785 canonicalises), in which every number and byte string
says its type: ``{"int":"7"}``, ``{"float":"0x1.8p+1"}`` (IEEE 754 binary64 in C99 hex, exact,
``nan``/``inf``/``-inf`` included), ``{"bytes":"<hex>"}``, ``{"array":dtype,"shape":[...],
"items":[...]}``. Strings stay strings (UTF-8, no escaping beyond JSON's own), booleans stay
booleans, lists and tuples are lists, mappings are objects with string keys.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np


def canonical_value(value) -> object:
    """``value`` as a JSON-ready tree with explicit types (see the module docstring)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return {"int": str(int(value))}
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return {"float": "nan" if math.isnan(number) else number.hex()}
    if isinstance(value, str):
        return value
    if isinstance(value, np.str_):
        return str(value)
    if isinstance(value, (bytes, np.bytes_)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, np.ndarray):
        return {
            "array": value.dtype.str,
            "shape": [int(n) for n in value.shape],
            "items": [canonical_value(item) for item in value.reshape(-1).tolist()],
        }
    if isinstance(value, (list, tuple)):
        return [canonical_value(item) for item in value]
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("canonical mappings take string keys only")
        return {key: canonical_value(item) for key, item in value.items()}
    if value is None:
        return None
    raise TypeError(f"no canonical encoding for {type(value).__name__}")


def canonical_json(value) -> bytes:
    """The canonical UTF-8 bytes of ``value``: equal values give equal bytes, on any machine."""
    return json.dumps(
        canonical_value(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()
