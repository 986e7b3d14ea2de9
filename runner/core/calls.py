"""The runner's side of one call: what the plugins changed, and the reply that says so.

``runner.plugin``'s Request and Response are the plugin author's view of a call. Every
change a plugin makes through them is written into an edits record defined here
(:class:`RequestEdits`, :class:`ResponseEdits`), which the dispatcher creates, hands to
the view, keeps, and encodes once the chain is done. The records are the whole
interface between the two layers: the encoder never reads a view's private state, and
the views never encode.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, TypeAlias

from runner.protocol.messages import (
    Entry,
    Rewrite,
    Stop,
    encode_pass_through_reply,
    encode_resp_call_reply,
    encode_rewrite_reply,
    encode_stop_reply,
)

__all__ = [
    "EXCLUDED_RESPONSE_HEADERS",
    "ChangeLog",
    "RequestEdits",
    "ResponseEdits",
    "encode_request_reply",
    "encode_response_reply",
    "request_action",
    "response_reply",
]

ChangeLog: TypeAlias = dict[str, tuple[str, list[str | None]]]
"""The names a plugin changed, in order of first change: key (lower-cased for headers)
-> (the name as last spelled, every value it has now; none means deleted)."""

# The gateway drops these names from a Rewrite's resp_headers without a word
# (apisix/plugins/ext-plugin/init.lua, exclude_resp_header), so the API refuses them.
EXCLUDED_RESPONSE_HEADERS = frozenset(
    {
        "connection",
        "content-length",
        "transfer-encoding",
        "location",
        "server",
        "www-authenticate",
        "content-encoding",
        "content-type",
        "content-location",
        "content-language",
    }
)

# Hop-by-hop headers of the upstream's response: never copied onto the client's response.
_FRAMING_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding"})


class EntryTable(Protocol):
    """A header table whose whole content is sent (a response's headers)."""

    def items(self) -> list[Entry]: ...


# One record is made per call. The fields are class attributes holding immutable
# defaults, and no __init__ runs: a record costs an allocation, and a field is written
# (into the instance) only when a plugin changes it. Never put a mutable default here.


class CallEdits:
    """What both phases record."""

    # Set while a blocking hook runs in a worker thread: run_sync reaches the loop
    # through it, and it is cleared when the hook ends so that a thread outliving its
    # call cannot ask the gateway on a connection that has moved on.
    loop: asyncio.AbstractEventLoop | None = None
    # A Stop ends the chain. Only a request can be stopped: a response's stays None.
    stop: Stop | None = None


class RequestEdits(CallEdits):
    """The changes the plugins of one request made so far."""

    path: str | None = None
    body: bytes | None = None
    # Set by the views on first use: most requests change none of them.
    headers: ChangeLog | None = None
    args: ChangeLog | None = None
    # Headers for the client's eventual response. They start empty, so the log holds
    # all of them; the gateway applies each name on its own, so the order of first
    # change serves as well as any.
    resp_headers: ChangeLog | None = None


class ResponseEdits(CallEdits):
    """The changes the plugins of one post-response call made so far."""

    status: int = 0  # 0: the upstream's status stands
    body: bytes | None = None
    header_log: ChangeLog | None = None  # set with headers, by the Response view
    headers: EntryTable | None = None  # the response's headers, as they are now


# ---------------------------------------------------------------------- HTTPReqCall


def encode_request_reply(call_id: int, edits: RequestEdits) -> bytes:
    """The HTTPReqCall reply payload for these edits, encoded without building the
    :func:`request_action` message first (the hot path; the tests hold both to the
    same bytes). ``call_id`` is the request's own, known to fit a uint32."""
    stop = edits.stop
    if stop is not None:
        return encode_stop_reply(call_id, stop)
    headers = edits.headers
    args = edits.args
    # Header changes, inlined: this runs once per call that sets a header.
    changed_headers: list[Entry] = []
    if headers:
        for name, values in headers.values():
            changed_headers.append((name, values[-1] if values else None))
    changed_args = _arg_changes(args) if args else []
    resp = edits.resp_headers
    resp_headers = _resp_header_entries(resp) if resp else []
    path = edits.path
    body = edits.body
    if changed_headers or changed_args or path is not None or resp_headers or body is not None:
        return encode_rewrite_reply(
            call_id, path, changed_headers, changed_args, resp_headers, body
        )
    return encode_pass_through_reply(call_id)


def request_action(edits: RequestEdits) -> Stop | Rewrite | None:
    """The message the edits stand for: the Stop, the Rewrite, or None if unchanged."""
    if edits.stop is not None:
        return edits.stop
    headers = [(n, v[-1] if v else None) for n, v in (edits.headers or {}).values()]
    args = _arg_changes(edits.args) if edits.args else []
    resp = edits.resp_headers
    resp_headers = tuple(_resp_header_entries(resp)) if resp else ()
    if headers or args or edits.path is not None or resp_headers or edits.body is not None:
        return Rewrite(edits.path, tuple(headers), tuple(args), resp_headers, edits.body)
    return None


def _arg_changes(log: ChangeLog) -> list[Entry]:
    """The gateway's merge rule: the first entry of a name replaces its values, further
    entries append, an entry without value deletes. A ``?flag`` that must be re-sent
    alongside new values can only be sent as ``flag=``."""
    out: list[Entry] = []
    for name, values in log.values():
        if not values:
            out.append((name, None))
        for value in values:  # a loop, not extend(genexpr): most names have one value
            out.append((name, "" if value is None else value))
    return out


def _resp_header_entries(log: ChangeLog) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, values in log.values():
        for value in values:
            if value is not None:  # never: values are checked strings when set
                out.append((name, value))
    return out


# --------------------------------------------------------------------- HTTPRespCall


def response_reply(edits: ResponseEdits) -> tuple[int, list[tuple[str, str]], bytes | None]:
    """``(status or 0, headers or [], body or None)`` as HTTPRespCall.Resp wants them.

    The gateway sets every header of a non-empty list on the client's response, so
    the framing headers of the upstream's response are left out: nginx frames the
    response itself, and a stale ``content-length`` would cut a replaced body.
    """
    headers: list[tuple[str, str]] = []
    table = edits.headers
    if table is not None and edits.header_log:
        body_replaced = edits.body is not None
        headers = [
            (n, v)
            for n, v in table.items()
            if v is not None
            and n.lower() not in _FRAMING_HEADERS
            and not (body_replaced and n.lower() == "content-length")
        ]
    return edits.status, headers, edits.body


def encode_response_reply(call_id: int, edits: ResponseEdits) -> bytes:
    """The HTTPRespCall reply payload for these edits."""
    return encode_resp_call_reply(call_id, *response_reply(edits))
