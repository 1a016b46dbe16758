"""What the solver and gradient-method objects share.

Their options are their config, as for Keras optimizers; `resolve` is the
Keras-style `get`; the argument checks give the house error messages.
"""

import math
import numbers

import keras


class Options:
    """An alternative chosen by `name`, configured by its `get_config`."""

    name = None

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(other) is type(self) and \
            other.get_config() == self.get_config()

    def __hash__(self):  # equal objects, equal hashes (a config of scalars)
        return hash((type(self), tuple(sorted(self.get_config().items()))))

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({options})"


def resolve(identifier, base, classes, argument):
    """The `base` instance named, configured or given by `identifier`."""
    if isinstance(identifier, dict):  # short class names too, as Keras'
        identifier = keras.saving.deserialize_keras_object(
            identifier, module_objects={cls.__name__: cls for cls in classes})
    if isinstance(identifier, base):
        return identifier
    by_name = {cls.name: cls for cls in classes}
    if isinstance(identifier, str) and identifier in by_name:
        return by_name[identifier]()
    names = ", ".join(f'"{name}"' for name in by_name)
    error = ValueError if isinstance(identifier, str) else TypeError
    raise error(
        f"Received an invalid value for argument `{argument}`, expected one "
        f"of {names} or a `{base.__module__}.{base.__name__}`. "
        f"Received: {argument}={identifier!r}")


def invalid(error, name, expected, value):
    return error(f"Received an invalid value for argument `{name}`, expected "
                 f"{expected}. Received: {name}={value!r}")


def finite_float(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise invalid(TypeError, name, "a finite float", value)
    if not math.isfinite(value):
        raise invalid(ValueError, name, "a finite float", value)
    return float(value)


def non_negative_float(name, value):
    value = finite_float(name, value)
    if value < 0:
        raise invalid(ValueError, name, "a non-negative float", value)
    return value


def positive_float(name, value):
    value = finite_float(name, value)
    if value <= 0:
        raise invalid(ValueError, name, "a positive float", value)
    return value


def positive_int(name, value, upper=None):
    expected = "a positive integer" + (
        f" of at most {upper}" if upper is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise invalid(TypeError, name, expected, value)
    if value < 1 or (upper is not None and value > upper):
        raise invalid(ValueError, name, expected, value)
    return int(value)
