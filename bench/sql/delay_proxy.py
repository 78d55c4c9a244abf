"""A TCP proxy on 127.0.0.1 that delays the bytes from client to server by a fixed time, for
scripts/bench-sql-wire.sh's kagi-s3 target with BENCH_WIRE_S3_DELAY_MS: in front of the S3
server on this machine it gives each request the latency a bucket across a network would
(each chunk leaves DELAY_MS after it arrived, in order; the answers come back at once).

  delay_proxy.py LISTEN_PORT UPSTREAM_PORT DELAY_MS
"""

import asyncio
import sys
import time


async def delayed(reader, writer, delay):
    """Client to server: every chunk `delay` seconds after it arrived."""
    queue = asyncio.Queue()

    async def forward():
        while True:
            due, chunk = await queue.get()
            if chunk is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(forward())
    while True:
        chunk = await reader.read(65536)
        queue.put_nowait((time.monotonic() + delay, chunk or None))
        if not chunk:
            break
    await sender


async def direct(reader, writer):
    """Server to client, as it comes."""
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()
    writer.close()


async def main():
    listen, upstream, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000

    async def handle(client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(delayed(client_reader, server_writer, delay),
                             direct(server_reader, client_writer), return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
