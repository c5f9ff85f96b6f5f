"""An OpenAI-compatible HTTP front end for the :class:`Engine` (lesson 10).

::

    from llmopt_lab import load_model
    from llmopt_lab.serving import Engine
    from llmopt_lab.serving.server import serve
    model, tok = load_model("llmopt-tiny")
    serve(Engine(model, tok), port=8000)        # or: python -m llmopt_lab serve llmopt-tiny

    curl localhost:8000/v1/completions -d '{"prompt": "def add(a, b):", "max_tokens": 32}'

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (only for a tokenizer with a chat template),
both with ``"stream": true`` (server-sent events over chunked HTTP/1.1).

Why only the standard library (:class:`http.server.ThreadingHTTPServer`,
:mod:`threading`, :mod:`queue`) and not an async web framework: it adds no
dependency, it is good enough for a teaching server, and the concurrency
that matters is already in the engine, which batches every request in one
step. Each HTTP connection gets a thread that only parses, waits on a queue
and writes; one background thread (:class:`EngineLoop`) owns the engine,
runs ``engine.step()`` while requests are unfinished and routes each
:class:`RequestOutput` to its request's queue.

Bad input never stops the server: malformed JSON, wrong field types, values
out of range and prompts beyond the context answer 400 with an OpenAI-style
``{"error": {...}}`` body, a body over :data:`MAX_BODY_BYTES` answers 413,
and an unexpected exception answers 500.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import LlmoptError, ServingError
from ..sampling import SamplingParams

#: the largest request body accepted (bytes); larger ones get 413
MAX_BODY_BYTES = 1 << 20


class _Stopped(ServingError):
    """The engine loop stopped before the request finished."""


class EngineLoop:
    """Own an :class:`Engine` and drive it from one background thread.

    :meth:`submit` (any thread) queues a request and returns its id and a
    :class:`queue.Queue` that receives the request's :class:`RequestOutput`
    snapshots (the last has ``finished=True``) or, if the engine fails or the
    loop stops, an exception. Only the loop thread touches the engine: other
    threads post work to an inbox that the loop drains between steps (a lock
    would not do: the loop re-takes it at once after each step, so a waiting
    thread could starve for a whole generation). Finished requests are
    released from the engine.
    """

    def __init__(self, engine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._queues: dict[int, queue.Queue] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def call(self, fn):
        """Run ``fn(engine)`` on the loop thread (between steps) and return
        its result or raise its exception; ServingError once the loop stopped."""
        if threading.current_thread() is self._thread:
            return fn(self.engine)
        if self._stopping or not self.alive:
            raise _Stopped("the server is shutting down")
        reply: queue.Queue = queue.Queue(maxsize=1)
        self._inbox.put((fn, reply))
        while True:
            try:
                ok, value = reply.get(timeout=0.5)
                break
            except queue.Empty:
                if not self.alive:
                    raise _Stopped("the server is shutting down") from None
        if not ok:
            raise value
        return value

    def submit(self, prompt, params: SamplingParams) -> tuple[int, queue.Queue]:
        """Queue a request; raises ServingError (bad prompt, too long, loop stopped)."""
        q: queue.Queue = queue.Queue()

        def add(engine):
            rid = engine.add_request(prompt, params)
            self._queues[rid] = q
            return rid

        return self.call(add), q

    def abort(self, request_id: int) -> None:
        """Stop a request (a client went away) and forget it."""

        def stop(engine):
            if self._queues.pop(request_id, None) is not None:
                engine.abort(request_id)
                engine.release(request_id)

        try:
            self.call(stop)
        except LlmoptError:
            pass

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the loop thread (pending requests get an error) and join it."""
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _fail_all(self, error: Exception) -> None:
        for rid, q in list(self._queues.items()):
            try:
                self.engine.abort(rid)
                self.engine.release(rid)
            except Exception:  # noqa: BLE001 - the engine may be broken already
                pass
            q.put(error)
        self._queues.clear()

    def _handle(self, item) -> bool:
        """Run one inbox item; False for the stop sentinel."""
        if item is None:
            return False
        fn, reply = item
        try:
            reply.put((True, fn(self.engine)))
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            reply.put((False, e))
        return True

    def _run(self) -> None:
        timeout = None
        try:
            while True:
                busy = self.engine.has_unfinished()
                try:  # idle: wait for work; busy: take what came in, then step
                    item = self._inbox.get(block=not busy or timeout is not None,
                                           timeout=timeout)
                    if not self._handle(item):
                        return
                    while True:
                        if not self._handle(self._inbox.get_nowait()):
                            return
                except queue.Empty:
                    pass
                timeout = None
                if not self.engine.has_unfinished():
                    continue
                try:
                    outs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - fail the requests, keep serving
                    self._fail_all(e)
                    continue
                for o in outs:
                    q = self._queues.get(o.request_id)
                    if o.finished:  # released before the client can see the end
                        self._queues.pop(o.request_id, None)
                        self.engine.release(o.request_id)
                    if q is not None:
                        q.put(o)
                if not outs and not self.engine.scheduler.running:
                    timeout = 0.002  # the dynamic batcher waits for a fuller batch: do not spin
        finally:
            self._fail_all(_Stopped("the server stopped before the request finished"))
            while True:  # answer whatever is still in the inbox
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[1].put((False, _Stopped("the server is shutting down")))


# ---------------------------------------------------------------- request parsing
class _HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


def _bad(message: str) -> _HTTPError:
    return _HTTPError(400, message)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _opt(body: dict, name: str, check, what: str, default=None):
    v = body.get(name, default)
    if v is None:
        return default
    if not check(v):
        raise _bad(f"'{name}' must be {what}, got {v!r}")
    return v


def _sampling_params(body: dict) -> SamplingParams:
    max_tokens = _opt(body, "max_tokens", _is_int, "an integer", 16)
    if max_tokens < 1:
        raise _bad(f"'max_tokens' must be at least 1, got {max_tokens}")
    temperature = _opt(body, "temperature", _is_num, "a number", 1.0)
    top_p = _opt(body, "top_p", _is_num, "a number")
    top_k = _opt(body, "top_k", _is_int, "an integer")
    if top_k is not None and top_k <= 0:
        top_k = None  # vLLM's convention: -1 / 0 = off
    seed = _opt(body, "seed", _is_int, "an integer")
    stop_ids = _opt(body, "stop_token_ids",
                    lambda v: isinstance(v, list) and all(_is_int(t) for t in v),
                    "a list of integers")
    ignore_eos = _opt(body, "ignore_eos", lambda v: isinstance(v, bool), "a boolean", False)
    n = _opt(body, "n", _is_int, "an integer", 1)
    if n != 1:
        raise _bad(f"only n=1 is supported, got {n}")
    best_of = _opt(body, "best_of", _is_int, "an integer", 1)
    if best_of != 1:
        raise _bad(f"only best_of=1 is supported, got {best_of}")
    if body.get("echo") not in (None, False):
        raise _bad("'echo' is not supported (only false)")
    if body.get("logprobs") not in (None, False, 0):
        raise _bad("'logprobs' is not supported")
    if body.get("stop") not in (None, [], ""):
        raise _bad("'stop' strings are not supported; give 'stop_token_ids'")
    return SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature),
                          top_k=top_k, top_p=None if top_p is None else float(top_p),
                          seed=seed, stop_token_ids=None if stop_ids is None else tuple(stop_ids),
                          ignore_eos=ignore_eos)


def _completion_prompt(body: dict):
    if "prompt" not in body:
        raise _bad("'prompt' is required")
    p = body["prompt"]
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        return p
    if isinstance(p, list) and len(p) == 1 and (isinstance(p[0], str) or (
            isinstance(p[0], list) and p[0] and all(_is_int(t) for t in p[0]))):
        return p[0]  # a batch of one
    if isinstance(p, list) and p and all(isinstance(t, (str, list)) for t in p):
        raise _bad("a batch of prompts is not supported: send one prompt per request")
    raise _bad("'prompt' must be a string or a non-empty list of token ids")


def _chat_prompt(body: dict, tokenizer) -> str:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in msgs):
        raise _bad("'messages' must be a non-empty list of {\"role\": str, \"content\": str}")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise _bad("this model has no chat template: use /v1/completions")
    try:
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template error is the request's fault
        raise _bad(f"the chat template failed: {e}") from None


# ----------------------------------------------------------------------- handler
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llmopt-lab"
    server: "LlmoptHTTPServer"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    # -- replies
    def _send_json(self, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error_json(self, status: int, message: str, type_: str = "invalid_request_error"):
        self._send_json(status, {"error": {"message": message, "type": type_,
                                           "param": None, "code": status}})

    def _guard(self, fn) -> None:
        self._headers_out = False
        try:
            fn()
        except _HTTPError as e:
            self._send_error_json(e.status, e.message, e.type)
        except LlmoptError as e:
            self._send_error_json(400, str(e))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - answer 500, keep serving
            self.close_connection = True
            if self._headers_out:
                return  # a stream broke midway: the connection just closes
            try:
                self._send_error_json(500, f"internal error: {type(e).__name__}: {e}",
                                      "internal_server_error")
            except OSError:
                pass

    # -- routing
    def do_GET(self):  # noqa: N802
        self._guard(self._get)

    def do_POST(self):  # noqa: N802
        self._guard(self._post)

    def _get(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": self.server.created,
                 "owned_by": "llmopt-lab"}]})
        else:
            raise _HTTPError(404, f"no route GET {path}", "not_found_error")

    def _read_body(self) -> dict:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            self.close_connection = True
            raise _HTTPError(411, "send the body with a Content-Length header")
        try:
            length = int(length)
        except ValueError:
            self.close_connection = True
            raise _bad("bad Content-Length") from None
        if length < 0:
            self.close_connection = True
            raise _bad("bad Content-Length")
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body is left unread
            raise _HTTPError(413, f"request body of {length} bytes exceeds the limit of "
                                  f"{MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        return body

    def _post(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/completions", "/v1/chat/completions"):
            # read (or refuse) the body so the connection stays usable
            try:
                self._read_body()
            except _HTTPError:
                pass
            raise _HTTPError(404, f"no route POST {path}", "not_found_error")
        body = self._read_body()
        model = body.get("model")
        if model is not None and model != self.server.model_name:
            raise _HTTPError(404, f"the model {model!r} does not exist; this server serves "
                                  f"{self.server.model_name!r}", "not_found_error")
        stream = _opt(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
        chat = path == "/v1/chat/completions"
        prompt = (_chat_prompt(body, self.server.engine_loop.engine.tokenizer) if chat
                  else _completion_prompt(body))
        params = _sampling_params(body)
        loop = self.server.engine_loop
        rid, q = loop.submit(prompt, params)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
                "created": int(time.time()), "model": self.server.model_name}
        if stream:
            self._stream(rid, q, meta, chat)
        else:
            self._complete(rid, q, meta, chat)

    def _next(self, rid: int, q: queue.Queue):
        while True:
            try:
                item = q.get(timeout=1.0)
            except queue.Empty:
                if not self.server.engine_loop.alive:
                    raise _Stopped("the engine loop is not running") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    @staticmethod
    def _usage(o) -> dict:
        p, c = len(o.prompt_token_ids), len(o.token_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _complete(self, rid, q, meta, chat) -> None:
        try:
            o = self._next(rid, q)
            while not o.finished:
                o = self._next(rid, q)
        except BaseException:
            self.server.engine_loop.abort(rid)
            raise
        text = o.text or ""
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": o.finish_reason, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": o.finish_reason,
                      "logprobs": None}
            obj = "text_completion"
        self._send_json(200, {**meta, "object": obj, "choices": [choice],
                              "usage": self._usage(o)})

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _event(self, obj) -> None:
        self._chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode())
                    + b"\n\n")

    def _stream(self, rid, q, meta, chat) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._headers_out = True
        obj = "chat.completion.chunk" if chat else "text_completion"
        first = True
        try:
            while True:
                try:
                    o = self._next(rid, q)
                except Exception as e:  # noqa: BLE001 - headers are out: report in the stream
                    kind = ("invalid_request_error" if isinstance(e, LlmoptError)
                            else "internal_server_error")
                    self._event({"error": {"message": str(e), "type": kind}})
                    break
                text = o.new_text or ""
                if chat:
                    delta = {"content": text}
                    if first:
                        delta = {"role": "assistant", **delta}
                    choice = {"index": 0, "delta": delta, "finish_reason": o.finish_reason,
                              "logprobs": None}
                else:
                    choice = {"index": 0, "text": text, "finish_reason": o.finish_reason,
                              "logprobs": None}
                first = False
                chunk = {**meta, "object": obj, "choices": [choice]}
                if o.finished:
                    chunk["usage"] = self._usage(o)
                self._event(chunk)
                if o.finished:
                    break
            self._event(b"[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except BaseException:
            self.server.engine_loop.abort(rid)  # the client went away, or worse
            self.close_connection = True  # a half-written chunked body cannot continue
            raise


# ------------------------------------------------------------------------ server
class LlmoptHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server with an :class:`EngineLoop` (see :func:`make_server`)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, engine, model_name: str = "llmopt-tiny", verbose: bool = False):
        super().__init__(address, _Handler)
        self.model_name, self.verbose = model_name, verbose
        self.created = int(time.time())
        self.engine_loop = EngineLoop(engine)
        self._serving = threading.Event()
        self._closed = False

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving.set()
        try:
            super().serve_forever(poll_interval)
        finally:
            self._serving.clear()

    def shutdown_all(self) -> None:
        """Stop serving (if serve_forever runs in another thread), stop the
        engine loop and close the socket. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._serving.is_set():
            self.shutdown()  # waits for serve_forever to return
        self.engine_loop.stop()
        self.server_close()


def make_server(engine, host: str = "127.0.0.1", port: int = 0,
                model_name: str = "llmopt-tiny", verbose: bool = False) -> LlmoptHTTPServer:
    """A server bound to ``host:port`` (port 0: any free port; see ``.url``)
    whose engine loop already runs; call ``serve_forever()`` (e.g. in a
    thread) and ``shutdown_all()`` at the end."""
    return LlmoptHTTPServer((host, port), engine, model_name=model_name, verbose=verbose)


def serve(engine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "llmopt-tiny",
          verbose: bool = False) -> None:
    """Serve ``engine`` until Ctrl-C, then stop the loop and close the socket."""
    server = make_server(engine, host, port, model_name, verbose)
    print(f"serving {model_name} on {server.url} (POST /v1/completions; Ctrl-C to stop)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown_all()
        print("server stopped", flush=True)
