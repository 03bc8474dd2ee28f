"""Short keyword names -> the spec's attribute names, with type checks.

Why a table: callers write ``h.request(model="tiny", input_tokens=11)`` on a
hot path; the table turns each keyword into the attribute name of
``shared/spec/TELEMETRY.md`` (sections 3-6) and checks the value's type once,
here, so that a wrong type is a clear ``TypeError`` naming the keyword instead
of a silently dropped attribute at the exporter.
"""

from __future__ import annotations

from typing import Any, Mapping

# keyword -> (attribute name, kind); kind is "str", "int" or "float".
SHORT_NAMES: dict[str, tuple[str, str]] = {
    # request spans (spec 3)
    "model": ("gen_ai.request.model", "str"),
    "response_model": ("gen_ai.response.model", "str"),
    "input_tokens": ("gen_ai.usage.input_tokens", "int"),
    "output_tokens": ("gen_ai.usage.output_tokens", "int"),
    "time_in_queue": ("gen_ai.latency.time_in_queue", "float"),
    "ttft": ("gen_ai.latency.time_to_first_token", "float"),
    "e2e": ("gen_ai.latency.e2e", "float"),
    "request_id": ("gen_ai.request.id", "str"),
    "session_id": ("session.id", "str"),
    "shape_len": ("tailscope.shape.len", "int"),
    "batch_id": ("tailscope.batch.id", "str"),
    "kv_cached_tokens": ("tailscope.kv.cached_tokens", "int"),
    "kv_preemptions": ("tailscope.kv.preemptions", "int"),
    "gpu_index": ("tailscope.gpu.index", "int"),
    "priority": ("tailscope.priority", "str"),
    "replica_started_at": ("tailscope.replica.started_at", "float"),
    # provider calls (spec 6)
    "system": ("gen_ai.system", "str"),
    "server_address": ("server.address", "str"),
    "region": ("tailscope.provider.region", "str"),
}

# start_batch keywords (spec 5).
BATCH_NAMES: dict[str, tuple[str, str]] = {
    "size": ("tailscope.batch.size", "int"),
    "max_len": ("tailscope.batch.max_len", "int"),
    "min_len": ("tailscope.batch.min_len", "int"),
    "real_tokens": ("tailscope.batch.real_tokens", "int"),
    "padded_tokens": ("tailscope.batch.padded_tokens", "int"),
    "wait_s": ("tailscope.batch.wait", "float"),
}

# Stage spans (spec 3, 6): role -> is it a CLIENT span.
STAGES: dict[str, bool] = {
    "queue": False,
    "prefill": False,
    "decode": False,
    "provider_call": True,
    "model_load": False,
}

KV_REASONS = ("capacity", "preemption", "prefix_lru")

ROLE = "tailscope.role"
BATCH_ID = "tailscope.batch.id"

_OK_SCALARS = (str, bool, int, float)


def _check(key: str, kind: str, value: Any) -> Any:
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{key} must be an int, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{key} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a str, got {value!r}")
    return value


def map_keywords(
    keywords: Mapping[str, Any],
    into: dict[str, Any],
    table: Mapping[str, tuple[str, str]] = SHORT_NAMES,
) -> dict[str, Any]:
    """Add ``keywords`` (short names) to ``into`` under their spec names.

    ``None`` values are skipped so callers can pass optional fields through.

    Raises:
        TypeError: an unknown keyword (the message lists the known ones) or a
            value of the wrong type.
    """
    for key, value in keywords.items():
        if value is None:
            continue
        try:
            name, kind = table[key]
        except KeyError:
            known = ", ".join(sorted(table))
            raise TypeError(
                f"unknown attribute keyword {key!r}; known: {known}; "
                "pass any other attribute by its dotted name in attributes={...}"
            ) from None
        into[name] = _check(key, kind, value)
    return into


def check_attributes(attributes: Mapping[str, Any], into: dict[str, Any]) -> dict[str, Any]:
    """Add free-form dotted attributes, checking they are valid OTel values.

    OTel attribute values are str/bool/int/float or homogeneous sequences of
    them; anything else would be dropped by the SDK with only a warning.
    """
    for key, value in attributes.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"attribute names must be non-empty strings, got {key!r}")
        if value is None:
            continue
        if isinstance(value, _OK_SCALARS):
            into[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, _OK_SCALARS) for v in value):
            into[key] = tuple(value)
        else:
            raise TypeError(
                f"attribute {key!r} must be a str, bool, int, float or a list of them, got {value!r}"
            )
    return into
