"""Hypothesis settings and strategies shared by the property tests (runtime, batch, Azure ML).

The examples are fixed by default (`derandomize`), so a failure reproduces;
HYPOTHESIS_EXPLORE=1 draws new ones, ten times as many.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck
from hypothesis import strategies as st

EXPLORE = bool(os.environ.get("HYPOTHESIS_EXPLORE"))
SCALE = 10 if EXPLORE else 1
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=not EXPLORE)

# Any JSON value, and values a generation parameter might be given (right, wrong and borderline).
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(st.characters(), max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
SMALL_INTS = st.integers(-3, 70)
PARAM_VALUES = st.one_of(JSON, SMALL_INTS, st.floats(-1, 2), st.sampled_from([0, 1, 63, 64, "a", [], "\ud800"]))
