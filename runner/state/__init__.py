"""Shared state for plugins: counters, values with a TTL and token buckets that hold
across every worker process and, with Redis, every gateway node.

A plugin gets a ``State`` handle in its own namespace and awaits its methods::

    answer = await state.take(client, rate=10, burst=20, if_unavailable="allow")
    if not answer.allowed:
        request.stop(429, headers={"retry-after": str(math.ceil(answer.retry_after))})

The server opens one ``StateStore`` with ``open_state(url)``: ``local://`` (default: one
SQLite file on tmpfs shared by the workers of this node), ``redis://...`` (every node on
that Redis) or ``memory://`` (this process only). See ``api.State`` for the rules.
"""

from runner.state.api import IfUnavailable, State, StateStore
from runner.state.model import StateUnavailable, Take
from runner.state.url import DEFAULT_STATE_URL, check_state_url, open_state

__all__ = [
    "DEFAULT_STATE_URL",
    "IfUnavailable",
    "State",
    "StateStore",
    "StateUnavailable",
    "Take",
    "check_state_url",
    "open_state",
]
