"""The local model's inference process: a GGUF model behind a small OpenAI-compatible server.

Started and supervised by ``chatapp.relay.upstreams.local`` (run as a script, so it
imports neither Django nor the gateway): it loads the model once, formats
conversations with the model's own chat template, generates token by token with
llama.cpp and answers ``POST /v1/chat/completions`` (JSON or an SSE stream) and
``GET /v1/models``.  One generation runs at a time; the gateway bounds the queue.

It counts tokens itself (llama-cpp-python's bundled server reports no usage in
streams): prompt tokens are the tokenizer's count of the templated prompt,
completion tokens the tokens generated (the end-of-generation token excluded).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import llama_cpp
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class Engine:
    def __init__(self, model_path: str, n_ctx: int, n_threads: int) -> None:
        self.llm = Llama(
            model_path=model_path,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )
        self.n_ctx = n_ctx
        self.lock = threading.Lock()
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise SystemExit(f"{model_path} has no chat template (tokenizer.chat_template)")
        model = self.llm._model
        self.eos = self.llm.token_eos()
        self.vocab = llama_cpp.llama_model_get_vocab(model.model)
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(self.eos),
            bos_token=model.token_get_text(self.llm.token_bos()),
        )

    def prompt_tokens(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[str]]:
        formatted = self.formatter(messages=messages)  # type: ignore[arg-type]
        tokens = self.llm.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )
        extra_stops = [stop for stop in (formatted.stop or []) if isinstance(stop, str) and stop]
        return tokens, extra_stops

    def generate(
        self,
        prompt: list[int],
        *,
        max_tokens: int,
        stop: list[str],
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> Iterator[tuple[str, int, str | None]]:
        """Yield (new text, tokens so far, finish reason or None) as tokens are produced."""
        if seed is not None:
            self.llm.set_seed(seed)
        # Evaluate the whole prompt every time: reusing the cached prefix evaluates
        # in a different batch shape, which shifts logits enough that the same seed
        # would not give the same reply.
        self.llm.reset()
        generated: list[int] = []
        emitted = 0  # characters of the decoded completion already yielded
        hold = max((len(text) for text in stop), default=1) - 1
        text = ""
        finish = "length"
        for token in self.llm.generate(
            prompt, temp=temperature, top_p=top_p, top_k=40 if temperature > 0 else 1, reset=True
        ):
            if llama_cpp.llama_vocab_is_eog(self.vocab, token):
                finish = "stop"
                break
            generated.append(token)
            text = self.llm.detokenize(generated).decode("utf-8", errors="ignore")
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
                finish = "stop"
                break
            if len(generated) >= max_tokens:
                break
            # Hold back what could be the start of a stop sequence, and a trailing
            # partial character (decode dropped it until its last byte arrives).
            safe = len(text) - hold
            if safe > emitted:
                yield text[emitted:safe], len(generated), None
                emitted = safe
        yield text[emitted:], len(generated), finish


def _chunk(
    ident: str,
    created: int,
    delta: dict[str, Any],
    finish: str | None = None,
    usage: dict[str, int] | None = None,
) -> bytes:
    body: dict[str, Any] = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": created,
        "model": "local",
        "choices": []
        if usage is not None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages: at least one message is required", "messages")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{index}]: expected an object", f"messages[{index}]")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    parts.append(str(part.get("text", "")))
                else:
                    raise BadRequest(
                        f"messages[{index}].content: this local model reads text only",
                        f"messages[{index}].content",
                    )
            content = "".join(parts)
        messages.append({"role": str(message.get("role", "user")), "content": content or ""})
    return messages


def make_handler(engine: Engine) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            return

        def _json(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.rstrip("/") == "/v1/models":
                self._json(
                    200,
                    {
                        "object": "list",
                        "data": [
                            {"id": "local", "object": "model", "created": 0, "owned_by": "local"}
                        ],
                    },
                )
            else:
                self._json(
                    404,
                    {
                        "error": {
                            "message": f"unknown path {self.path}",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": None,
                        }
                    },
                )

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._json(
                    404,
                    {
                        "error": {
                            "message": f"unknown path {self.path}",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": None,
                        }
                    },
                )
                return
            try:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                self._complete(body)
            except BadRequest as exc:
                self._json(
                    400,
                    {
                        "error": {
                            "message": exc.message,
                            "type": "invalid_request_error",
                            "param": exc.param,
                            "code": exc.code,
                        }
                    },
                )
            except (ValueError, TypeError) as exc:
                self._json(
                    400,
                    {
                        "error": {
                            "message": f"bad request: {exc}",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": None,
                        }
                    },
                )

        def _complete(self, body: dict[str, Any]) -> None:
            messages = _messages(body)
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 512
            stop = body.get("stop") or []
            stop = [stop] if isinstance(stop, str) else [str(item) for item in stop if item]
            temperature = float(
                body.get("temperature", 0.8) if body.get("temperature") is not None else 0.8
            )
            top_p = float(body["top_p"]) if body.get("top_p") is not None else 0.95
            seed = body.get("seed")
            stream = bool(body.get("stream"))
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            with engine.lock:  # one generation at a time; the gateway bounds the queue
                prompt, extra_stops = engine.prompt_tokens(messages)
                if len(prompt) + int(max_tokens) > engine.n_ctx:
                    raise BadRequest(
                        f"This request needs {len(prompt)} prompt tokens plus max_tokens={max_tokens}, more than "
                        f"the local model's context window of {engine.n_ctx} tokens.",
                        "messages",
                        "context_length_exceeded",
                    )
                pieces = engine.generate(
                    prompt, max_tokens=int(max_tokens), stop=stop + extra_stops, temperature=temperature, top_p=top_p,
                    seed=int(seed) if isinstance(seed, int) else None,
                )  # fmt: skip
                ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
                if stream:
                    self._stream(pieces, ident, created, len(prompt), include_usage)
                else:
                    text, count, finish = "", 0, "length"
                    for piece, produced, reason in pieces:
                        text += piece
                        count = produced
                        finish = reason or finish
                    usage = {
                        "prompt_tokens": len(prompt),
                        "completion_tokens": count,
                        "total_tokens": len(prompt) + count,
                    }
                    self._json(200, {
                        "id": ident, "object": "chat.completion", "created": created, "model": "local",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}],
                        "usage": usage,
                    })  # fmt: skip

        def _stream(
            self,
            pieces: Iterator[tuple[str, int, str | None]],
            ident: str,
            created: int,
            prompt: int,
            include_usage: bool,
        ) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.send_header("connection", "close")
            self.end_headers()
            self.close_connection = True
            write = self.wfile.write
            write(_chunk(ident, created, {"role": "assistant", "content": ""}))
            count = 0
            for piece, produced, finish in pieces:
                count = produced
                if piece:
                    write(_chunk(ident, created, {"content": piece}))
                    self.wfile.flush()
                if finish is not None:
                    write(_chunk(ident, created, {}, finish))
            if include_usage:
                write(
                    _chunk(
                        ident,
                        created,
                        {},
                        usage={
                            "prompt_tokens": prompt,
                            "completion_tokens": count,
                            "total_tokens": prompt + count,
                        },
                    )
                )
            write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a GGUF model for Switchboard.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    options = parser.parse_args()
    engine = Engine(options.model, options.ctx, options.threads)
    server = ThreadingHTTPServer(("127.0.0.1", options.port), make_handler(engine))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
