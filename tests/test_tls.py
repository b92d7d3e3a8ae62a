"""TLS (NBD_OPT_STARTTLS): the rules of the spec's three server modes, then `pfnbd serve
--tls` with a PKI made by examples/make-tls-certs.sh, driven by real clients: libnbd
(nbdinfo, nbdcopy), QEMU (qemu-io, qemu-img) and nbd-client, plus a raw client for
what real clients never do (haggle in clear before STARTTLS, inject bytes after it,
stall in the handshake)."""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import attrs
import pytest

from conftest import Cli, ServeProcess, pfnbd_command, run
from pfnbd import protocol as p
from pfnbd.negotiation import ExportInfo, Negotiation, OptionOutcome, State, TlsMode

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MiB = 1 << 20
SOCKET_TIMEOUT = 10  # seconds any raw-socket step may take
CLIENT_CERT_NAME = "pfnbd-client"  # make-tls-certs.sh's default client certificate name

# --- the PKI ------------------------------------------------------------------------------


def make_pki(directory: Path) -> Path:
    """A CA and certificates naming localhost, 127.0.0.1 and ::1 (the script's default)."""
    run(str(EXAMPLES / "make-tls-certs.sh"), str(directory), timeout=120)
    return directory


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    """The CA clients trust, with `server/` for pfnbd and `client/` for clients."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory) -> Path:
    """A second, unrelated CA: its clients distrust our server and we distrust them."""
    return make_pki(tmp_path_factory.mktemp("other-pki"))


def client_dir(tmp_path: Path, name: str, ca_from: Path, certificate_from: Path | None) -> Path:
    """A client certificate directory trusting `ca_from`'s CA, with the client
    certificate of `certificate_from` (or none)."""
    directory = tmp_path / name
    directory.mkdir()
    shutil.copy(ca_from / "ca-cert.pem", directory)
    if certificate_from is not None:
        for file in ("client-cert.pem", "client-key.pem"):
            shutil.copy(certificate_from / "client" / file, directory)
    return directory


# --- the clients ----------------------------------------------------------------------------


def nbds_unix(socket_path: Path, certificates: Path, export: str = "test_v1") -> str:
    return f"nbds+unix:///{export}?socket={socket_path}&tls-certificates={certificates}"


def qemu_tls_object(certificates: Path) -> str:
    return f"tls-creds-x509,id=tls0,dir={certificates},endpoint=client"


def qemu_unix_opts(socket_path: Path, export: str = "test_v1") -> str:
    """`--image-opts` for a volume on a Unix socket over TLS; QEMU wants a name to check
    the server certificate against even there (the certificates name localhost)."""
    return (f"driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={socket_path},"
            f"file.export={export},file.tls-creds=tls0,file.tls-hostname=localhost")


def qemu_tcp_opts(host: str, port: int, export: str = "test_v1") -> str:
    """Over TCP, QEMU checks the certificate against the host it connects to."""
    return (f"driver=raw,file.driver=nbd,file.server.type=inet,file.server.host={host},"
            f"file.server.port={port},file.export={export},file.tls-creds=tls0")


def qemu_io(certificates: Path, image_opts: str, *commands: str, check: bool = True):
    args = ["qemu-io", "--object", qemu_tls_object(certificates), "--image-opts", image_opts]
    for command in commands:
        args += ["-c", command]
    return run(*args, timeout=60, check=check)


def nbdinfo(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("nbdinfo", *args, timeout=60, check=check)


def assert_refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    shown = f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.returncode != 0, shown
    for word in words:
        assert word in result.stderr, shown


def log_lines(server, event: str) -> list[str]:
    """The server's log lines for one event (`connection`, `stats`, ...)."""
    return [line for line in server.log().splitlines() if f"pfnbd: {event} " in line]


def connection_lines(server, count: int, timeout: float = 10) -> list[str]:
    """The `connection` lines of `count` ended connections, by connection id: a client
    may exit before the server has logged its end."""
    deadline = time.monotonic() + timeout
    while len(lines := log_lines(server, "connection")) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(lines) == count, f"expected {count} connection lines:\n{server.log()}"
    return sorted(lines, key=lambda line: int(re.search(r" id=(\d+)", line).group(1)))


# --- the rules, on the sans-I/O negotiation ----------------------------------------------

EXPORT = ExportInfo("test_v1", "a volume", MiB,
                    p.TransmissionFlags.HAS_FLAGS | p.TransmissionFlags.SEND_FLUSH)
INFO_REQUEST = p.info_request.build(dict(name="test_v1", requests=[]))
META_REQUEST = p.meta_context_request.build(dict(name="test_v1", queries=[p.BASE_ALLOCATION]))
UNKNOWN_OPTION = 99
# Every option a client may send before STARTTLS, with valid data.
OPTIONS = {
    p.Option.LIST: b"",
    p.Option.PEEK_EXPORT: b"",
    p.Option.INFO: INFO_REQUEST,
    p.Option.GO: INFO_REQUEST,
    p.Option.STRUCTURED_REPLY: b"",
    p.Option.LIST_META_CONTEXT: META_REQUEST,
    p.Option.SET_META_CONTEXT: META_REQUEST,
    p.Option.EXTENDED_HEADERS: b"",
    UNKNOWN_OPTION: b"",
}


def option_id(option: int) -> str:
    try:
        return p.Option(option).name
    except ValueError:
        return f"option{option}"


def negotiation(mode: TlsMode) -> Negotiation:
    haggling = Negotiation([EXPORT], mode)
    haggling.receive_client_flags(
        p.client_flags.build(dict(flags=p.ClientFlags.FIXED_NEWSTYLE | p.ClientFlags.NO_ZEROES))
    )
    return haggling


def reply_types(outcome: OptionOutcome) -> list[p.OptionReply]:
    return [p.OptionReply(p.option_reply_header.parse(reply).type) for reply in outcome.replies]


def start_tls(haggling: Negotiation) -> None:
    outcome = haggling.receive_option(p.Option.STARTTLS, b"")
    assert reply_types(outcome) == [p.OptionReply.ACK]
    assert outcome.start_tls and haggling.state is State.STARTING_TLS
    haggling.tls_started()
    assert haggling.state is State.OPTIONS


def export_flags(outcome: OptionOutcome) -> p.TransmissionFlags:
    """The transmission flags in the NBD_INFO_EXPORT reply of an INFO or GO."""
    header_size = p.option_reply_header.sizeof()
    for reply in outcome.replies:
        if p.option_reply_header.parse(reply).type == p.OptionReply.INFO:
            info = p.info_reply.parse(reply[header_size:])
            if info.type == p.Info.EXPORT:
                return p.TransmissionFlags(info.info.flags)
    raise AssertionError("no NBD_INFO_EXPORT in the reply")


@pytest.mark.parametrize("option", OPTIONS, ids=option_id)
def test_require_answers_options_before_tls_with_tls_reqd(option):
    haggling = negotiation(TlsMode.REQUIRE)

    outcome = haggling.receive_option(option, OPTIONS[option])

    assert reply_types(outcome) == [p.OptionReply.ERR_TLS_REQD]
    assert haggling.state is State.OPTIONS and outcome.agreement is None


def test_require_answers_an_oversized_option_before_tls_with_tls_reqd():
    outcome = negotiation(TlsMode.REQUIRE).receive_oversized_option(p.Option.LIST)

    assert reply_types(outcome) == [p.OptionReply.ERR_TLS_REQD]


def test_require_disconnects_export_name_before_tls():
    haggling = negotiation(TlsMode.REQUIRE)

    outcome = haggling.receive_option(p.Option.EXPORT_NAME, b"test_v1")

    assert outcome.replies == [] and outcome.close and outcome.agreement is None
    assert haggling.state is State.CLOSED


def test_require_acknowledges_abort_before_tls():
    haggling = negotiation(TlsMode.REQUIRE)

    outcome = haggling.receive_option(p.Option.ABORT, b"")

    assert reply_types(outcome) == [p.OptionReply.ACK] and outcome.close


@pytest.mark.parametrize("mode", [TlsMode.ON, TlsMode.REQUIRE], ids=lambda m: m.value)
def test_no_option_is_refused_for_want_of_tls_once_tls_runs(mode):
    haggling = negotiation(mode)
    start_tls(haggling)

    for option, data in OPTIONS.items():
        if option != p.Option.GO:
            assert p.OptionReply.ERR_TLS_REQD not in reply_types(haggling.receive_option(option, data))
    outcome = haggling.receive_option(p.Option.GO, INFO_REQUEST)

    assert outcome.agreement is not None and outcome.agreement.export == EXPORT


def test_off_refuses_starttls_by_policy_and_never_requires_tls():
    haggling = negotiation(TlsMode.OFF)

    refused = haggling.receive_option(p.Option.STARTTLS, b"")
    answers = {option: reply_types(haggling.receive_option(option, data))
               for option, data in OPTIONS.items() if option != p.Option.GO}

    assert reply_types(refused) == [p.OptionReply.ERR_POLICY] and not refused.start_tls
    assert haggling.state is State.OPTIONS and not haggling.tls_active
    assert all(p.OptionReply.ERR_TLS_REQD not in types for types in answers.values()), answers
    assert answers[p.Option.LIST] == [p.OptionReply.SERVER, p.OptionReply.ACK]


def test_on_serves_options_in_clear_and_still_accepts_starttls():
    haggling = negotiation(TlsMode.ON)

    listed = haggling.receive_option(p.Option.LIST, b"")
    start_tls(haggling)

    assert reply_types(listed) == [p.OptionReply.SERVER, p.OptionReply.ACK]
    assert haggling.tls_active


@pytest.mark.parametrize("mode", [TlsMode.ON, TlsMode.REQUIRE], ids=lambda m: m.value)
def test_a_second_starttls_is_invalid(mode):
    haggling = negotiation(mode)
    start_tls(haggling)

    outcome = haggling.receive_option(p.Option.STARTTLS, b"")

    assert reply_types(outcome) == [p.OptionReply.ERR_INVALID] and not outcome.start_tls
    assert haggling.state is State.OPTIONS


@pytest.mark.parametrize("mode", list(TlsMode), ids=lambda m: m.value)
def test_starttls_with_data_is_invalid(mode):
    haggling = negotiation(mode)

    outcome = haggling.receive_option(p.Option.STARTTLS, b"x")

    assert reply_types(outcome) == [p.OptionReply.ERR_INVALID] and not outcome.start_tls
    assert haggling.state is State.OPTIONS


@pytest.mark.parametrize("reply_format", [p.Option.STRUCTURED_REPLY, p.Option.EXTENDED_HEADERS],
                         ids=["structured-replies", "extended-headers"])
def test_nothing_negotiated_before_starttls_survives_it(reply_format):
    haggling = negotiation(TlsMode.ON)
    assert reply_types(haggling.receive_option(reply_format, b"")) == [p.OptionReply.ACK]
    assert reply_types(haggling.receive_option(p.Option.SET_META_CONTEXT, META_REQUEST)) == [
        p.OptionReply.META_CONTEXT, p.OptionReply.ACK]

    start_tls(haggling)
    outcome = haggling.receive_option(p.Option.GO, INFO_REQUEST)

    agreement = outcome.agreement
    assert agreement is not None and agreement.meta_contexts == {}
    assert not agreement.structured_replies and not agreement.extended_headers
    assert not export_flags(outcome) & p.TransmissionFlags.SEND_DF  # DF only with structured replies


def test_options_wait_until_the_driver_finished_the_handshake():
    haggling = negotiation(TlsMode.ON)
    haggling.receive_option(p.Option.STARTTLS, b"")

    with pytest.raises(RuntimeError):
        haggling.receive_option(p.Option.LIST, b"")


# --- a raw client, against the real server ------------------------------------------------


class RawClient:
    """Just enough NBD to haggle by hand over a Unix socket, in clear or in TLS."""

    def __init__(self, socket_path: Path) -> None:
        self.sock: socket.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(SOCKET_TIMEOUT)
        self.sock.connect(str(socket_path))
        greeting = self.receive(p.greeting.sizeof())
        assert p.greeting.parse(greeting).flags & p.HandshakeFlags.FIXED_NEWSTYLE
        self.sock.sendall(struct.pack(">I", p.ClientFlags.FIXED_NEWSTYLE | p.ClientFlags.NO_ZEROES))

    def close(self) -> None:
        self.sock.close()

    def receive(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"server closed the connection after {len(data)} of {n} bytes")
            data += chunk
        return data

    def closed_by_server(self) -> bool:
        """Waits (bounded by the socket timeout) for the server to close."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    @staticmethod
    def option_bytes(option: int, data: bytes = b"") -> bytes:
        return struct.pack(">QII", p.IHAVEOPT, option, len(data)) + data

    def replies(self) -> list[tuple[p.OptionReply, bytes]]:
        """Option replies up to the final one (ACK or an error)."""
        replies = []
        while True:
            header = p.option_reply_header.parse(self.receive(p.option_reply_header.sizeof()))
            reply = p.OptionReply(header.type)
            replies.append((reply, self.receive(header.length)))
            if reply == p.OptionReply.ACK or reply.is_error:
                return replies

    def option(self, option: int, data: bytes = b"") -> list[tuple[p.OptionReply, bytes]]:
        self.sock.sendall(self.option_bytes(option, data))
        return self.replies()

    def start_tls(self, certificates: Path) -> None:
        """The client side of the handshake, after the server acknowledged STARTTLS."""
        context = ssl.create_default_context(cafile=certificates / "ca-cert.pem")
        context.load_cert_chain(certificates / "client-cert.pem", certificates / "client-key.pem")
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def go(self) -> p.TransmissionFlags:
        replies = self.option(p.Option.GO, INFO_REQUEST)
        assert replies[-1][0] == p.OptionReply.ACK, replies
        for reply, payload in replies:
            info = p.info_reply.parse(payload) if reply == p.OptionReply.INFO else None
            if info is not None and info.type == p.Info.EXPORT:
                return p.TransmissionFlags(info.info.flags)
        raise AssertionError(f"GO had no NBD_INFO_EXPORT: {replies}")

    def request(self, command: p.Command, offset: int, length: int) -> None:
        self.sock.sendall(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, command, 7, offset, length))

    def simple_reply(self) -> int:
        """The error of a simple reply (a structured one fails the test)."""
        magic, error, cookie = struct.unpack(">IIQ", self.receive(16))
        assert magic == p.SIMPLE_REPLY_MAGIC, f"reply magic {magic:#x}: not a simple reply"
        assert cookie == 7
        return error


def types(replies: list[tuple[p.OptionReply, bytes]]) -> list[p.OptionReply]:
    return [reply for reply, _ in replies]


@pytest.fixture
def raw_client():
    clients: list[RawClient] = []

    def connect(socket_path: Path) -> RawClient:
        clients.append(RawClient(socket_path))
        return clients[-1]

    yield connect
    for client in clients:
        client.close()


def tls_server(start_server, pki: Path, mode: str, *extra: str):
    return start_server(None, "--tls", mode, "--tls-certificates", str(pki / "server"), *extra)


def test_options_agreed_in_clear_are_forgotten_after_starttls(start_server, pki, raw_client):
    server = tls_server(start_server, pki, "on")
    client = raw_client(server.socket)
    assert types(client.option(p.Option.STRUCTURED_REPLY)) == [p.OptionReply.ACK]
    assert types(client.option(p.Option.SET_META_CONTEXT, META_REQUEST)) == [
        p.OptionReply.META_CONTEXT, p.OptionReply.ACK]

    assert types(client.option(p.Option.STARTTLS)) == [p.OptionReply.ACK]
    client.start_tls(pki / "client")
    flags = client.go()
    client.request(p.Command.READ, 0, 512)
    read_error = client.simple_reply()
    client.receive(512)
    client.request(p.Command.BLOCK_STATUS, 0, 512)
    block_status_error = client.simple_reply()

    assert not flags & p.TransmissionFlags.SEND_DF  # structured replies were not kept...
    assert read_error == 0  # ...so replies are simple...
    assert block_status_error == p.Errno.EINVAL  # ...and no metadata context survived
    client.request(p.Command.DISC, 0, 0)
    (line,) = connection_lines(server, 1)
    assert "tls=TLSv1" in line and "replies=simple" in line and "contexts=" not in line, line


def test_bytes_sent_in_clear_after_starttls_are_never_read_as_options(start_server, pki, raw_client):
    server = tls_server(start_server, pki, "on")
    client = raw_client(server.socket)

    # A man in the middle appends an option to STARTTLS, in the same segment.
    client.sock.sendall(client.option_bytes(p.Option.STARTTLS)
                        + client.option_bytes(p.Option.STRUCTURED_REPLY))
    assert types(client.replies()) == [p.OptionReply.ACK]
    client.start_tls(pki / "client")
    flags = client.go()

    assert not flags & p.TransmissionFlags.SEND_DF, "the injected STRUCTURED_REPLY was obeyed"


def test_starttls_twice_is_invalid_and_the_session_goes_on(start_server, pki, raw_client):
    server = tls_server(start_server, pki, "require")
    client = raw_client(server.socket)
    client.option(p.Option.STARTTLS)
    client.start_tls(pki / "client")

    second = client.option(p.Option.STARTTLS)
    listed = client.option(p.Option.LIST)

    assert types(second) == [p.OptionReply.ERR_INVALID]
    assert types(listed) == [p.OptionReply.SERVER, p.OptionReply.ACK]


def test_require_drops_export_name_before_tls(start_server, pki, raw_client):
    server = tls_server(start_server, pki, "require")
    client = raw_client(server.socket)

    client.sock.sendall(client.option_bytes(p.Option.EXPORT_NAME, b"test_v1"))

    assert client.closed_by_server()
    assert 'end="closed in negotiation"' in connection_lines(server, 1)[0]


def test_a_stalled_tls_handshake_times_out_while_others_are_served(start_server, pki, raw_client):
    server = tls_server(start_server, pki, "require", "--handshake-limit", "1")
    client = raw_client(server.socket)
    assert types(client.option(p.Option.STARTTLS)) == [p.OptionReply.ACK]
    started = time.monotonic()

    # Our side never sends its ClientHello; a real client is served meanwhile.
    size = nbdinfo("--size", nbds_unix(server.socket, pki / "client")).stdout
    closed = client.closed_by_server()
    waited = time.monotonic() - started

    assert size.strip() == str(64 * MiB)
    assert closed and waited < 5, f"closed={closed} after {waited:.1f} s"
    assert 'end="handshake timed out"' in connection_lines(server, 2)[0]


# --- real clients -----------------------------------------------------------------------------


def test_libnbd_and_qemu_read_and_write_over_tls_on_a_unix_socket(start_server, pki, tmp_path):
    server = tls_server(start_server, pki, "require")
    certificates = pki / "client"
    data = tmp_path / "data.bin"
    data.write_bytes(random_bytes(4 * MiB))

    # libnbd writes, QEMU compares; QEMU writes, libnbd reads back.
    run("nbdcopy", "--connections=1", str(data), nbds_unix(server.socket, certificates), timeout=120)
    compared = run("qemu-img", "compare", "--object", qemu_tls_object(certificates), "--image-opts",
                   f"driver=raw,file.driver=file,file.filename={data}",
                   qemu_unix_opts(server.socket), timeout=120, check=False)
    qemu_io(certificates, qemu_unix_opts(server.socket), f"write -P 0xa5 {8 * MiB} {MiB}")
    back = tmp_path / "back.bin"
    run("nbdcopy", "--connections=1", nbds_unix(server.socket, certificates), str(back), timeout=120)
    info = nbdinfo("--json", nbds_unix(server.socket, certificates)).stdout

    assert compared.returncode == 0, compared.stdout + compared.stderr
    content = back.read_bytes()
    assert hashlib.sha256(content[:4 * MiB]).digest() == hashlib.sha256(data.read_bytes()).digest()
    assert content[8 * MiB:9 * MiB] == b"\xa5" * MiB
    assert '"TLS": true' in info, info
    connections = connection_lines(server, 5)  # nbdcopy, qemu-img, qemu-io, nbdcopy, nbdinfo
    assert all("tls=TLSv1" in line for line in connections), connections


def random_bytes(n: int) -> bytes:
    return hashlib.shake_256(b"pfnbd tls").digest(n)


@pytest.fixture
def launch(cli: Cli, tmp_path: Path):
    """Factory: `pfnbd serve --volume test_v1 ARGS` (or the whole `command` given) for
    listeners the `start_server` fixture does not know (TCP, port 0); waits for its
    `serving` line and reads its addresses from it."""
    launched: list[Launched] = []

    def start(*args: str, volumes: tuple[str, ...] = ("test_v1",), command: list[str] | None = None,
              **popen) -> Launched:
        exports = []
        for name in volumes:
            if name not in cli.run("volume", "list").stdout.split():
                cli.run("volume", "create", name, "--size", "64M")
            exports += ["--volume", name]
        log_path = tmp_path / f"launched{len(launched)}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(command or pfnbd_command("serve", *exports, *args), env=cli.env,
                                       stdout=log, stderr=subprocess.STDOUT, text=True, **popen)
        launched.append(Launched(process, log_path))
        launched[-1].wait_until_serving()
        return launched[-1]

    yield start
    for server in launched:
        if server.process.poll() is None:
            code = server.stop()
            assert code == 0, f"pfnbd serve exited {code} on SIGTERM:\n{server.log()}"


@attrs.define
class Launched(ServeProcess):
    listen: list[str] = attrs.Factory(list)  # as the `serving` line shows them

    def wait_until_serving(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (match := re.search(r"pfnbd: serving .*listen=(\S+)", self.log())) is None:
            if self.process.poll() is not None:
                raise AssertionError(f"pfnbd serve exited {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"pfnbd serve did not start in {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        self.listen = match.group(1).split(",")

    @property
    def port(self) -> int:
        return int(self.listen[0].rsplit(":", 1)[1])


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def test_qemu_and_libnbd_check_the_server_certificate_over_tcp(launch, pki, host):
    server = launch("--bind", host, "--port", "0", "--tls", "require",
                    "--tls-certificates", str(pki / "server"))
    certificates = pki / "client"
    url_host = f"[{host}]" if ":" in host else host

    written = qemu_io(certificates, qemu_tcp_opts(host, server.port), "write -P 0x3c 0 64k",
                      "read -P 0x3c 0 64k")
    size = nbdinfo("--size", f"nbds://{url_host}:{server.port}/test_v1?tls-certificates={certificates}")

    assert server.listen == [f"{url_host}:{server.port}"]
    assert "read 65536/65536" in written.stdout
    assert size.stdout.strip() == str(64 * MiB)


def test_nbd_client_lists_exports_over_tls(start_server, pki):
    server = tls_server(start_server, pki, "require")
    certificates = pki / "client"

    listed = run("nbd-client", "-l", "-unix", str(server.socket), "-enable-tls",
                 "-cacertfile", str(certificates / "ca-cert.pem"),
                 "-certfile", str(certificates / "client-cert.pem"),
                 "-keyfile", str(certificates / "client-key.pem"), "-tlshostname", "localhost",
                 timeout=60)

    assert "test_v1" in listed.stdout, listed.stdout
    assert "tls=TLSv1" in connection_lines(server, 1)[0]


def test_require_refuses_clients_that_do_not_start_tls(start_server, pki):
    server = tls_server(start_server, pki, "require")

    plain_libnbd = nbdinfo("--size", server.uri(), check=False)
    plain_list = nbdinfo("--list", f"nbd+unix:///?socket={server.socket}", check=False)
    plain_qemu = run("qemu-io", "-f", "raw", server.uri(), "-c", "read 0 512", timeout=60, check=False)
    secure = nbdinfo("--size", nbds_unix(server.socket, pki / "client"))

    assert_refused(plain_libnbd, "requires TLS")
    assert_refused(plain_list)
    assert_refused(plain_qemu, "TLS negotiation required")
    assert secure.stdout.strip() == str(64 * MiB)
    lines = connection_lines(server, 4)
    assert all("tls=" not in line for line in lines[:3]) and "tls=TLSv1" in lines[3], lines


def test_off_refuses_starttls_and_serves_in_clear(start_server, pki):
    server = start_server()

    secure = nbdinfo("--size", nbds_unix(server.socket, pki / "client"), check=False)
    plain = nbdinfo("--size", server.uri())

    assert_refused(secure)
    assert plain.stdout.strip() == str(64 * MiB)
    assert not any("tls=" in line for line in connection_lines(server, 2))


def test_on_serves_clients_with_and_without_tls(start_server, pki):
    server = tls_server(start_server, pki, "on")

    plain = nbdinfo("--size", server.uri())
    secure = nbdinfo("--size", nbds_unix(server.socket, pki / "client"))
    qemu_plain = run("qemu-io", "-f", "raw", server.uri(), "-c", "read 0 512", timeout=60)
    qemu_secure = qemu_io(pki / "client", qemu_unix_opts(server.socket), "read 0 512")

    assert plain.stdout == secure.stdout == f"{64 * MiB}\n"
    assert "read 512/512" in qemu_plain.stdout and "read 512/512" in qemu_secure.stdout
    with_tls = ["tls=TLSv1" in line for line in connection_lines(server, 4)]
    assert with_tls == [False, True, False, True], server.log()


def test_a_client_trusting_another_ca_fails_and_the_server_goes_on(launch, pki, other_pki):
    # Over TCP: libnbd 1.14 checks the server certificate only when it has a host name.
    server = launch("--bind", "127.0.0.1", "--port", "0", "--tls", "require",
                    "--tls-certificates", str(pki / "server"))
    url = f"nbds://127.0.0.1:{server.port}/test_v1?tls-certificates="

    libnbd = nbdinfo("--size", url + str(other_pki / "client"), check=False)
    qemu = qemu_io(other_pki / "client", qemu_tcp_opts("127.0.0.1", server.port), "read 0 512",
                   check=False)
    good = nbdinfo("--size", url + str(pki / "client"))

    assert_refused(libnbd, "certificate")
    assert_refused(qemu, "known issuer")
    assert good.stdout.strip() == str(64 * MiB)
    assert server.process.poll() is None
    lines = connection_lines(server, 3)
    assert "TLS handshake failed" in lines[0], lines  # libnbd aborts the handshake
    # QEMU completes the handshake, checks the certificate after it, then hangs up.
    assert 'end="client closed the connection"' in lines[1], lines
    assert "export=" not in lines[0] + lines[1] and "export=test_v1" in lines[2], lines


def test_verify_peer_wants_a_client_certificate_from_our_ca(start_server, pki, other_pki, tmp_path):
    server = tls_server(start_server, pki, "require", "--tls-verify-peer")
    anonymous = client_dir(tmp_path, "anonymous", pki, None)
    stranger = client_dir(tmp_path, "stranger", pki, other_pki)

    without = nbdinfo("--size", nbds_unix(server.socket, anonymous), check=False)
    foreign = nbdinfo("--size", nbds_unix(server.socket, stranger), check=False)
    good = qemu_io(pki / "client", qemu_unix_opts(server.socket), "read 0 512")

    assert_refused(without)
    assert_refused(foreign)
    assert "read 512/512" in good.stdout
    lines = connection_lines(server, 3)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in lines[0], lines
    assert "CERTIFICATE_VERIFY_FAILED" in lines[1], lines
    assert f"client_cert={CLIENT_CERT_NAME}" in lines[2], lines


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (["--tls", "require"], ["--tls-certificates"]),
        (["--tls-certificates", "{pki}/server"], ["--tls on"]),
        (["--tls-verify-peer"], ["--tls on"]),
        (["--tls", "on", "--tls-certificates", "{empty}"], ["server-cert.pem", "server-key.pem"]),
        (["--tls", "on", "--tls-certificates", "{server_only}", "--tls-verify-peer"], ["ca-cert.pem"]),
        (["--tls", "on", "--tls-certificates", "{swapped}"], ["cannot load"]),
        (["--tls", "sometimes", "--tls-certificates", "{pki}/server"], ["sometimes"]),
    ],
    ids=["no-certificates", "certificates-without-tls", "verify-without-tls", "empty-directory",
         "verify-without-ca", "key-mismatch", "bad-mode"],
)
def test_serve_refuses_bad_tls_settings_in_one_line(cli, pki, other_pki, tmp_path, arguments, words):
    cli.run("volume", "create", "test_v1", "--size", "1M")
    (tmp_path / "empty").mkdir()
    server_only = tmp_path / "server_only"
    shutil.copytree(pki / "server", server_only)
    (server_only / "ca-cert.pem").unlink()
    swapped = tmp_path / "swapped"  # our certificate with the other CA's server key
    shutil.copytree(pki / "server", swapped)
    shutil.copy(other_pki / "server" / "server-key.pem", swapped)
    places = dict(pki=pki, empty=tmp_path / "empty", server_only=server_only, swapped=swapped)
    socket_path = tmp_path / "refused.sock"

    result = subprocess.run(
        pfnbd_command("serve", "--volume", "test_v1", "--socket", str(socket_path),
                      *(a.format(**places) for a in arguments)),
        env=cli.env, capture_output=True, text=True, timeout=60,
    )

    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not socket_path.exists()
