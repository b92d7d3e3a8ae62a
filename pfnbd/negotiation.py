"""Fixed-newstyle negotiation: option haggling as a state machine, and its I/O driver.

`Negotiation` never touches a socket (as h11 does for HTTP): it takes the client's
flags and options as bytes and answers with the bytes to send, so tests and fuzzers
drive it directly.  `negotiate()` is the thin trio driver that feeds it.

The states read as a table: AWAIT_CLIENT_FLAGS -> OPTIONS -> TRANSMISSION, or CLOSED
when either side ends the haggling.  NBD_OPT_STARTTLS is a detour: OPTIONS ->
STARTING_TLS while the driver runs the TLS handshake, then OPTIONS again with every
option agreed in clear forgotten.  A client that breaks a MUST of the spec raises
`RemoteProtocolError` (the connection is dropped); everything else gets the option
reply the spec prescribes and negotiation goes on.
"""

from __future__ import annotations

import enum
import logging
import ssl
from collections.abc import Sequence

import attrs
import construct
import trio

from . import protocol as p
from .streams import Receiver
from .tls import start_tls

log = logging.getLogger(__name__)

# Resource limits a client cannot get around.
MAX_OPTION_LENGTH = 64 * 1024  # our options carry a name and a few queries
MAX_OPTIONS = 512  # per handshake: enough for nbdinfo --list over many exports


class RemoteProtocolError(Exception):
    """The client broke a rule that the spec answers with a disconnect."""


class State(enum.Enum):
    AWAIT_CLIENT_FLAGS = enum.auto()
    OPTIONS = enum.auto()
    STARTING_TLS = enum.auto()
    TRANSMISSION = enum.auto()
    CLOSED = enum.auto()


class TlsMode(enum.Enum):
    """The spec's three server modes, spelled as nbdkit's --tls spells them."""

    OFF = "off"  # NOTLS: STARTTLS is refused by policy
    ON = "on"  # SELECTIVETLS with no TLS-only export: the client chooses
    REQUIRE = "require"  # FORCEDTLS: nothing but STARTTLS and ABORT before TLS


# Options a FORCEDTLS server answers before TLS; every other one gets ERR_TLS_REQD.
ALLOWED_BEFORE_TLS = {p.Option.STARTTLS, p.Option.ABORT}


@attrs.frozen
class BlockSizes:
    minimum: int = 512
    preferred: int = 4096
    maximum: int = 32 * 1024 * 1024


@attrs.frozen
class ExportInfo:
    """What negotiation tells a client about one export."""

    name: str
    description: str
    size: int
    flags: p.TransmissionFlags  # SEND_DF is added once structured replies are agreed
    block_sizes: BlockSizes = BlockSizes()
    # The meta contexts it offers; a context's id is its place here, from 1.
    contexts: tuple[str, ...] = (p.BASE_ALLOCATION,)

    def context_id(self, name: str) -> int:
        return self.contexts.index(name) + 1


@attrs.frozen
class Agreement:
    """What the two sides settled on, handed to the transmission phase."""

    export: ExportInfo
    structured_replies: bool  # true under extended headers too: they carry chunks
    meta_contexts: dict[int, str]  # context id -> name
    extended_headers: bool = False


@attrs.frozen
class OptionOutcome:
    replies: list[bytes]
    agreement: Agreement | None = None  # set when negotiation ended in transmission
    close: bool = False  # set when the connection ends after the replies
    start_tls: bool = False  # set when the TLS handshake follows the replies


def option_reply(option: int, reply: p.OptionReply, payload: bytes = b"") -> bytes:
    header = p.option_reply_header.build(
        dict(option=option, type=reply, length=len(payload))
    )
    return header + payload


def option_error(option: int, reply: p.OptionReply, message: str) -> bytes:
    return option_reply(option, reply, message.encode())


class Negotiation:
    """The server's side of one handshake."""

    def __init__(self, exports: Sequence[ExportInfo], tls_mode: TlsMode = TlsMode.OFF) -> None:
        self._exports = {export.name: export for export in exports}
        # The empty name selects the default export (the first one), as in qemu-nbd.
        self._default = exports[0] if exports else None
        self.tls_mode = tls_mode
        self.tls_active = False
        self.state = State.AWAIT_CLIENT_FLAGS
        self.no_zeroes = False
        self.options_seen = 0
        self._forget_options()

    def _forget_options(self) -> None:
        """Sets every attribute an option can change: STARTTLS calls it again, since no
        option state may survive it (the spec, on NBD_OPT_STARTTLS)."""
        self.structured_replies = False
        self.extended_headers = False
        self._meta_contexts: dict[int, str] = {}
        self._meta_context_export: str | None = None

    @staticmethod
    def greeting() -> bytes:
        return p.greeting.build(
            dict(flags=p.HandshakeFlags.FIXED_NEWSTYLE | p.HandshakeFlags.NO_ZEROES)
        )

    def receive_client_flags(self, data: bytes) -> None:
        self._expect(State.AWAIT_CLIENT_FLAGS)
        flags = p.client_flags.parse(data).flags
        known = int(p.ClientFlags.FIXED_NEWSTYLE | p.ClientFlags.NO_ZEROES)
        if flags & ~known:  # on plain ints: ~ of an IntFlag keeps only its defined bits
            raise RemoteProtocolError(f"unknown client flags {flags:#x}")
        if not flags & p.ClientFlags.FIXED_NEWSTYLE:
            # Plain newstyle would need EXPORT_NAME-only haggling; every client we
            # serve speaks fixed newstyle, and the spec lets a server insist.
            raise RemoteProtocolError("client does not speak fixed newstyle")
        self.no_zeroes = bool(flags & p.ClientFlags.NO_ZEROES)
        self.state = State.OPTIONS

    def _begin_option(self) -> None:
        self._expect(State.OPTIONS)
        self.options_seen += 1
        if self.options_seen > MAX_OPTIONS:
            raise RemoteProtocolError(f"more than {MAX_OPTIONS} options")

    def receive_option(self, option: int, data: bytes) -> OptionOutcome:
        self._begin_option()
        handler = self._handlers.get(option)
        if self._tls_required(option):
            outcome = self._refuse_before_tls(option)
        elif handler is None:
            outcome = OptionOutcome(
                [option_error(option, p.OptionReply.ERR_UNSUP, f"option {option} is not supported")]
            )
        else:
            outcome = handler(self, option, data)
        if outcome.agreement is not None:
            self.state = State.TRANSMISSION
        elif outcome.close:
            self.state = State.CLOSED
        elif outcome.start_tls:
            self.state = State.STARTING_TLS
        return outcome

    def receive_oversized_option(self, option: int) -> OptionOutcome:
        """The client announced more option data than we accept; it was discarded.

        Only an option we implement is "too big": an unknown one is unsupported
        whatever its length, and ABORT is acknowledged, its data ignored.
        """
        if option == p.Option.ABORT or option not in self._handlers:
            return self.receive_option(option, b"")
        self._begin_option()
        if self._tls_required(option):
            return self._refuse_before_tls(option)
        return OptionOutcome(
            [option_error(option, p.OptionReply.ERR_TOO_BIG, "option data too long")]
        )

    def tls_started(self) -> None:
        """The driver completed the TLS handshake: haggling starts over, encrypted."""
        self._expect(State.STARTING_TLS)
        self.tls_active = True
        self._forget_options()
        self.state = State.OPTIONS

    def _tls_required(self, option: int) -> bool:
        return (self.tls_mode is TlsMode.REQUIRE and not self.tls_active
                and option not in ALLOWED_BEFORE_TLS)

    def _refuse_before_tls(self, option: int) -> OptionOutcome:
        if option == p.Option.EXPORT_NAME:
            # EXPORT_NAME has no error reply: FORCEDTLS must end the session.
            log.info("client asked for an export before starting TLS")
            return OptionOutcome([], close=True)
        return OptionOutcome(
            [option_error(option, p.OptionReply.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS")]
        )

    # -- option handlers --------------------------------------------------

    def _export_name(self, option: int, data: bytes) -> OptionOutcome:
        if self.extended_headers:
            raise RemoteProtocolError("NBD_OPT_EXPORT_NAME after extended headers")
        try:
            export = self._lookup(data.decode())
        except UnicodeDecodeError:
            export = None
        if export is None:
            # The spec leaves no error reply for EXPORT_NAME: disconnect.
            log.info("client asked for unknown export %r", data[:100])
            return OptionOutcome([], close=True)
        reply = p.export_name_reply.build(
            dict(size=export.size, flags=self._flags(export)), padded=not self.no_zeroes
        )
        return OptionOutcome([reply], agreement=self._agree(export))

    def _abort(self, option: int, data: bytes) -> OptionOutcome:
        return OptionOutcome([option_reply(option, p.OptionReply.ACK)], close=True)

    def _starttls(self, option: int, data: bytes) -> OptionOutcome:
        if data:
            return self._invalid(option, "NBD_OPT_STARTTLS carries no data")
        if self.tls_mode is TlsMode.OFF:
            return OptionOutcome(
                [option_error(option, p.OptionReply.ERR_POLICY, "TLS is not enabled on this server")]
            )
        if self.tls_active:
            return self._invalid(option, "TLS is already active")
        return OptionOutcome([option_reply(option, p.OptionReply.ACK)], start_tls=True)

    def _list(self, option: int, data: bytes) -> OptionOutcome:
        if data:
            return self._invalid(option, "NBD_OPT_LIST carries no data")
        replies = [
            option_reply(
                option,
                p.OptionReply.SERVER,
                p.server_reply.build(dict(name=e.name, description=e.description)),
            )
            for e in self._exports.values()
        ]
        return OptionOutcome([*replies, option_reply(option, p.OptionReply.ACK)])

    def _info_or_go(self, option: int, data: bytes) -> OptionOutcome:
        try:
            request = p.info_request.parse(data)
        except (construct.ConstructError, UnicodeDecodeError):
            return self._invalid(option, "malformed NBD_OPT_INFO/GO request")
        export = self._lookup(request.name)
        if export is None:
            return OptionOutcome(
                [option_error(option, p.OptionReply.ERR_UNKNOWN, f"no export named {_quoted(request.name)}")]
            )
        infos = [dict(type=p.Info.EXPORT, info=dict(size=export.size, flags=self._flags(export)))]
        sizes = export.block_sizes
        # Block sizes go out whether asked for or not, as qemu-nbd does: a client
        # that ignores them is still served (unaligned requests work).
        infos.append(
            dict(
                type=p.Info.BLOCK_SIZE,
                info=dict(minimum=sizes.minimum, preferred=sizes.preferred, maximum=sizes.maximum),
            )
        )
        if p.Info.NAME in request.requests:
            infos.append(dict(type=p.Info.NAME, info=dict(name=export.name)))
        if p.Info.DESCRIPTION in request.requests and export.description:
            infos.append(dict(type=p.Info.DESCRIPTION, info=dict(description=export.description)))
        replies = [option_reply(option, p.OptionReply.INFO, p.info_reply.build(i)) for i in infos]
        replies.append(option_reply(option, p.OptionReply.ACK))
        if option == p.Option.GO:
            return OptionOutcome(replies, agreement=self._agree(export))
        return OptionOutcome(replies)

    def _structured_reply(self, option: int, data: bytes) -> OptionOutcome:
        if data:
            return self._invalid(option, "NBD_OPT_STRUCTURED_REPLY carries no data")
        if self.extended_headers:
            return OptionOutcome([option_error(
                option, p.OptionReply.ERR_EXT_HEADER_REQD, "extended headers are already in use")])
        self.structured_replies = True
        return OptionOutcome([option_reply(option, p.OptionReply.ACK)])

    def _extended_headers(self, option: int, data: bytes) -> OptionOutcome:
        if data:
            return self._invalid(option, "NBD_OPT_EXTENDED_HEADERS carries no data")
        self.extended_headers = self.structured_replies = True
        return OptionOutcome([option_reply(option, p.OptionReply.ACK)])

    def _meta_context(self, option: int, data: bytes) -> OptionOutcome:
        setting = option == p.Option.SET_META_CONTEXT
        if setting:
            # A SET replaces every earlier selection, even when it fails.
            self._meta_contexts = {}
            self._meta_context_export = None
        if not self.structured_replies:
            return self._invalid(option, "negotiate structured replies first")
        try:
            request = p.meta_context_request.parse(data)
        except (construct.ConstructError, UnicodeDecodeError):
            return self._invalid(option, "malformed meta context request")
        export = self._lookup(request.name)
        if export is None:
            return OptionOutcome(
                [option_error(option, p.OptionReply.ERR_UNKNOWN, f"no export named {_quoted(request.name)}")]
            )
        if request.queries:
            matched = {name for query in request.queries
                       for name in _matching_contexts(query, setting, export.contexts)}
        else:
            matched = set() if setting else set(export.contexts)
        replies = []
        for name in sorted(matched, key=export.context_id):
            context_id = export.context_id(name) if setting else 0
            replies.append(
                option_reply(
                    option,
                    p.OptionReply.META_CONTEXT,
                    p.meta_context_reply.build(dict(context_id=context_id, name=name)),
                )
            )
        if setting:
            self._meta_contexts = {export.context_id(name): name for name in sorted(matched, key=export.context_id)}
            self._meta_context_export = export.name
        return OptionOutcome([*replies, option_reply(option, p.OptionReply.ACK)])

    _handlers = {
        p.Option.EXPORT_NAME: _export_name,
        p.Option.ABORT: _abort,
        p.Option.STARTTLS: _starttls,
        p.Option.LIST: _list,
        p.Option.INFO: _info_or_go,
        p.Option.GO: _info_or_go,
        p.Option.STRUCTURED_REPLY: _structured_reply,
        p.Option.EXTENDED_HEADERS: _extended_headers,
        p.Option.LIST_META_CONTEXT: _meta_context,
        p.Option.SET_META_CONTEXT: _meta_context,
    }

    # -- helpers ----------------------------------------------------------

    def _expect(self, state: State) -> None:
        if self.state is not state:
            raise RuntimeError(f"negotiation is in state {self.state.name}, not {state.name}")

    def _lookup(self, name: str) -> ExportInfo | None:
        return self._default if name == "" else self._exports.get(name)

    def _flags(self, export: ExportInfo) -> p.TransmissionFlags:
        # DF must stay clear unless structured replies were negotiated.
        return export.flags | (p.TransmissionFlags.SEND_DF if self.structured_replies else 0)

    def _agree(self, export: ExportInfo) -> Agreement:
        contexts = self._meta_contexts if self._meta_context_export == export.name else {}
        return Agreement(export, self.structured_replies, dict(contexts), self.extended_headers)

    @staticmethod
    def _invalid(option: int, message: str) -> OptionOutcome:
        return OptionOutcome([option_error(option, p.OptionReply.ERR_INVALID, message)])


def _quoted(name: str) -> str:
    """A client's name in an error message: strings on the wire stay under 4096 bytes."""
    return repr(name) if len(name) <= 64 else repr(name[:64]) + "..."


# Queries that name every context under them, for LIST only (the spec leaves SET's
# wildcards to each namespace; QEMU, whose `qemu:` this is, takes them for LIST only).
WILDCARD_QUERIES = ("base:", "qemu:", p.QEMU_DIRTY_BITMAP)


def _matching_contexts(query: str, setting: bool, offered: Sequence[str]) -> list[str]:
    """The contexts of `offered` that a query names."""
    if query in offered:
        return [query]
    if query in WILDCARD_QUERIES and not setting:
        return [name for name in offered if name.startswith(query)]
    return []  # unknown namespaces and leaves are ignored, as the spec requires


@attrs.define
class Channel:
    """The stream a connection talks over and the one receiver reading it.

    STARTTLS replaces both: bytes a client sent in clear after its STARTTLS are dropped
    with the old receiver, so nothing injected before the handshake is read as an option.
    """

    stream: trio.abc.Stream
    receiver: Receiver = attrs.field()

    @receiver.default
    def _receiver(self) -> Receiver:
        return Receiver(self.stream)

    def replace(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.receiver = Receiver(stream)


async def negotiate(
    channel: Channel, negotiation: Negotiation, tls_context: ssl.SSLContext | None = None
) -> Agreement | None:
    """Run the handshake on a connection; None when it ended without transmission.

    `tls_context` is needed unless the negotiation's TLS mode is OFF.
    """
    await channel.stream.send_all(negotiation.greeting())
    negotiation.receive_client_flags(await channel.receiver.receive_exactly(p.client_flags.sizeof()))
    while True:
        receiver = channel.receiver
        header = p.option_header.parse(await receiver.receive_exactly(p.option_header.sizeof()))
        if header.magic != p.IHAVEOPT:
            raise RemoteProtocolError(f"bad option magic {header.magic:#x}")
        if header.length > MAX_OPTION_LENGTH:
            if header.option == p.Option.EXPORT_NAME:
                raise RemoteProtocolError("export name too long")
            await receiver.discard(header.length)
            outcome = negotiation.receive_oversized_option(header.option)
        else:
            data = await receiver.receive_exactly(header.length)
            outcome = negotiation.receive_option(header.option, data)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("option %s length=%d%s: %s", _name(p.Option, header.option), header.length,
                      " (TLS)" if negotiation.tls_active else "",
                      _reply_names(header.option, outcome.replies))
        try:
            for reply in outcome.replies:
                await channel.stream.send_all(reply)
        except trio.BrokenResourceError:
            if not outcome.close:
                raise
            # A client that sent ABORT may close without reading our ACK.
        if outcome.start_tls:
            channel.replace(await start_tls(channel.stream, tls_context))
            negotiation.tls_started()
            log.debug("TLS handshake done: %s", channel.stream.version)
        if outcome.agreement is not None or outcome.close:
            return outcome.agreement


def _name(enumeration: type[enum.IntEnum], value: int) -> str:
    try:
        return enumeration(value).name
    except ValueError:
        return str(value)


def _reply_names(option: int, replies: list[bytes]) -> str:
    """The replies an option got, for tracing: `INFO INFO ACK`, or `disconnect`."""
    if not replies:
        return "disconnect"
    if option == p.Option.EXPORT_NAME:
        return "export size and flags"  # the one answer without an option reply header
    return " ".join(_name(p.OptionReply, p.option_reply_header.parse(r).type) for r in replies)
