"""The `keras-node` command: export a trained model, serve SavedModels."""

import argparse
import logging
import math
import pathlib


def _port(text):
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected a port number from 0 to 65535, received {port}")
    return port


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

    serve = commands.add_parser(
        "serve", help="serve <base>/<N>/ SavedModels over TF Serving's REST "
        "API")
    serve.add_argument("--model-base-path", type=pathlib.Path, required=True)
    serve.add_argument("--model-name", required=True)
    serve.add_argument("--port", type=_port, default=8501)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--max-instances", type=int, default=256,
                       help="most instances in one request (default: "
                       "%(default)s)")
    serve.add_argument("--poll-seconds", type=float, default=2.0,
                       help="how often to look for new versions (default: "
                       "%(default)s)")
    serve.add_argument("--max-body-bytes", type=int, default=16 * 2**20,
                       help="largest request body; larger ones get 413 "
                       "before they are read (default: %(default)s)")
    serve.add_argument("--max-concurrent-runs", type=int, default=2,
                       help="most model runs at once (default: %(default)s)")
    serve.add_argument("--queue-timeout", type=float, default=10.0,
                       help="seconds a request may wait for a model run "
                       "before it gets 503 with Retry-After (default: "
                       "%(default)s)")
    serve.add_argument("--request-timeout", type=float, default=30.0,
                       help="seconds a client may take to send a request; "
                       "slower ones get 408, idle connections are closed "
                       "(default: %(default)s)")
    args = parser.parse_args(argv)

    if args.command == "export":
        from keras_node.serving import export_saved_model

        if not (args.model.is_file() and args.model.suffix == ".keras"):
            parser.error(f"argument model: expected a .keras file, received "
                         f"{str(args.model)!r}")
        try:
            path = export_saved_model(args.model, args.base_path,
                                      args.version,
                                      classifier=args.classifier)
        except (ValueError, FileExistsError) as error:
            parser.error(str(error))
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
        parser.error(str(error))
    from keras_node.server import idle_timeout_protocol

    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                http=idle_timeout_protocol(),
                timeout_keep_alive=max(1, math.ceil(args.request_timeout)))


if __name__ == "__main__":
    main()
