"""A streamed response that stops as soon as its client goes away, and always releases what it streams from."""

from __future__ import annotations

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class WatchedStream(StreamingResponse):
    """Streams its body while watching the client; :meth:`closed` runs once the stream ends, finished or not.

    The client's disconnect is watched while the body waits for its next chunk too (between tokens), so a
    client that goes away stops the work behind the stream at once: :meth:`closed` closes an upstream request
    or cancels a generation.
    """

    async def closed(self) -> None:
        """Release what the body streams from; called once, shielded from cancellation."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def relay() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away while a chunk was sent
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(relay)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.closed()
