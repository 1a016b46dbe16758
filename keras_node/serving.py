"""Exporting Keras models as SavedModels in TF Serving's layout."""

import os
import pathlib
import re
import shutil

import keras
import tensorflow as tf

PREDICT_METHOD = "tensorflow/serving/predict"
# A version folder's name: ASCII digits (`str.isdigit` also takes "²").
_VERSION = re.compile(r"[0-9]{1,18}")


def version_folders(base_path):
    """`{version: path}` of the numeric sub-folders of `base_path`."""
    base_path = pathlib.Path(base_path)
    if not base_path.is_dir():
        return {}
    return {int(p.name): p for p in base_path.iterdir()
            if p.is_dir() and _VERSION.fullmatch(p.name)}


def export_saved_model(model, base_path, version=None, *, classifier=False,
                       signatures=None):
    """Writes `model` as `<base_path>/<version>/`, a SavedModel for serving.

    Works for any Keras model (with `NeuralODE` layers or not) on Keras'
    TensorFlow backend. Its `serving_default` signature takes the model's
    inputs, named as the model names them (`keras.Input(..., name=...)`),
    with their dtypes and shapes (the batch axis of any size), and returns:

    - by default, the model's outputs: `outputs` for a single one, else the
      model's output names;
    - with `classifier=True` (a model with one output, the logits):
      `logits` (float32, `(batch, classes)`), `probabilities` (their
      softmax) and `classes` (int64, `(batch,)`).

    The gradients are saved with the functions (TensorFlow's default), so
    loading the SavedModel prints no warning about unsaved custom gradients.

    Args:
        model: a Keras model, or the path of a `.keras` file.
        base_path: the model's base folder (TF Serving's `model_base_path`).
        version: a positive integer. Defaults to one more than the newest
            version already in `base_path` (1 in an empty folder).
        classifier: whether the single output is logits, served with
            probabilities and classes as above.
        signatures: more signatures with the same outputs, for other forms
            of the input: `{name: (specs, to_inputs)}`, `specs` a
            `tf.TensorSpec` (or a list of them, one per argument) whose
            names are the signature's input names, and `to_inputs` a function
            of those tensors returning the model's input(s). For example the
            MNIST example adds `predict_pixels`, taking uint8 pixels.

    Returns:
        The `pathlib.Path` of the written version folder.
    """
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "export_saved_model needs Keras' TensorFlow backend (a "
            "SavedModel holds TensorFlow functions); this is the "
            f"{keras.backend.backend()!r} backend. Save the model as .keras "
            "and export it with KERAS_BACKEND=tensorflow (`keras-node "
            "export model.keras BASE_PATH`).")
    if isinstance(model, (str, pathlib.Path)):
        model = keras.models.load_model(model)
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Received an invalid value for argument `model`, expected a "
            f"Keras model or the path of a .keras file. Received: {model!r}")
    base_path = pathlib.Path(base_path)
    if base_path.exists() and not base_path.is_dir():
        raise ValueError(
            "Received an invalid value for argument `base_path`, expected a "
            "folder (or where to make one), not a file. Received: "
            f"base_path={str(base_path)!r}")
    existing = version_folders(base_path)
    if version is None:
        version = max(existing, default=0) + 1
    if isinstance(version, bool) or not isinstance(version, int) \
            or version < 1:
        raise ValueError(
            "Received an invalid value for argument `version`, expected a "
            f"positive integer. Received: version={version!r}")
    if version in existing:
        raise FileExistsError(
            f"Version {version} already exists in {base_path}; TF Serving "
            "versions are immutable. Pass another `version` or leave it "
            "unset for the next one.")
    if not getattr(model, "inputs", None):
        raise ValueError(
            "Received an invalid value for argument `model`, expected a "
            "model with declared inputs (functional or Sequential with an "
            "`Input`), whose names and shapes make the signature. Received: "
            f"{type(model).__name__} {model.name!r} without `inputs` (a "
            "subclassed model): wrap it, `keras.Model(inputs, "
            "subclassed(inputs))`.")
    if classifier and len(model.outputs) != 1:
        raise ValueError(
            "Received an invalid value for argument `classifier`: a "
            "classifier model has one output (the logits), but this model "
            f"has {len(model.outputs)}. Received: classifier=True")
    if classifier and (len(model.outputs[0].shape) != 2
                       or (model.outputs[0].shape[-1] or 2) < 2):
        raise ValueError(
            "Received an invalid value for argument `classifier`: a "
            "classifier's logits are (batch, classes) with two or more "
            "classes (their softmax gives the probabilities), but this "
            f"model's output has shape {tuple(model.outputs[0].shape)}. A "
            "binary classifier with one logit is served as is: leave "
            "classifier=False. Received: classifier=True")
    extra = dict(signatures or {})
    if "serving_default" in extra:
        raise ValueError(
            "Received an invalid value for argument `signatures`: "
            "'serving_default' is the model's own signature; name yours "
            "otherwise.")

    def outputs(inputs):
        result = model(inputs, training=False)
        if classifier:
            logits = tf.cast(result, tf.float32)
            return {"logits": logits,
                    "probabilities": tf.nn.softmax(logits),
                    "classes": tf.argmax(logits, axis=-1)}
        if isinstance(result, dict):
            return result
        if len(model.outputs) == 1:
            return {"outputs": result}
        return dict(zip(model.output_names, result))

    input_specs = [tf.TensorSpec((None, *x.shape[1:]), x.dtype, name=x.name)
                   for x in model.inputs]
    # The signature's arguments (in the order of `model.inputs`) as the
    # model takes them: a tensor, or a list or dict of them.
    unpack = (lambda xs: xs[0]) if len(input_specs) == 1 else (
        lambda xs: keras.tree.pack_sequence_as(model.input, list(xs)))

    module = tf.Module()
    module.model = model  # tracks the variables
    # ... but not the states of the seed generators (plain Python objects)
    # that a NeuralODE reads even when it draws nothing.
    module.variables_of_model = list(model.variables)
    functions = {"serving_default": tf.function(
        lambda *xs: outputs(unpack(xs)), input_signature=input_specs)}
    for name, (specs, to_inputs) in extra.items():
        specs = list(specs) if isinstance(specs, (list, tuple)) else [specs]
        functions[name] = tf.function(
            lambda *xs, f=to_inputs: outputs(f(*xs)), input_signature=specs)

    # Written under a name no server reads, then renamed into place: a kill
    # while writing leaves no half version, and a server never sees one.
    path = pathlib.Path(base_path) / str(version)
    staging = path.with_name(f".{version}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    tf.saved_model.save(module, str(staging), signatures=functions)
    os.rename(staging, path)
    return path
