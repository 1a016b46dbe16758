"""The docstrings' examples run and print what they say."""

import doctest

import pytest

from keras_node import neural_ode, normalizing_flow


@pytest.mark.parametrize("module", [neural_ode, normalizing_flow])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert result.attempted >= 4 and result.failed == 0
