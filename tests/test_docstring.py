"""The class docstring's example runs and prints what it says."""

import doctest

from keras_node import neural_ode


def test_docstring_example_runs():
    result = doctest.testmod(neural_ode, raise_on_error=False, verbose=False)
    assert result.attempted >= 5 and result.failed == 0
