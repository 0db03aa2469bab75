"""What an inference request must be, for the HTTP routes and the library alike (pure).

One set of rules, so a body the HTTP route refuses is refused by ``gateway.request`` with the
same status, code and message: the routes that are proxied, the body must be a JSON object with
a non-empty string ``model``, the session key (``x-session-id``, else the body's ``user``), and
the text cache-aware routing matches on. ``json.loads`` has no depth limit of its own: a body
nested beyond the interpreter's recursion limit (about 1,000 levels) raises RecursionError,
which is the depth limit here (checking depth first would cost a pass over every body).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from actors.dataplane.routing import RouteRequest

ROUTES = frozenset(("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/generate"))


class BadInferenceRequest(Exception):
    """The request is wrong: ``status``, ``code``, ``message`` and ``param`` are the answer."""

    def __init__(self, code: str, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = 400
        self.code = code
        self.message = message
        self.param = param


def parse_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; BadInferenceRequest when it is not one."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise BadInferenceRequest("invalid_json", "the body is not valid JSON") from None
    except RecursionError:  # the depth limit: see the module docstring
        raise BadInferenceRequest("invalid_json", "the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadInferenceRequest("invalid_json", "the body must be a JSON object")
    return data


def route_for(
    data: Mapping[str, Any], *, session_key: str | None, wants_prompt: bool
) -> RouteRequest:
    """What routing needs of a body: its model, session key and (cache-aware only) prompt."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        message = "'model' is required" if model is None else "'model' must be a non-empty string"
        raise BadInferenceRequest("missing_required_parameter", message, param="model")
    if session_key is None and isinstance(user := data.get("user"), str):
        session_key = user
    prompt = prompt_of(data) if wants_prompt else None
    return RouteRequest(model=model, session_key=session_key, prompt=prompt)


def prompt_of(data: Mapping[str, Any]) -> str | None:
    """The text cache-aware routing matches on: the prompt, or the messages' contents."""
    if isinstance(prompt := data.get("prompt") or data.get("text"), str):
        return prompt
    messages = data.get("messages")
    if not isinstance(messages, list):
        return None
    parts = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(
                p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
    return "\n".join(parts)
