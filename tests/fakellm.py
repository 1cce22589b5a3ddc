"""A fake OpenAI-compatible Chat Completions server over real HTTP, for tests.

It listens on 127.0.0.1 on an ephemeral port, in a background thread, so the real `openai`
client (and anything else speaking HTTP) can be pointed at it; nothing leaves the machine.

    with FakeLLM() as server:
        server.enqueue("Raise LR\\n<<<<<<< SEARCH\\n...")   # next reply, in order
        server.enqueue_error(429)                           # then a rate limit
        client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=2)
        ...
        server.requests[0]["messages"]                      # every request's JSON body

Behaviour, guaranteed:
- `POST /v1/chat/completions` pops the next scripted item (FIFO) and answers with it; when
  the queue is empty it answers 500 with `x-should-retry: false` and a message saying so, so a
  test that forgot to script a reply fails fast instead of hanging in client retries.
  After `respond_with(make_reply, delay=...)` it answers `make_reply(request body)` instead
  (a server that never runs dry, for benchmarks); scripted items still come first.
- Every chat request's JSON body is appended to `requests` (and its headers to `headers`)
  before the reply is chosen, including requests answered with an error.
- Replies carry `usage` with `prompt_tokens` (the characters of all message contents / 4,
  at least 1, unless given) and `completion_tokens` (characters of the reply / 4, at least 1,
  unless given); the usage actually sent is appended to `usages`.
- Error replies default to an OpenAI-shaped body and a `retry-after-ms: 1` header, so the
  client's own retries take milliseconds; pass `headers=` to override.
- `context_limit` (characters of all message contents, None = unlimited) makes any longer
  request fail with 400 `context_length_exceeded`, without consuming a scripted item.
- `"stream": true` requests get the same scripted reply as server-sent events.
- `GET /v1/models` lists `model` (404 with `list_models=False`, an endpoint without that
  route).
- `api_key="..."`: every request whose `Authorization` is not `Bearer <that key>` gets 401,
  as OpenAI sends it; without it the key is recorded in `headers`, never checked.
- `strict_model=True`: a chat request for another model than `model` gets 404 "The model ...
  does not exist", as OpenAI and vLLM send it, without consuming a scripted item.
- `enqueue(..., reasoning=...)` adds `reasoning_content` to the message (vLLM, DeepSeek);
  `finish_reason=` sets the choice's finish_reason.
- `drop_chat = True`: every chat request is answered by closing the connection (an endpoint
  that died after the session started).

Not modelled: tools/function calls, n > 1.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CONTEXT_LENGTH_MESSAGE = (
    "This model's maximum context length is 1000 tokens. However, your messages resulted "
    "in more tokens. Please reduce the length of the messages."
)


@dataclass
class Scripted:
    """One scripted answer. Build them with the FakeLLM.enqueue* methods."""

    status: int = 200
    content: str | None = ""
    refusal: str | None = None
    finish_reason: str = "stop"
    delay: float = 0.0
    body: Any = None  # error body (dict or str) or raw bytes when `raw`
    raw: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    choices: bool = True  # False: a 200 reply with an empty `choices` list
    reasoning: str | None = None  # sent as message.reasoning_content


def error_body(status: int, message: str | None = None, code: str | None = None) -> dict:
    """An OpenAI-shaped error body for `status`."""
    kinds = {
        400: ("invalid_request_error", "Bad request"),
        401: ("invalid_request_error", "Incorrect API key provided"),
        404: ("invalid_request_error", "The model does not exist"),
        429: ("rate_limit_error", "Rate limit reached for requests"),
        500: ("server_error", "The server had an error while processing your request"),
        503: ("server_error", "The engine is currently overloaded"),
    }
    kind, default = kinds.get(status, ("server_error", f"HTTP {status}"))
    return {"error": {"message": message or default, "type": kind, "param": None, "code": code}}


class FakeLLM:
    """The server; use as a context manager (or call start()/stop())."""

    def __init__(
        self,
        model: str = "fake-model",
        context_limit: int | None = None,
        *,
        api_key: str | None = None,
        strict_model: bool = False,
        list_models: bool = True,
    ) -> None:
        self.model = model
        self.context_limit = context_limit
        self.api_key = api_key
        self.strict_model = strict_model
        self.list_models = list_models
        self.drop_chat = False
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.usages: list[dict[str, int]] = []
        self._queue: deque[Scripted] = deque()
        self._respond: tuple[Callable[[dict], str], float] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ scripting

    def enqueue(
        self,
        text: str,
        *,
        finish_reason: str = "stop",
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        reasoning: str | None = None,
    ) -> None:
        """The next reply is a normal completion whose content is `text` (and, with
        `reasoning`, whose message carries that `reasoning_content`)."""
        self._push(
            Scripted(
                content=text,
                finish_reason=finish_reason,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                reasoning=reasoning,
            )
        )

    def enqueue_delay(self, seconds: float, text: str) -> None:
        """Like enqueue, but the server waits `seconds` before answering (client timeouts)."""
        self._push(Scripted(content=text, delay=seconds))

    def enqueue_error(
        self, status: int, body: dict | str | None = None, *, headers: dict[str, str] | None = None
    ) -> None:
        """The next reply is an HTTP error; `body` defaults to an OpenAI-shaped error."""
        self._push(
            Scripted(
                status=status,
                body=error_body(status) if body is None else body,
                headers={"retry-after-ms": "1", **(headers or {})},
            )
        )

    def enqueue_context_length_error(self) -> None:
        """The next reply is 400 context_length_exceeded, as OpenAI sends it."""
        self.enqueue_error(
            400, error_body(400, CONTEXT_LENGTH_MESSAGE, code="context_length_exceeded")
        )

    def enqueue_refusal(self, refusal: str = "I'm sorry, but I can't help with that.") -> None:
        """The next reply is a refusal: `content` null and `message.refusal` set."""
        self._push(Scripted(content=None, refusal=refusal))

    def enqueue_empty(self, *, no_choices: bool = False) -> None:
        """The next reply has empty content (or, with no_choices, an empty `choices` list)."""
        self._push(Scripted(content="", choices=not no_choices))

    def enqueue_raw(
        self, status: int, body: bytes, *, headers: dict[str, str] | None = None
    ) -> None:
        """The next reply is exactly these bytes (e.g. malformed JSON)."""
        self._push(Scripted(status=status, body=body, raw=True, headers=headers or {}))

    def respond_with(self, make_reply: Callable[[dict], str], *, delay: float = 0.0) -> None:
        """From now on, a request that finds the queue empty is answered, after `delay`
        seconds, with the text `make_reply(request body)` (called under no lock)."""
        self._respond = (make_reply, delay)

    def pending(self) -> int:
        """How many scripted replies are still queued."""
        with self._lock:
            return len(self._queue)

    def _push(self, item: Scripted) -> None:
        with self._lock:
            self._queue.append(item)

    def _pop(self) -> Scripted | None:
        with self._lock:
            return self._queue.popleft() if self._queue else None

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        """The URL to pass as `base_url` to the openai client (ends in /v1)."""
        if self._server is None:
            raise RuntimeError("FakeLLM is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeLLM:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        # a short poll interval keeps stop() (which waits for one poll) fast
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping in a delay
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ answering

    def _answer_chat(self, body: dict) -> tuple[int, dict[str, str], bytes | Any]:
        """Choose the reply for one chat request: (status, headers, JSON-able or raw bytes)."""
        prompt_chars = sum(len(_content_text(m.get("content"))) for m in body.get("messages", []))
        if self.strict_model and body.get("model") != self.model:
            message = f"The model `{body.get('model')}` does not exist."
            return 404, {}, error_body(404, message, code="model_not_found")
        if self.context_limit is not None and prompt_chars > self.context_limit:
            body_ = error_body(400, CONTEXT_LENGTH_MESSAGE, code="context_length_exceeded")
            return 400, {}, body_
        item = self._pop()
        if item is None and self._respond is not None:
            make_reply, delay = self._respond
            item = Scripted(content=make_reply(body), delay=delay)
        if item is None:
            message = "fakellm: no reply enqueued for this request"
            return 500, {"x-should-retry": "false"}, error_body(500, message)
        if item.delay:
            self._stopping.wait(item.delay)
        if item.raw:
            return item.status, item.headers, item.body
        if item.status != 200:
            return item.status, item.headers, item.body
        text = item.content or ""
        usage = {
            "prompt_tokens": item.prompt_tokens
            if item.prompt_tokens is not None
            else max(1, prompt_chars // 4),
            "completion_tokens": item.completion_tokens
            if item.completion_tokens is not None
            else max(1, len(text) // 4),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        with self._lock:
            self.usages.append(usage)
        message = {"role": "assistant", "content": item.content, "refusal": item.refusal}
        if item.reasoning is not None:
            message["reasoning_content"] = item.reasoning
        choices = [
            {"index": 0, "message": message, "finish_reason": item.finish_reason, "logprobs": None}
        ]
        return (
            200,
            {},
            {
                "id": f"chatcmpl-fake-{len(self.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", self.model),
                "choices": choices if item.choices else [],
                "usage": usage,
            },
        )


def _content_text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class _Handler(BaseHTTPRequestHandler):
    fake: FakeLLM  # set on the per-server subclass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep tests quiet
        pass

    def _key_rejected(self) -> bool:
        """Answer 401 (and return True) when the fake checks keys and this one is wrong."""
        key = self.fake.api_key
        if key is None or self.headers.get("authorization") == f"Bearer {key}":
            return False
        body = error_body(401, "Incorrect API key provided: sk-wr***. You can find your API key")
        self._send_json(401, body)
        return True

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self._key_rejected():
            return
        if self.path.rstrip("/").endswith("/models") and self.fake.list_models:
            created = int(time.time())
            data = [
                {"id": self.fake.model, "object": "model", "created": created, "owned_by": "fake"}
            ]
            self._send_json(200, {"object": "list", "data": data})
        else:
            self._send_json(404, error_body(404, f"no route {self.path}"))

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send_json(404, error_body(404, f"no route {self.path}"))
            return
        if self._key_rejected():
            return
        if self.fake.drop_chat:
            self.close_connection = True  # no status line: the client sees a dropped connection
            return
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._send_json(400, error_body(400, "request body is not JSON"))
            return
        with self.fake._lock:
            self.fake.requests.append(body)
            self.fake.headers.append({k.lower(): v for k, v in self.headers.items()})
        status, headers, payload = self.fake._answer_chat(body)
        if status == 200 and body.get("stream") and isinstance(payload, dict):
            self._send_stream(payload, body)
        elif isinstance(payload, bytes):
            self._send(status, headers, payload, "application/json")
        elif isinstance(payload, str):
            self._send(status, headers, payload.encode(), "text/plain")
        else:
            self._send_json(status, payload, headers)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, headers or {}, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, headers: dict[str, str], data: bytes, ctype: str) -> None:
        try:
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to answer

    def _send_stream(self, completion: dict, request: dict) -> None:
        """Send the completion as chat.completion.chunk events, then [DONE]."""
        choice = completion["choices"][0] if completion["choices"] else None
        base = {k: completion[k] for k in ("id", "created", "model")}
        base["object"] = "chat.completion.chunk"
        events: list[dict] = []
        if choice is not None:
            text = choice["message"]["content"] or ""
            pieces = [text[i : i + 16] for i in range(0, len(text), 16)] or [""]
            for k, piece in enumerate(pieces):
                delta = {"content": piece} if k else {"role": "assistant", "content": piece}
                events.append(
                    {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                )
            final = {"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}
            events.append({**base, "choices": [final]})
        if (request.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "choices": [], "usage": completion["usage"]})
        data = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        self._send(200, {}, data.encode(), "text/event-stream")
