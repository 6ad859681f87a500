"""Options: validation and error messages."""

import pytest

from ringcompile import OptionError, Options, RingCompileError


def test_defaults_are_valid():
    opts = Options.from_mapping(None)
    assert opts.inner == "inductor" and opts.strategy == "auto" and opts.timeout == 300.0


def test_unknown_option_lists_valid_names():
    with pytest.raises(OptionError) as info:
        Options.from_mapping({"stratgy": "ring"})
    msg = str(info.value)
    assert "stratgy" in msg and "strategy" in msg and "inner" in msg
    assert isinstance(info.value, RingCompileError)


@pytest.mark.parametrize("name,value", [
    ("inner", "aot_eager_nope"), ("strategy", "spiral"), ("layout", "striped"), ("kernel", "cuda"),
    ("outputs", "some"), ("timeout", -1), ("block_size", 0),
])
def test_bad_values_name_the_option(name, value):
    with pytest.raises(OptionError, match=name):
        Options.from_mapping({name: value})
