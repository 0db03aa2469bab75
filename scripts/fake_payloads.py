"""The answers of the fake SGLang / vLLM worker: OpenAI / SGLang JSON bodies and SSE chunks.

Plain functions of what they need (model name, flavor, port, request number...), no sockets: the
server in ``scripts/fake_worker.py`` routes a request here and sends back the ``Reply``.
"""

from __future__ import annotations

import json
import time
from typing import Any, NamedTuple

JsonObj = dict[str, Any]


class Reply(NamedTuple):
    status: int
    body: bytes = b""
    sse: list[bytes] | None = None  # when set: a text/event-stream of these chunks, then [DONE]
    headers: tuple[tuple[bytes, bytes], ...] = ()  # extra response headers


def json_reply(status: int, obj: object) -> Reply:
    return Reply(status, json.dumps(obj).encode())


def error_reply(status: int, message: str, kind: str = "invalid_request_error") -> Reply:
    return json_reply(status, {"error": {"message": message, "type": kind, "code": status}})


class Refused(Exception):  # raised by a route to answer with an error instead
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.reply = error_reply(status, message, kind)


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


# ---- detection routes ----


def models(model: str, flavor: str, created: int) -> Reply:
    """``GET /v1/models``: the one served model."""
    card = {"id": model, "object": "model", "created": created, "root": model}
    card |= {"owned_by": flavor, "max_model_len": 4096}
    return json_reply(200, {"object": "list", "data": [card]})


def server_info(model: str, host: str, port: int) -> Reply:
    """SGLang ``GET /server_info`` (and ``/get_server_info``)."""
    m = model
    return json_reply(
        200,
        {
            "model_path": m,
            "tokenizer_path": m,
            "served_model_name": m,
            "host": host,
            "port": port,
            "dp_size": 1,
            "tp_size": 1,
            "max_total_num_tokens": 65536,
            "max_running_requests": 256,
            "context_length": 4096,
            "version": "0.0.0-fake",
            "disaggregation_mode": "null",
            "load_balance_method": "round_robin",
        },
    )


def model_info(model: str) -> Reply:
    """SGLang ``GET /model_info`` (and ``/get_model_info``)."""
    m = model
    return json_reply(
        200,
        {
            "model_path": m,
            "tokenizer_path": m,
            "is_generation": True,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "has_image_understanding": False,
        },
    )


# ---- inference routes (raise Refused on a bad request) ----


def _parse(body: bytes, model: str, *, need_model: bool = True) -> JsonObj:
    try:
        req = json.loads(body)
    except ValueError:
        raise Refused(400, "the body is not valid JSON") from None
    if not isinstance(req, dict):
        raise Refused(400, "the body must be a JSON object")
    asked = req.get("model")
    if need_model and (not isinstance(asked, str) or not asked):
        raise Refused(400, "'model' is required")
    if need_model and asked != model:
        raise Refused(404, f"the model {asked!r} does not exist", "NotFoundError")
    return req


def _tokens(n: object, port: int) -> list[str]:
    n = 8 if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise Refused(400, "max_tokens must be a non-negative integer")
    return ([f"[port {port}]"] + [" tok"] * (min(n, 4096) - 1))[:n]


def complete(
    body: bytes, *, chat: bool, model: str, port: int, request_no: int, pad_to: int | None = None
) -> Reply:
    """``POST /v1/chat/completions`` (``chat``) or ``/v1/completions``, plain or streamed.

    ``pad_to``: a plain (not streamed) answer's text is padded with ``x`` until its JSON body is
    ``pad_to`` bytes (never shortened), for big-answer tests."""
    req = _parse(body, model)
    toks = _tokens(req.get("max_tokens", req.get("max_completion_tokens")), port)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-fake-{port}-{request_no}"
    base = {"id": rid, "created": int(time.time()), "model": model}
    usage = {"prompt_tokens": len(body) // 4, "completion_tokens": len(toks)}
    usage["total_tokens"] = usage["prompt_tokens"] + len(toks)
    choice: JsonObj
    if req.get("stream"):
        obj = "chat.completion.chunk" if chat else "text_completion"
        chunks = []
        for i, tok in enumerate(toks):
            delta = {"role": "assistant", "content": tok} if i == 0 else {"content": tok}
            choice = {"delta": delta} if chat else {"text": tok}
            choice |= {"index": 0, "logprobs": None}
            choice["finish_reason"] = "length" if i == len(toks) - 1 else None
            chunks.append(_sse({**base, "object": obj, "choices": [choice]}))
        opts = req.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            chunks.append(_sse({**base, "object": obj, "choices": [], "usage": usage}))
        return Reply(200, sse=chunks)
    text = "".join(toks)
    obj = "chat.completion" if chat else "text_completion"

    def answer(text: str) -> JsonObj:
        message = {"role": "assistant", "content": text}
        choice: JsonObj = {"message": message} if chat else {"text": text}
        choice |= {"index": 0, "finish_reason": "length", "logprobs": None}
        return {**base, "object": obj, "choices": [choice], "usage": usage}

    if pad_to is not None:
        text += "x" * (pad_to - len(json.dumps(answer(text))))  # "x" is one byte in JSON
    return json_reply(200, answer(text))


def embeddings(body: bytes, *, model: str) -> Reply:
    """``POST /v1/embeddings``: 8 deterministic floats per input."""
    req = _parse(body, model)
    inputs = req.get("input")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not inputs:
        raise Refused(400, "'input' must be a string or a non-empty list")
    if all(isinstance(i, int) for i in inputs):
        inputs = [inputs]  # one pre-tokenised input
    vectors = [[(i + j) % 10 / 10 for j in range(8)] for i in range(len(inputs))]
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    usage = {"prompt_tokens": len(body) // 4, "total_tokens": len(body) // 4}
    return json_reply(200, {"object": "list", "data": data, "model": req["model"], "usage": usage})


def generate(body: bytes, *, port: int, request_no: int) -> Reply:
    """SGLang ``POST /generate`` (no model check)."""
    req = _parse(body, "", need_model=False)
    params = req.get("sampling_params")
    toks = _tokens(params.get("max_new_tokens") if isinstance(params, dict) else None, port)
    meta = {"id": f"fake-{port}-{request_no}", "prompt_tokens": len(body) // 4}
    meta |= {"completion_tokens": len(toks), "finish_reason": {"type": "length"}}
    return json_reply(200, {"text": "".join(toks), "meta_info": meta})
