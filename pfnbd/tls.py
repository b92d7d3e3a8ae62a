"""TLS for NBD_OPT_STARTTLS: the server's X.509 credentials and the in-session upgrade.

The certificate directory holds the files GnuTLS-based peers (qemu-nbd, nbdkit) read:
`server-cert.pem` and `server-key.pem`, and `ca-cert.pem` when client certificates are
verified.  Python's `ssl` does the cryptography; `trio.SSLStream` carries it.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import trio

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"


class TlsConfigError(Exception):
    """The certificate directory cannot be used: the server does not start."""


class TlsHandshakeError(Exception):
    """A client's TLS handshake failed: that client is dropped."""


def server_context(directory: Path, verify_peer: bool) -> ssl.SSLContext:
    """A server context from `directory`; with `verify_peer`, clients must show a
    certificate signed by the CA in `ca-cert.pem`."""
    needed = [SERVER_CERT, SERVER_KEY] + ([CA_CERT] if verify_peer else [])
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise TlsConfigError(f"{directory} has no {', '.join(missing)}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # the spec: 1.2 or later by default
    try:
        context.load_cert_chain(directory / SERVER_CERT, directory / SERVER_KEY)
        if verify_peer:
            context.load_verify_locations(directory / CA_CERT)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as error:
        raise TlsConfigError(f"cannot load the certificates in {directory}: {error}") from None
    return context


class TlsStream(trio.abc.Stream):
    """A server-side `trio.SSLStream` where a client that closes its socket without
    a TLS close_notify reads as end of stream, as every NBD client may do after
    NBD_CMD_DISC.  Closing still sends our close_notify, as the spec asks."""

    def __init__(self, ssl_stream: trio.SSLStream) -> None:
        """Takes a stream whose handshake is done."""
        self._ssl_stream = ssl_stream
        self.version = ssl_stream.version() or "TLS"
        self.peer_subject = _common_name(ssl_stream.getpeercert())  # when one was verified

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            return await self._ssl_stream.receive_some(max_bytes)
        except trio.BrokenResourceError as error:
            if isinstance(error.__cause__, ssl.SSLEOFError):
                return b""
            raise

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._ssl_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._ssl_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._ssl_stream.aclose()


async def start_tls(stream: trio.abc.Stream, context: ssl.SSLContext | None) -> TlsStream:
    """Runs the server's side of the handshake on `stream` (the caller bounds its time)."""
    if context is None:
        raise RuntimeError("STARTTLS was accepted without a TLS context")
    ssl_stream = trio.SSLStream(stream, context, server_side=True)
    try:
        await ssl_stream.do_handshake()
    except trio.BrokenResourceError as error:
        raise TlsHandshakeError(f"TLS handshake failed: {_reason(error.__cause__)}") from None
    return TlsStream(ssl_stream)


def _common_name(certificate: dict | None) -> str | None:
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def _reason(error: BaseException | None) -> str:
    if isinstance(error, ssl.SSLEOFError) or error is None:
        return "the client closed the connection"
    if isinstance(error, ssl.SSLError) and error.reason:
        return error.reason  # e.g. TLSV1_ALERT_UNKNOWN_CA, CERTIFICATE_VERIFY_FAILED
    return str(error)
