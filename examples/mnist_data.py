"""The MNIST example's TensorFlow side: the data (tfds, offline from the
canonical files; tf.data, on either Keras backend) and the SavedModel."""

import hashlib
import pathlib

import keras
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from examples.mnist_common import stratified_split
from examples.mnist_options import MANUAL_DIR_ENV

HELD_OUT_FRACTION = 0.1


def check_manual_dir(manual_dir):
    """Fails clearly unless `manual_dir` holds the four files tfds expects."""
    checksums = pathlib.Path(tfds.__file__).parent / "url_checksums/mnist.txt"
    manual_dir = pathlib.Path(manual_dir)
    for line in checksums.read_text().split("\n"):
        if not line.strip():
            continue
        url, size, sha256, name = line.split("\t")
        path = manual_dir / name
        if not path.is_file():
            raise FileNotFoundError(
                f"The MNIST file {name} is missing from the manual download "
                f"folder {manual_dir}. Put the four canonical MNIST files "
                f"there (from {url.rsplit('/', 1)[0]}/), or leave "
                f"--manual-dir and ${MANUAL_DIR_ENV} unset to download them."
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            raise ValueError(
                f"The MNIST file {path} is corrupt: its SHA-256 is {digest}, "
                f"expected {sha256} ({size} bytes). Replace it with the "
                f"canonical file from {url}."
            )


def load_mnist(manual_dir=None, data_dir=None, limit=None, seed=0,
               hold_out=True):
    """MNIST as numpy arrays: `{"train", "held_out", "test"}: (x, y)`.

    `x` is float32 in [0, 1] of shape (n, 28, 28, 1), `y` int labels. The
    60,000 training images are split 90/10, stratified by label; with
    `hold_out=False` they are all "train", and there is no "held_out".
    """
    kwargs = {}
    if manual_dir is not None:
        check_manual_dir(manual_dir)
        kwargs["download_and_prepare_kwargs"] = {
            "download_config": tfds.download.DownloadConfig(
                manual_dir=str(manual_dir))
        }
    train, test = tfds.as_numpy(tfds.load(
        "mnist", split=["train", "test"], batch_size=-1, as_supervised=True,
        data_dir=None if data_dir is None else str(data_dir), **kwargs,
    ))
    scale = lambda xy: ((xy[0][:limit] / np.float32(255)).astype("float32"),
                        xy[1][:limit].astype("int64"))
    (x, y), test = scale(train), scale(test)
    if not hold_out:
        return {"train": (x, y), "test": test}
    kept, held_out = stratified_split(y, HELD_OUT_FRACTION, seed)
    return {"train": (x[kept], y[kept]),
            "held_out": (x[held_out], y[held_out]),
            "test": test}


def make_datasets(arrays, batch_size, seed, shift=0, rotate=0.0,
                  skip_batches=0):
    """tf.data pipelines: an endless training stream and the eval sets.

    The training stream is reshuffled every epoch, reproducibly from `seed`,
    its images shifted at random by up to `shift` pixels and rotated by up
    to `rotate` degrees, and it starts `skip_batches` batches in (where a
    resumed run left off).
    """
    x, y = arrays["train"]
    train = (tf.data.Dataset.from_tensor_slices((x, y))
             .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
             .batch(batch_size)
             .repeat())
    augmentations = []
    if shift:
        augmentations.append(keras.layers.RandomTranslation(
            shift / 28, shift / 28, fill_mode="constant", seed=seed))
    if rotate:
        augmentations.append(keras.layers.RandomRotation(
            rotate / 360, fill_mode="constant", seed=seed))
    if augmentations:
        # Each layer on its own: a preprocessing layer runs in tf.data on
        # any Keras backend, a `keras.Sequential` of them only on TF's.
        def augment(x):
            for layer in augmentations:
                x = layer(x, training=True)
            return x

        # One batch at a time: the layers draw from one random state, so
        # parallel calls would draw in a different order each run.
        train = train.map(lambda x, y: (augment(x), y))
    train = train.skip(skip_batches).prefetch(tf.data.AUTOTUNE)
    evaluate = lambda split: (tf.data.Dataset
                              .from_tensor_slices(arrays[split])
                              .batch(batch_size)
                              .prefetch(tf.data.AUTOTUNE))
    data = {split: evaluate(split) for split in arrays}
    data["train_eval"], data["train"] = data["train"], train
    return data


def export_for_serving(model, base_path, version=1):
    """The SavedModel of the trained classifier, with a `predict_pixels`
    signature besides `serving_default` (`images`, float32 in [0, 1]):
    input `pixels`, uint8 in [0, 255] of shape `(batch, 28, 28)`, so that
    clients send the bytes as stored."""
    from keras_node.serving import export_saved_model

    pixels = tf.TensorSpec((None, 28, 28), tf.uint8, name="pixels")
    to_images = lambda p: tf.cast(p, tf.float32)[..., None] / 255.0
    return export_saved_model(
        model, base_path, version, classifier=True,
        signatures={"predict_pixels": (pixels, to_images)})
