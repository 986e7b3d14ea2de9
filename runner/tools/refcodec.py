"""Transitional alias: the gateway's side of ``runner.protocol.messages`` under the names
``runner.testing`` still imports from here. The generated-code reference codec that
used to live here is ``tests/refcodec.py`` now; nothing here imports ``flatbuffers``.

Delete this module once ``runner/testing.py`` no longer imports it.
"""

from __future__ import annotations

from runner.protocol.messages import Rewrite as RewriteAction
from runner.protocol.messages import Stop as StopAction
from runner.protocol.messages import (
    decode_req_call_reply,
    decode_resp_call_reply,
    encode_req_call,
    encode_resp_call,
)

__all__ = [
    "RewriteAction",
    "StopAction",
    "decode_req_call_reply",
    "decode_resp_call_reply",
    "encode_req_call",
    "encode_resp_call",
]
