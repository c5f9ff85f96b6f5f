"""``python -m llmopt_lab generate MODEL PROMPT``: load a model and complete a prompt."""

from __future__ import annotations

import time

from ..errors import LlmoptError


def add_arguments(p) -> None:
    p.add_argument("model", help="zoo name (llmopt-tiny), local checkpoint folder, or hub id")
    p.add_argument("prompt", help="text to complete")
    p.add_argument("-n", "--max-new-tokens", type=int, default=48)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix every step")


def run(args) -> int:
    from ..generate import generate
    from ..weights import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    if tok is None:
        raise LlmoptError(f"{args.model} has no tokenizer; text generation needs one")
    ids = tok(args.prompt, return_tensors="pt").input_ids.to(model.device)
    t0 = time.perf_counter()
    out = generate(model, ids, args.max_new_tokens, use_cache=not args.no_cache,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed)
    dt = time.perf_counter() - t0
    new = out.tolist()[0]
    print(args.prompt + tok.decode(new, skip_special_tokens=True))
    print(f"\n[{len(new)} tokens in {dt:.2f} s, {len(new) / dt:.1f} tokens/s on {model.device}]")
    return 0
