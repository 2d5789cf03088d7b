"""GenerationParams: defaults, strict validation, from_dict / replace / to_dict."""

import dataclasses
import doctest
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2onnx.params
from gpt2onnx.errors import Gpt2OnnxError, InvalidRequestError
from gpt2onnx.params import GenerationParams


def test_defaults_are_the_documented_ones():
    p = GenerationParams()
    assert p.to_dict() == {
        "max_new_tokens": 50,
        "do_sample": False,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        "seed": None,
        "stop": [],
        "return_full_text": True,
        "ignore_eos": False,
        "truncation": False,
    }
    assert p.stop == ()
    assert p.greedy


def test_docstring_examples():
    assert doctest.testmod(gpt2onnx.params).failed == 0


INVALID = [
    ("max_new_tokens", 0),
    ("max_new_tokens", -1),
    ("max_new_tokens", 100_001),
    ("max_new_tokens", 5.0),
    ("max_new_tokens", "5"),
    ("max_new_tokens", True),
    ("max_new_tokens", None),
    ("do_sample", 1),
    ("do_sample", "true"),
    ("do_sample", None),
    ("temperature", -0.1),
    ("temperature", 100.5),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "1.0"),
    ("temperature", True),
    ("temperature", None),
    ("top_k", -1),
    ("top_k", 2.0),
    ("top_k", False),
    ("top_k", "50"),
    ("top_p", 0),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("top_p", True),
    ("top_p", "0.9"),
    ("repetition_penalty", 0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", 100.01),
    ("repetition_penalty", math.inf),
    ("repetition_penalty", -math.inf),
    ("repetition_penalty", math.nan),
    ("repetition_penalty", True),
    ("seed", -1),
    ("seed", 2**63),
    ("seed", 1.0),
    ("seed", True),
    ("seed", "42"),
    ("stop", ""),
    ("stop", [""]),
    ("stop", ["ok", ""]),
    ("stop", ["ok", 3]),
    ("stop", 3),
    ("stop", None),
    ("stop", {"a": 1}),
    ("stop", ["x"] * 17),
    ("return_full_text", 0),
    ("return_full_text", "false"),
    ("ignore_eos", 1),
    ("truncation", "yes"),
]


@pytest.mark.parametrize(("key", "value"), INVALID, ids=[f"{k}={v!r}"[:40] for k, v in INVALID])
def test_invalid_values_name_the_key_and_value(key, value):
    with pytest.raises(InvalidRequestError) as e:
        GenerationParams(**{key: value})
    msg = str(e.value)
    assert msg.startswith(f"{key} must be "), msg
    assert "\n" not in msg
    assert ", got " in msg
    # The same check runs through from_dict and replace.
    with pytest.raises(InvalidRequestError, match=key):
        GenerationParams.from_dict({key: value})
    with pytest.raises(InvalidRequestError, match=key):
        GenerationParams().replace(**{key: value})


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_k": True}, "top_k must be an integer >= 0 (0 disables), got True"),
        ({"temperature": "hot"}, "temperature must be a finite number, got 'hot'"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer in [1, 100_000], got 0"),
        ({"seed": -3}, "seed must be an integer with 0 <= seed < 2**63, or null, got -3"),
        ({"do_sample": 1}, "do_sample must be true or false, got 1"),
    ],
)
def test_exact_messages(kwargs, expected):
    with pytest.raises(InvalidRequestError) as e:
        GenerationParams(**kwargs)
    assert str(e.value) == expected


def test_long_bad_value_is_truncated_in_the_message():
    with pytest.raises(InvalidRequestError) as e:
        GenerationParams(temperature="x" * 1000)
    msg = str(e.value)
    assert msg.startswith("temperature must be a finite number, got 'xxx")
    assert msg.endswith("...")
    assert len(msg) < 100


def test_error_is_catchable_as_library_error_and_value_error():
    with pytest.raises(Gpt2OnnxError):
        GenerationParams(top_k=-1)
    with pytest.raises(ValueError):
        GenerationParams(top_k=-1)


def test_boundaries_are_accepted():
    p = GenerationParams(
        max_new_tokens=100_000,
        temperature=0,
        top_k=0,
        top_p=1,
        repetition_penalty=100,
        seed=2**63 - 1,
        stop=["x"] * 16,
    )
    assert (p.max_new_tokens, p.seed, len(p.stop)) == (100_000, 2**63 - 1, 16)
    assert GenerationParams(max_new_tokens=1, temperature=100, seed=0, top_p=1e-9).seed == 0


def test_ints_are_accepted_for_floats_and_stored_as_float():
    p = GenerationParams(temperature=2, top_p=1, repetition_penalty=3)
    for name in ("temperature", "top_p", "repetition_penalty"):
        assert type(getattr(p, name)) is float
    assert p.temperature == 2.0


def test_numpy_scalars_are_accepted_as_python_numbers():
    np = pytest.importorskip("numpy")
    p = GenerationParams(max_new_tokens=np.int64(7), temperature=np.float32(0.5), seed=np.uint32(9))
    assert type(p.max_new_tokens) is int and p.max_new_tokens == 7
    assert type(p.temperature) is float and p.temperature == 0.5
    assert type(p.seed) is int and p.seed == 9
    with pytest.raises(InvalidRequestError, match="do_sample"):
        GenerationParams(do_sample=np.bool_(True))


def test_stop_accepts_a_string_or_a_list():
    assert GenerationParams(stop="\n").stop == ("\n",)
    assert GenerationParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert GenerationParams(stop=("a",)).stop == ("a",)


def test_greedy_property():
    assert GenerationParams().greedy
    assert not GenerationParams(do_sample=True).greedy
    assert GenerationParams(do_sample=True, temperature=0).greedy
    assert GenerationParams(do_sample=False, temperature=0.7).greedy


def test_frozen():
    p = GenerationParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.top_k = 3  # type: ignore[misc]


def test_from_dict_unknown_key_names_it_and_lists_allowed_keys():
    with pytest.raises(InvalidRequestError) as e:
        GenerationParams.from_dict({"max_new_tokens": 5, "topk": 3})
    msg = str(e.value)
    assert "'topk'" in msg
    assert "did you mean 'top_k'?" in msg
    for name in ("max_new_tokens", "top_k", "top_p", "stop", "ignore_eos", "truncation"):
        assert name in msg
    with pytest.raises(InvalidRequestError, match="unknown generation parameter 'max_length'"):
        GenerationParams.from_dict({"max_length": 5})
    with pytest.raises(InvalidRequestError, match="unknown generation parameter 3"):
        GenerationParams.from_dict({3: 5})


@pytest.mark.parametrize("d", [[("top_k", 3)], "top_k=3", None, 5, GenerationParams()])
def test_from_dict_requires_a_mapping(d):
    with pytest.raises(InvalidRequestError, match="must be a JSON object"):
        GenerationParams.from_dict(d)


def test_from_dict_and_to_dict_round_trip():
    d = {"max_new_tokens": 7, "do_sample": True, "temperature": 0.5, "top_k": 0, "top_p": 0.9,
         "repetition_penalty": 1.2, "seed": 11, "stop": ["\n\n", "END"], "return_full_text": False,
         "ignore_eos": True, "truncation": True}
    p = GenerationParams.from_dict(d)
    assert p.stop == ("\n\n", "END")
    assert p.to_dict() == d
    assert GenerationParams.from_dict(p.to_dict()) == p
    assert GenerationParams.from_dict({}) == GenerationParams()


def test_replace_validates_and_rejects_unknown_keys():
    p = GenerationParams(seed=1)
    q = p.replace(do_sample=True, top_p=0.5)
    assert (q.do_sample, q.top_p, q.seed) == (True, 0.5, 1)
    assert p.do_sample is False  # the original is unchanged
    with pytest.raises(InvalidRequestError, match="unknown generation parameter 'temp'"):
        p.replace(temp=0.5)


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=5,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(gpt2onnx.params.FIELDS + ("bogus",)), ANY_JSON, max_size=4))
def test_from_dict_either_validates_or_raises_invalid_request(d):
    """Arbitrary JSON never escapes as a TypeError/OverflowError, and what passes is sane."""
    try:
        p = GenerationParams.from_dict(d)
    except InvalidRequestError as e:
        assert "\n" not in str(e)
        return
    assert 1 <= p.max_new_tokens <= 100_000
    assert 0 <= p.temperature <= 100 and 0 < p.top_p <= 1 and 0 < p.repetition_penalty <= 100
    assert p.top_k >= 0 and (p.seed is None or 0 <= p.seed < 2**63)
    assert all(isinstance(s, str) and s for s in p.stop) and len(p.stop) <= 16
    for name in ("do_sample", "return_full_text", "ignore_eos", "truncation"):
        assert type(getattr(p, name)) is bool


def test_fields_are_keyword_only():
    with pytest.raises(TypeError):
        GenerationParams(20)  # type: ignore[misc]
