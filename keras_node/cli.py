"""The `keras-node` command: export a trained model, serve SavedModels."""

import argparse
import importlib
import logging
import math
import os
import pathlib
import sys


def _port(text):
    try:
        port = int(text)
    except ValueError:
        port = None
    if port is None or not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected a port number from 0 to 65535, received {text!r}")
    return port


def _serve_option(name):
    """An argparse type: `create_app`'s option `name`, by its rule."""
    def parse(text):
        from keras_node.server import COUNTS, option_problem

        try:
            value = (int if name in COUNTS else float)(text)
        except ValueError:
            value = None
        expected = option_problem(name, value)
        if expected:
            raise argparse.ArgumentTypeError(
                f"expected {expected}, received {text!r}")
        return value

    return parse


def _model_name(text):
    from keras_node.server import MODEL_NAME, is_model_name

    if not is_model_name(text):
        raise argparse.ArgumentTypeError(
            f"expected {MODEL_NAME}, received {text!r}")
    return text


def _load(export, args):
    """The model of `keras-node export`, or an error in the command's
    terms."""
    import keras

    if not (args.model.is_file() and args.model.suffix == ".keras"):
        export.error(f"argument model: expected a .keras file, received "
                     f"{str(args.model)!r}")
    if keras.backend.backend() != "tensorflow":
        export.error(
            "export writes a TensorFlow SavedModel and needs Keras' "
            f"TensorFlow backend, not {keras.backend.backend()}: run it with "
            "KERAS_BACKEND=tensorflow (pip install 'keras-node[tensorflow]')")
    if args.imports:
        sys.path.insert(0, os.getcwd())  # as `python -m` finds modules
    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as error:
            export.error(f"argument --import: cannot import {module!r} "
                         f"({type(error).__name__}: {error})")
    try:
        return keras.models.load_model(args.model)
    except Exception as error:  # Keras raises many kinds
        hint = (" If it holds custom layers, name the module that defines "
                "and registers them with --import MODULE."
                if "Could not locate" in str(error) else "")
        export.error(f"argument model: {str(args.model)!r} does not load "
                     f"({type(error).__name__}: {error}).{hint}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="keras-node",
        description="Export trained keras-node models and serve them with "
        "TF Serving's REST API.")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser(
        "export", help="write a .keras model as a versioned SavedModel")
    export.add_argument("model", type=pathlib.Path, help="the .keras file")
    export.add_argument("base_path", type=pathlib.Path,
                        help="the model's base folder; writes <base>/<N>/")
    export.add_argument("--version", type=int, default=None,
                        help="N (default: one more than the newest)")
    export.add_argument("--classifier", action="store_true",
                        help="the model's one output is logits: serve "
                        "logits, probabilities and classes")
    export.add_argument("--import", dest="imports", action="append",
                        default=[], metavar="MODULE",
                        help="import MODULE first: one that defines and "
                        "registers the model's custom layers (repeatable; "
                        "found as `python -m` finds modules)")

    serve = commands.add_parser(
        "serve", help="serve <base>/<N>/ SavedModels over TF Serving's REST "
        "API")
    serve.add_argument("--model-base-path", type=pathlib.Path, required=True)
    serve.add_argument("--model-name", type=_model_name, required=True)
    serve.add_argument("--port", type=_port, default=8501)
    serve.add_argument("--host", default="127.0.0.1")
    # Checked by `create_app`'s own rules, named by the flag.
    serve.add_argument("--max-instances", default=256,
                       type=_serve_option("max_instances"),
                       help="most instances in one request (default: "
                       "%(default)s)")
    serve.add_argument("--poll-seconds", default=2.0,
                       type=_serve_option("poll_seconds"),
                       help="how often to look for new versions (default: "
                       "%(default)s)")
    serve.add_argument("--max-body-bytes", default=16 * 2**20,
                       type=_serve_option("max_body_bytes"),
                       help="largest request body; larger ones get 413 "
                       "before they are read (default: %(default)s)")
    serve.add_argument("--max-concurrent-runs", default=2,
                       type=_serve_option("max_concurrent_runs"),
                       help="most model runs at once (default: %(default)s)")
    serve.add_argument("--queue-timeout", default=10.0,
                       type=_serve_option("queue_timeout"),
                       help="seconds a request may wait for a model run "
                       "before it gets 503 with Retry-After (default: "
                       "%(default)s)")
    serve.add_argument("--request-timeout", default=30.0,
                       type=_serve_option("request_timeout"),
                       help="seconds a client may take to send a request; "
                       "slower ones get 408, idle connections are closed "
                       "(default: %(default)s)")
    args = parser.parse_args(argv)

    if args.command == "export":
        model = _load(export, args)
        from keras_node.serving import export_saved_model

        try:
            path = export_saved_model(model, args.base_path, args.version,
                                      classifier=args.classifier)
        except (ValueError, FileExistsError) as error:
            export.error(str(error))
        print(f"Wrote {path}")
        return

    import uvicorn

    from keras_node.server import create_app

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(message)s")
    try:
        app = create_app(
            args.model_base_path, args.model_name,
            poll_seconds=args.poll_seconds, max_instances=args.max_instances,
            max_body_bytes=args.max_body_bytes,
            max_concurrent_runs=args.max_concurrent_runs,
            queue_timeout=args.queue_timeout,
            request_timeout=args.request_timeout)
    except (ValueError, FileNotFoundError) as error:
        serve.error(str(error))
    from keras_node.server import idle_timeout_protocol

    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                http=idle_timeout_protocol(),
                timeout_keep_alive=max(1, math.ceil(args.request_timeout)))


if __name__ == "__main__":
    main()
