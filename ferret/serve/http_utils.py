"""HTTP plumbing shared by the model worker and the OpenAI-compatible API."""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import StreamingResponse


class GuardedStreamingResponse(StreamingResponse):
    """A StreamingResponse that always runs ``on_close`` however the stream ends: finished, failed, or cut by the
    client. Starlette skips a response's background task when the client disconnects, which is how the original
    worker leaked its concurrency semaphore (docs/compatibility.md §11.2)."""

    def __init__(self, content, on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
