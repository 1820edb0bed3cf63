# SPDX-License-Identifier: Apache-2.0
"""TCP to Unix socket bridge for scripts/api-conformance.sh: schemathesis speaks HTTP over
TCP only, ember's API listens on a Unix socket. Usage: bridge.py SOCKET PORTFILE; listens on
127.0.0.1 (a free port, written to PORTFILE) and copies bytes both ways, one Unix connection
per TCP connection, so ember sees each client as it is (keep-alive, pipelining, close)."""
import asyncio
import os
import sys


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except OSError:
            pass


async def main(sock, portfile):
    async def client(tcp_r, tcp_w):
        try:
            unix_r, unix_w = await asyncio.open_unix_connection(sock)
        except OSError as e:
            print(f"bridge: cannot connect to {sock}: {e}", file=sys.stderr)
            tcp_w.close()
            return
        await asyncio.gather(pipe(tcp_r, unix_w), pipe(unix_r, tcp_w))

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with open(portfile + ".tmp", "w") as f:
        f.write(f"{port}\n")
    os.replace(portfile + ".tmp", portfile)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
