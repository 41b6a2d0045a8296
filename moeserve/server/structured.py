"""The API's ways to ask for structured outputs, turned into one StructuredOutputsParams:

    response_format {"type": "json_object"} | {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    vLLM's guided_json / guided_regex / guided_choice / guided_grammar, and structured_outputs {json|regex|...}

At most one of them per request. A spec the grammar library cannot compile is a 400 naming the field it came in.
"""

from __future__ import annotations

from moeserve.sampling_params import InvalidSamplingParam, StructuredOutputsParams, structured_outputs_params
from moeserve.server.errors import bad_request

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _from_response_format(rf: dict) -> dict | None:
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("name", ""), str):
            raise bad_request("response_format.json_schema must be an object with a name and a schema.",
                              param="response_format")
        schema = js.get("schema")
        if schema is None:  # a name alone: any JSON object
            return {"json_object": True}
        return {"json": schema}
    raise bad_request(f"response_format.type must be 'text', 'json_object' or 'json_schema'; got {kind!r}.",
                      param="response_format")


def structured_outputs_of(req) -> StructuredOutputsParams | None:
    asked: list[tuple[str, dict]] = []  # (the API field, the spec it gives)
    rf = getattr(req, "response_format", None)
    if rf:
        spec = _from_response_format(rf)
        if spec is not None:
            asked.append(("response_format", spec))
    for field, kind in _GUIDED.items():
        value = getattr(req, field, None)
        if value is not None:
            asked.append((field, {kind: value}))
    if getattr(req, "structured_outputs", None) is not None:
        asked.append(("structured_outputs", req.structured_outputs))
    if not asked:
        return None
    if len(asked) > 1:
        raise bad_request(f"Ask for one structured output at a time; got {[f for f, _ in asked]}.",
                          param=asked[1][0])
    field, spec = asked[0]
    try:
        return structured_outputs_params(spec)
    except InvalidSamplingParam as e:
        raise bad_request(f"{field}: {e}", param=field) from None
