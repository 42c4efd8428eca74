"""CLI verb of edgellama.serve: serve. Starlette and uvicorn are imported only when it runs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a bundle over an OpenAI-compatible HTTP API (needs the serve extra)")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the bundle folder's name)")
    p.add_argument("--max-context", type=int, default=None, help="KV cache size in tokens (default 4096 or the bundle's, if less)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    p.add_argument("--provider", default=None, help="onnxruntime execution provider")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="largest request body accepted (default 4 MiB)")
    p.add_argument("--no-prefix-reuse", action="store_true", help="prefill every prompt in full (for measuring)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from edgellama.errors import EdgeLlamaError

    try:
        from edgellama.serve.app import ServeConfig, serve
    except ImportError as exc:
        raise EdgeLlamaError(f"serve needs {exc.name}: pip install 'edgellama[serve]'") from None
    if args.max_body_bytes < 1024:
        raise EdgeLlamaError(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")
    config = ServeConfig(host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
                         max_body_bytes=args.max_body_bytes, reuse_prefix=not args.no_prefix_reuse)
    serve(args.bundle, config, threads=args.threads, max_context=args.max_context, provider=args.provider)
    return 0
