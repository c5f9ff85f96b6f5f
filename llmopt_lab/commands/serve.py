"""``python -m llmopt_lab serve MODEL``: serve a model over HTTP (OpenAI-compatible).

::

    python -m llmopt_lab serve llmopt-tiny --port 8000
    curl localhost:8000/v1/completions -d '{"prompt": "def add(a, b):", "max_tokens": 32}'
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("model", help="zoo name (llmopt-tiny), local checkpoint folder, or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16")
    p.add_argument("--policy", default="continuous", choices=("continuous", "dynamic", "static"),
                   help="batching policy (default continuous)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks (default: 256 MiB of K/V storage)")
    p.add_argument("--prefix-caching", action="store_true", help="reuse shared prompt prefixes")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")


def run(args) -> int:
    from ..serving import Engine
    from ..serving.server import serve
    from ..weights import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    engine = Engine(model, tok, policy=args.policy, max_num_seqs=args.max_num_seqs,
                    num_blocks=args.num_blocks, prefix_caching=args.prefix_caching)
    serve(engine, host=args.host, port=args.port, model_name=args.model, verbose=args.verbose)
    return 0
