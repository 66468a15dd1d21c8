"""Checks an inference request against the OpenAI schema of its endpoint, before routing.

Pure functions over the body already parsed by the proxy (no second parse, no models, no
copies): plain type checks, so the cost on the request path stays in microseconds. A bad
request answers 400 with the OpenAI error body naming the field (``param``, e.g.
``messages[1].role``) instead of reaching a runner, which would answer 500 or, worse, 200.

What is checked: the fields the OpenAI API defines for the endpoint, their types, required
fields, ranges and enumerations. What is not: fields OpenAI does not define (backends have
their own extensions: ``top_k``, ``min_p``, ``grammar``, ``chat_template_kwargs``…), which
pass through untouched; and what only the model can know (context length, a tokenizer's
vocabulary). ``null`` counts as absent wherever OpenAI allows it for an optional field.

``check(endpoint, body)`` returns None when the body is fine, else an ``Invalid``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CHAT, COMPLETIONS, EMBEDDINGS = "chat", "completions", "embeddings"
ENDPOINTS = (CHAT, COMPLETIONS, EMBEDDINGS)
PATHS = {CHAT: "/v1/chat/completions", COMPLETIONS: "/v1/completions", EMBEDDINGS: "/v1/embeddings"}

ROLES = ("system", "user", "assistant", "tool", "developer", "function")
MAX_STOP = 4
MAX_N = 128
MAX_EMBEDDING_INPUTS = 2048


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why a request is refused: the OpenAI error's message, param and code."""

    message: str
    param: str
    code: str


def _kind(v: Any) -> str:
    """The JSON name of a value's type, for messages ("expected an integer, but got a string")."""
    t = type(v)
    if t is str:
        return "a string"
    if t is bool:
        return "a boolean"
    if t is int or t is float:
        return "a number"
    if t is list:
        return "an array"
    if t is dict:
        return "an object"
    return "null" if v is None else t.__name__


def _type_error(param: str, expected: str, v: Any) -> Invalid:
    return Invalid(
        f"Invalid type for '{param}': expected {expected}, but got {_kind(v)} instead.", param, "invalid_type"
    )


def _missing(param: str) -> Invalid:
    return Invalid(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def _is_int(v: Any) -> bool:
    # JSON has one number type: 16.0 is an integer to every OpenAI client; true is not.
    t = type(v)
    return t is int or (t is float and v.is_integer())


def _int(body: dict[str, Any], key: str, lo: int, hi: int | None = None) -> Invalid | None:
    v = body.get(key)
    if v is None:
        return None
    if not _is_int(v):
        return _type_error(key, "an integer", v)
    if v < lo:
        return Invalid(
            f"Invalid '{key}': integer below minimum value. Expected a value >= {lo}, but got {v} instead.",
            key,
            "integer_below_min_value",
        )
    if hi is not None and v > hi:
        return Invalid(
            f"Invalid '{key}': integer above maximum value. Expected a value <= {hi}, but got {v} instead.",
            key,
            "integer_above_max_value",
        )
    return None


def _number(body: dict[str, Any], key: str, lo: float, hi: float) -> Invalid | None:
    v = body.get(key)
    if v is None:
        return None
    t = type(v)
    if t is not float and t is not int:
        return _type_error(key, "a number", v)
    if v < lo:
        return Invalid(
            f"Invalid '{key}': decimal below minimum value. Expected a value >= {lo}, but got {v} instead.",
            key,
            "decimal_below_min_value",
        )
    if v > hi:
        return Invalid(
            f"Invalid '{key}': decimal above maximum value. Expected a value <= {hi}, but got {v} instead.",
            key,
            "decimal_above_max_value",
        )
    return None


def _bool(body: dict[str, Any], key: str) -> Invalid | None:
    v = body.get(key)
    if v is None or type(v) is bool:
        return None
    return _type_error(key, "a boolean", v)


def _str(body: dict[str, Any], key: str) -> Invalid | None:
    v = body.get(key)
    if v is None or type(v) is str:
        return None
    return _type_error(key, "a string", v)


def _object(body: dict[str, Any], key: str) -> Invalid | None:
    v = body.get(key)
    if v is None or type(v) is dict:
        return None
    return _type_error(key, "an object", v)


def _stop(body: dict[str, Any]) -> Invalid | None:
    v = body.get("stop")
    if v is None or type(v) is str:
        return None
    if type(v) is not list:
        return _type_error("stop", "a string or an array of strings", v)
    if len(v) > MAX_STOP:
        return Invalid(
            f"Invalid 'stop': array too long. Expected an array with maximum length {MAX_STOP}, but "
            f"got an array with length {len(v)} instead.",
            "stop",
            "array_above_max_length",
        )
    for i, s in enumerate(v):
        if type(s) is not str:
            return _type_error(f"stop[{i}]", "a string", s)
    return None


def _logit_bias(body: dict[str, Any]) -> Invalid | None:
    v = body.get("logit_bias")
    if v is None:
        return None
    if type(v) is not dict:
        return _type_error("logit_bias", "an object", v)
    for k, b in v.items():
        t = type(b)
        if t is not int and t is not float:
            return _type_error(f"logit_bias.{k}", "a number", b)
        if not -100 <= b <= 100:
            return Invalid(
                f"Invalid 'logit_bias.{k}': expected a value between -100 and 100, but got {b} instead.",
                f"logit_bias.{k}",
                "invalid_value",
            )
    return None


def _sampling(body: dict[str, Any]) -> Invalid | None:
    """The sampling fields chat and completions share."""
    return (
        _number(body, "temperature", 0, 2)
        or _number(body, "top_p", 0, 1)
        or _number(body, "presence_penalty", -2, 2)
        or _number(body, "frequency_penalty", -2, 2)
        or _int(body, "n", 1, MAX_N)
        or _int(body, "seed", -(2**63), 2**64 - 1)
        or _bool(body, "stream")
        or _object(body, "stream_options")
        or _stop(body)
        or _logit_bias(body)
        or _str(body, "user")
    )


# -- chat -------------------------------------------------------------------------------------
def _parts(content: list[Any], param: str) -> Invalid | None:
    """An array of content parts: objects with a string ``type`` (text, image_url, input_audio,
    file, refusal; backends add others, so the type's value is theirs to judge)."""
    if not content:
        return Invalid(
            f"Invalid '{param}': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            param,
            "empty_array",
        )
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        if type(part) is not dict:
            return _type_error(p, "an object", part)
        kind = part.get("type")
        if kind is None:
            return _missing(f"{p}.type")
        if type(kind) is not str:
            return _type_error(f"{p}.type", "a string", kind)
        if kind == "text" and type(part.get("text")) is not str:
            return (
                _missing(f"{p}.text")
                if part.get("text") is None
                else _type_error(f"{p}.text", "a string", part["text"])
            )
    return None


def _message(m: Any, i: int) -> Invalid | None:
    p = f"messages[{i}]"
    if type(m) is not dict:
        return _type_error(p, "an object", m)
    role = m.get("role")
    if role is None:
        return _missing(f"{p}.role")
    if type(role) is not str:
        return _type_error(f"{p}.role", "a string", role)
    if role not in ROLES:
        return Invalid(
            f"Invalid value: '{role[:100]}'. Supported values are: 'system', 'assistant', 'user', "
            "'function', 'tool', and 'developer'.",
            f"{p}.role",
            "invalid_value",
        )
    content = m.get("content")
    tc = type(content)
    if tc is list:
        bad = _parts(content, f"{p}.content")
        if bad:
            return bad
    elif content is None:
        # Only an assistant turn that calls tools (or a function), or a function result, may be empty.
        if role == "assistant":
            if m.get("tool_calls") is None and m.get("function_call") is None:
                return _missing(f"{p}.content")
        elif role != "function":
            return _missing(f"{p}.content")
    elif tc is not str:
        return _type_error(f"{p}.content", "a string or an array of content parts", content)
    name = m.get("name")
    if name is not None and type(name) is not str:
        return _type_error(f"{p}.name", "a string", name)
    if role == "tool":
        tcid = m.get("tool_call_id")
        if tcid is None:
            return _missing(f"{p}.tool_call_id")
        if type(tcid) is not str:
            return _type_error(f"{p}.tool_call_id", "a string", tcid)
    elif role == "assistant":
        calls = m.get("tool_calls")
        if calls is not None:
            if type(calls) is not list:
                return _type_error(f"{p}.tool_calls", "an array", calls)
            for j, call in enumerate(calls):
                if type(call) is not dict:
                    return _type_error(f"{p}.tool_calls[{j}]", "an object", call)
    elif role == "function" and type(name) is not str:
        return _missing(f"{p}.name")
    return None


def _tools(body: dict[str, Any]) -> Invalid | None:
    tools = body.get("tools")
    if tools is not None:
        if type(tools) is not list:
            return _type_error("tools", "an array", tools)
        for i, t in enumerate(tools):
            if type(t) is not dict:
                return _type_error(f"tools[{i}]", "an object", t)
            if type(t.get("type")) is not str:
                return (
                    _missing(f"tools[{i}].type")
                    if t.get("type") is None
                    else _type_error(f"tools[{i}].type", "a string", t["type"])
                )
    choice = body.get("tool_choice")
    if choice is not None and type(choice) is not str and type(choice) is not dict:
        return _type_error("tool_choice", "a string or an object", choice)
    fmt = body.get("response_format")
    if fmt is not None:
        if type(fmt) is not dict:
            return _type_error("response_format", "an object", fmt)
        if type(fmt.get("type")) is not str:
            return (
                _missing("response_format.type")
                if fmt.get("type") is None
                else _type_error("response_format.type", "a string", fmt["type"])
            )
    return _bool(body, "parallel_tool_calls")


def check_chat(body: dict[str, Any]) -> Invalid | None:
    messages = body.get("messages")
    if messages is None:
        return _missing("messages")
    if type(messages) is not list:
        return _type_error("messages", "an array", messages)
    if not messages:
        return Invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            "messages",
            "empty_array",
        )
    for i, m in enumerate(messages):
        bad = _message(m, i)
        if bad:
            return bad
    return (
        _int(body, "max_tokens", 1)
        or _int(body, "max_completion_tokens", 1)
        or _sampling(body)
        or _bool(body, "logprobs")
        or _int(body, "top_logprobs", 0, 20)
        or _tools(body)
    )


# -- completions ------------------------------------------------------------------------------
def _tokens(v: list[Any], param: str) -> Invalid | None:
    for j, t in enumerate(v):
        if type(t) is not int:
            return _type_error(f"{param}[{j}]", "an integer", t)
    return None


def _text_or_tokens(v: Any, param: str, what: str, max_items: int | None = None) -> Invalid | None:
    """A string, an array of strings, an array of token ids, or an array of such arrays."""
    if type(v) is str:
        return None
    if type(v) is not list:
        return _type_error(param, what, v)
    if not v:
        return Invalid(
            f"Invalid '{param}': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            param,
            "empty_array",
        )
    if max_items is not None and len(v) > max_items:
        return Invalid(
            f"Invalid '{param}': array too long. Expected an array with maximum length {max_items}, "
            f"but got an array with length {len(v)} instead.",
            param,
            "array_above_max_length",
        )
    first = type(v[0])
    if first is str:
        for j, s in enumerate(v):
            if type(s) is not str:
                return _type_error(f"{param}[{j}]", "a string", s)
        return None
    if first is int:
        return _tokens(v, param)
    if first is list:
        for j, row in enumerate(v):
            if type(row) is not list:
                return _type_error(f"{param}[{j}]", "an array of integers", row)
            if not row:
                return Invalid(
                    f"Invalid '{param}[{j}]': empty array. Expected an array with minimum length 1, "
                    "but got an empty array instead.",
                    f"{param}[{j}]",
                    "empty_array",
                )
            bad = _tokens(row, f"{param}[{j}]")
            if bad:
                return bad
        return None
    return _type_error(f"{param}[0]", "a string, an integer or an array of integers", v[0])


PROMPT_TYPES = "a string, an array of strings, an array of integers or an array of arrays of integers"


def check_completions(body: dict[str, Any]) -> Invalid | None:
    prompt = body.get("prompt")
    if prompt is None:
        return _missing("prompt")
    return (
        _text_or_tokens(prompt, "prompt", PROMPT_TYPES)
        or _int(body, "max_tokens", 0)
        or _sampling(body)
        or _int(body, "best_of", 0, 20)
        or _int(body, "logprobs", 0, 5)
        or _bool(body, "echo")
        or _str(body, "suffix")
    )


# -- embeddings -------------------------------------------------------------------------------
def check_embeddings(body: dict[str, Any]) -> Invalid | None:
    inp = body.get("input")
    if inp is None:
        return _missing("input")
    bad = _text_or_tokens(inp, "input", PROMPT_TYPES, MAX_EMBEDDING_INPUTS)
    if bad:
        return bad
    fmt = body.get("encoding_format")
    if fmt is not None and fmt != "float" and fmt != "base64":
        if type(fmt) is not str:
            return _type_error("encoding_format", "a string", fmt)
        return Invalid(
            f"Invalid value: '{fmt[:100]}'. Supported values are: 'float' and 'base64'.",
            "encoding_format",
            "invalid_value",
        )
    return _int(body, "dimensions", 1) or _str(body, "user")


CHECKS = {CHAT: check_chat, COMPLETIONS: check_completions, EMBEDDINGS: check_embeddings}


def check(endpoint: str, body: dict[str, Any]) -> Invalid | None:
    """None if ``body`` is a valid request for ``endpoint`` (chat, completions, embeddings)."""
    return CHECKS[endpoint](body)


def wrong_endpoint(model: str, endpoint: str, serves: frozenset[str]) -> Invalid:
    """The model is known but does not serve this endpoint (embeddings of a chat model…)."""
    where = ", ".join(PATHS[e] for e in ENDPOINTS if e in serves) or "nothing"
    return Invalid(
        f"the model `{model}` does not serve {PATHS[endpoint]}; it serves {where}", "model", "unsupported_endpoint"
    )
