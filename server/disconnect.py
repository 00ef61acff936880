"""Stop working for an HTTP client that has gone away.

Starlette runs a handler to its end even when the client disconnects, so a client that gave up (its timeout
passed, a user closed the page) still held its admission slots and cost a batch row until the response was
thrown away; under overload, with clients timing out and retrying, that is work done twice. gRPC cancels the
handler by itself. Here the work races the connection: if the client leaves first, the work is cancelled
(its queued images are skipped by the batcher, its slots released) and the request ends as 499.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from server.errors import ClientClosedRequest

T = TypeVar("T")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or `ClientClosedRequest` once the client disconnects (the body must be read already)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # let it release what it holds before the error response goes out
    if task.cancelled():
        raise ClientClosedRequest("the client closed the connection before the answer was ready")
    return task.result()


async def _disconnect(request: Request) -> None:
    # With the body read, the server's next ASGI message for this request is `http.disconnect`.
    while (await request.receive())["type"] != "http.disconnect":
        pass
