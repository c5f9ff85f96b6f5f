"""``python -m llmopt_lab chat MODEL [--prompt TEXT] [-n N]``: talk to a chat model.

The conversation goes through the tokenizer's chat template (the model needs
one: ``smollm2-135m`` has it, the built-in llmopt-tiny models do not), and the
answer is streamed to stdout token by token as the serving engine
(:class:`~llmopt_lab.serving.engine.Engine`, paged KV cache, prefix caching so
that each turn reuses the previous turns' keys and values) produces it.
Greedy unless ``--temperature`` is given.

* ``--prompt TEXT``: one answer to TEXT, then exit;
* no ``--prompt`` and stdin a terminal: a conversation (``/reset`` starts over,
  ``/quit`` or Ctrl-D ends, Ctrl-C stops the current answer);
* no ``--prompt`` and stdin a pipe: stdin is the one message.
"""

from __future__ import annotations

import sys

from ..errors import LlmoptError

BLOCK_SIZE = 16


def add_arguments(p) -> None:
    p.add_argument("model", help="a chat model: zoo name (smollm2-135m), .gguf file, checkpoint "
                                 "folder or hub id (its tokenizer needs a chat template)")
    p.add_argument("--prompt", default=None,
                   help="one user message: print the answer and exit (default: a conversation "
                        "when stdin is a terminal, else stdin is the message)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=256,
                   help="most tokens per answer (default 256)")
    p.add_argument("--system", default=None, help="system message (default: the template's own)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context", type=int, default=2048,
                   help="KV cache reserved for a conversation, in tokens (default 2048, at most "
                        "the model's context); older turns are dropped when it is full")


def encode_chat(tok, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` (``[{"role", "content"}, ...]``) through the
    tokenizer's chat template, ending with the assistant's turn prompt."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def stream_answer(engine, ids: list[int], params, out=None) -> str:
    """Generate the answer to prompt ``ids`` with ``engine``, writing each new
    piece of text to ``out`` (default stdout) as it comes; returns the answer.
    Ctrl-C stops it (the request is aborted and its KV blocks freed) and
    re-raises KeyboardInterrupt."""
    out = sys.stdout if out is None else out
    rid = engine.add_request(ids, params)
    text = ""
    try:
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id == rid:
                    piece = o.new_text or ""
                    text += piece
                    out.write(piece)
                    out.flush()
    except KeyboardInterrupt:
        engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
        raise
    finally:
        engine.release(rid)
    out.write("\n")
    out.flush()
    return text


def _fit(tok, messages: list[dict], room: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest exchanges (never the system message nor the last user
    message) until the prompt fits in ``room`` tokens."""
    ids = encode_chat(tok, messages)
    while len(ids) > room:
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise LlmoptError(f"the message is {len(ids)} tokens and leaves no room for an answer "
                              f"in --context: shorten it, lower -n, or raise --context")
        messages = messages[:first] + messages[first + 2:]
        ids = encode_chat(tok, messages)
    return messages, ids


def run(args) -> int:
    from ..sampling import SamplingParams
    from ..serving.engine import Engine
    from ..weights import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    if tok is None or not getattr(tok, "chat_template", None):
        raise LlmoptError(f"{args.model} has no chat template in its tokenizer; chat needs a chat "
                          f"model (e.g. smollm2-135m), or use `python -m llmopt_lab generate`")
    budget = min(args.context, model.config.max_position_embeddings)
    if not 1 <= args.max_new_tokens < budget:
        raise LlmoptError(f"-n must be in 1..{budget - 1} (the --context of {budget} tokens holds "
                          "the prompt and the answer)")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    engine = Engine(model, tok, max_num_seqs=1, block_size=BLOCK_SIZE,
                    num_blocks=-(-budget // BLOCK_SIZE), prefix_caching=True)
    room = budget - args.max_new_tokens
    start = [{"role": "system", "content": args.system}] if args.system else []

    message = args.prompt
    if message is None and not sys.stdin.isatty():
        message = sys.stdin.read().strip()
        if not message:
            raise LlmoptError("no message: give --prompt TEXT, pipe one on stdin, or run in a "
                              "terminal for a conversation")
    if message is not None:
        _, ids = _fit(tok, start + [{"role": "user", "content": message}], room)
        stream_answer(engine, ids, params)
        return 0

    mode = "greedy" if args.temperature == 0 else f"temperature {args.temperature}"
    print(f"chat with {args.model} on {model.device} ({mode}, up to {args.max_new_tokens} tokens "
          "an answer); /reset starts over, /quit or Ctrl-D ends, Ctrl-C stops an answer",
          file=sys.stderr)
    messages = list(start)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        try:
            messages, ids = _fit(tok, messages + [{"role": "user", "content": line}], room)
        except LlmoptError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        try:
            answer = stream_answer(engine, ids, params)
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
            messages = messages[:-1]
            continue
        messages.append({"role": "assistant", "content": answer})
