"""Exporting image classifiers as SavedModels in TF Serving's layout."""

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


def export_classifier(model, base_path, version=None):
    """Writes `model` as `<base_path>/<version>/`, a SavedModel for serving.

    Two signatures, both returning `logits` (float32, `(batch, classes)`),
    `probabilities` (their softmax) and `classes` (int64, `(batch,)`):

    - `serving_default`: input `images`, float32 in [0, 1], the model's input
      shape (for the MNIST model `(batch, 28, 28, 1)`);
    - `predict_pixels`: input `pixels`, uint8 in [0, 255], the same shape
      without a trailing channel axis of size 1 (`(batch, 28, 28)`), so that
      clients can send the bytes as stored.

    The adjoint gradient is saved with the functions (TensorFlow's default),
    so loading the SavedModel prints no warning about unsaved custom
    gradients.

    Args:
        model: a Keras model, or the path of a `.keras` file, whose one input
            is an image batch and whose output is logits.
        base_path: the model's base folder (TF Serving's `model_base_path`).
        version: a positive integer. Defaults to one more than the newest
            version already in `base_path` (1 in an empty folder).

    Returns:
        The `pathlib.Path` of the written version folder.
    """
    if isinstance(model, (str, pathlib.Path)):
        model = keras.models.load_model(model)
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Received an invalid value for argument `model`, expected a "
            f"Keras model or the path of a .keras file. Received: {model!r}")
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

    image_shape = tuple(model.input_shape[1:])
    pixel_shape = image_shape[:-1] if image_shape[-1] == 1 else image_shape

    def outputs(images):
        logits = tf.cast(model(images, training=False), tf.float32)
        return {"logits": logits,
                "probabilities": tf.nn.softmax(logits),
                "classes": tf.argmax(logits, axis=-1)}

    module = tf.Module()
    module.model = model  # tracks the variables

    @tf.function(input_signature=[
        tf.TensorSpec((None, *image_shape), tf.float32, name="images")])
    def serving_default(images):
        return outputs(images)

    @tf.function(input_signature=[
        tf.TensorSpec((None, *pixel_shape), tf.uint8, name="pixels")])
    def predict_pixels(pixels):
        images = tf.reshape(tf.cast(pixels, tf.float32) / 255.0,
                            (-1, *image_shape))
        return outputs(images)

    # Written under a name no server reads, then renamed into place: a kill
    # while writing leaves no half version, and a server never sees one.
    path = pathlib.Path(base_path) / str(version)
    staging = path.with_name(f".{version}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    tf.saved_model.save(
        module, str(staging),
        signatures={"serving_default": serving_default,
                    "predict_pixels": predict_pixels},
    )
    os.rename(staging, path)
    return path
