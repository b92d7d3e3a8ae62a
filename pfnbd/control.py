"""The QMP control socket: exports added, removed and throttled while pfnbd serves.

QMP is QEMU's JSON control protocol, so orchestration that drives
qemu-storage-daemon drives pfnbd too.  Three pieces:

- `MessageReader` and `QmpSession` are sans-I/O: bytes in, reply bytes out.  The
  reader splits the client's JSON stream into messages (QMP needs no newlines); the
  session answers the greeting, capabilities negotiation and each command by
  dispatching on a table of handlers.
- `ExportControl` holds that table: QEMU's commands, with QEMU's names and
  arguments, over the server's export table.  Anything of pfnbd's own is named
  `x-pfnbd-...`, as QMP reserves for extensions.
- `serve_control` is the trio driver: one task per client, events sent to each.

`call` is a small blocking client for the `pfnbd export` commands.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import socket as stdlib_socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from . import __version__
from .server import Export, ExportSpec, Server, make_export
from .store import StoreError, split_snapshot_name
from .throttle import BURST_LENGTHS, BURSTS, LIMITS, Limits, ThrottleError
from .volume import RETRY_TIME_LIMIT, VolumeBridge, VolumeClient, VolumeOpenError

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20  # bytes of one JSON message; control messages are small
MAX_NESTING = 64  # QEMU allows more, but no command of ours nests past 3
RECEIVE_SIZE = 64 * 1024
QUIT_GRACE = 0.2  # seconds clients get at shutdown to receive replies on their way (quit's)
GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"


def _version() -> dict[str, object]:
    major, minor, micro = (int(part) for part in __version__.split(".")[:3])
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": f"pfnbd {__version__}"}


class QmpError(Exception):
    """A command's failure, answered as `{"error": {"class": ..., "desc": ...}}`."""

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.error_class = error_class


def encode(message: Mapping[str, object]) -> bytes:
    """One message on the wire; QEMU ends each with CRLF, and line-reading clients rely on it."""
    return json.dumps(message, separators=(", ", ": ")).encode() + b"\r\n"


def event(name: str, data: Mapping[str, object], now: float | None = None) -> bytes:
    now = time.time() if now is None else now
    seconds = int(now)
    return encode({"event": name, "data": dict(data),
                   "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)}})


class MessageReader:
    """Splits a stream of JSON texts into values, as QEMU's JSON streamer does: by
    bracket depth outside strings, so messages need no separator.

    `feed` returns the values completed, and a `QmpError` in place of each text that
    is not JSON; after an error the reader starts over with the next byte.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text: list[str] = []
        self._length = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, data: bytes) -> list[object]:
        values: list[object] = []
        for char in self._decoder.decode(data):
            if not self._text and self._depth == 0 and char.isspace():
                continue  # between messages
            self._text.append(char)
            self._length += 1
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
                if self._depth > MAX_NESTING:
                    values.append(self._reset(QmpError("JSON parse error, nesting too deep")))
                    continue
            elif char in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    values.append(self._complete())
                    continue
            elif self._depth == 0 and char.isspace():
                values.append(self._complete())  # a bare scalar, ended by white space
                continue
            if self._length > MAX_MESSAGE:
                values.append(self._reset(QmpError("JSON parse error, message too long")))
        return values

    def _complete(self) -> object:
        text = "".join(self._text)
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as error:
            value = QmpError(f"JSON parse error, {getattr(error, 'msg', error)}")
        return self._reset(value)

    def _reset(self, value: object) -> object:
        self._text, self._length, self._depth = [], 0, 0
        self._in_string = self._escaped = False
        return value


Handler = Callable[[dict[str, Any]], object]


class QmpSession:
    """One client's QMP conversation, without I/O: `receive(bytes)` -> reply bytes.

    Until the client sends `qmp_capabilities`, only that command is served, as QMP
    requires.  Events go only to sessions past negotiation (`negotiated`).
    """

    def __init__(self, commands: Mapping[str, Handler]) -> None:
        self._commands = commands
        self._reader = MessageReader()
        self.negotiated = False

    @staticmethod
    def greeting() -> bytes:
        return encode({"QMP": {"version": _version(), "capabilities": []}})

    def receive(self, data: bytes) -> list[bytes]:
        return [self.answer(message) for message in self._reader.feed(data)]

    def answer(self, message: object) -> bytes:
        reply: dict[str, object] = {}
        if isinstance(message, dict) and "id" in message:
            reply["id"] = message["id"]
        try:
            reply = {"return": self._execute(message), **reply}
        except QmpError as error:
            reply = {"error": {"class": error.error_class, "desc": str(error)}, **reply}
        except Exception:  # a bug in one command fails that command, not the server
            log.exception("QMP command %.200r failed", message)
            reply = {"error": {"class": GENERIC_ERROR, "desc": "internal error"}, **reply}
        return encode(reply)

    def _execute(self, message: object) -> object:
        if isinstance(message, QmpError):
            raise message
        if not isinstance(message, dict):
            raise QmpError("QMP input must be a JSON object")
        for key in message:
            if key not in ("execute", "arguments", "id"):
                raise QmpError(f"QMP input member '{key}' is unexpected")
        name = message.get("execute")
        if name is None:
            raise QmpError("QMP input lacks member 'execute'")
        if not isinstance(name, str):
            raise QmpError("QMP input member 'execute' must be a string")
        arguments = message.get("arguments", {})
        if not isinstance(arguments, dict):
            raise QmpError("QMP input member 'arguments' must be an object")
        if name == "qmp_capabilities":
            return self._capabilities(arguments)
        if not self.negotiated:
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'", COMMAND_NOT_FOUND)
        handler = self._commands.get(name)
        if handler is None:
            raise QmpError(f"The command {name} has not been found", COMMAND_NOT_FOUND)
        return handler(dict(arguments))

    def _capabilities(self, arguments: dict[str, Any]) -> object:
        if self.negotiated:
            raise QmpError("Capabilities negotiation is already complete, command ignored",
                           COMMAND_NOT_FOUND)
        with Arguments(arguments) as args:
            enable = args.take("enable", list, [])
        for capability in enable:
            raise QmpError(f"Capability '{capability}' not available")
        self.negotiated = True
        return {}


class Arguments:
    """Takes a command's arguments one by one, with QEMU's error messages; on leaving
    the `with`, any argument not taken is an error."""

    TYPES = {str: "string", bool: "boolean", int: "integer", list: "array"}

    def __init__(self, arguments: dict[str, Any]) -> None:
        self._left = dict(arguments)

    def __enter__(self) -> Arguments:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None and self._left:
            raise QmpError(f"Parameter '{next(iter(self._left))}' is unexpected")

    _REQUIRED = object()

    def take(self, name: str, kind: type, default: object = _REQUIRED) -> Any:
        if name not in self._left:
            if default is self._REQUIRED:
                raise QmpError(f"Parameter '{name}' is missing")
            return default
        value = self._left.pop(name)
        # JSON true is a Python int too: a boolean is never a number here.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise QmpError(f"Invalid parameter type for '{name}', expected: {self.TYPES[kind]}")
        return value


@attrs.define(eq=False)
class _Entry:
    export: Export
    node_name: str
    shutting_down: bool = False


class ExportControl:
    """QEMU's block export commands over a running `Server`.

    Closes an export's bridge once the export is deleted and its connections have
    ended (so the volume can be opened again), and every bridge left when the
    control closes.  A bridge closes once: `open_exports` closing the command
    line's again changes nothing.
    """

    def __init__(
        self, server: Server, client: VolumeClient, nursery: trio.Nursery, shutdown: trio.Event,
        read_only: bool = False, retry_time_limit: float = RETRY_TIME_LIMIT,
    ) -> None:
        self._server = server
        self._client = client
        self._nursery = nursery  # where deletions wait for their connections to end
        self._shutdown = shutdown
        self._read_only = read_only  # `serve --read-only`: no export may be writable
        self._retry_time_limit = retry_time_limit
        self._entries: dict[str, _Entry] = {}  # by export id
        self._listeners: set[Callable[[bytes], None]] = set()
        self.commands: dict[str, Handler] = {
            "block-export-add": self.block_export_add,
            "block-export-del": self.block_export_del,
            "query-block-exports": self.query_block_exports,
            "block_set_io_throttle": self.block_set_io_throttle,
            "x-pfnbd-query-io-throttle": self.query_io_throttle,
            "query-version": lambda arguments: self._no_arguments(arguments, _version),
            "query-commands": lambda arguments: self._no_arguments(
                arguments, lambda: [{"name": name} for name in ["qmp_capabilities", *self.commands]]),
            "quit": lambda arguments: self._no_arguments(arguments, self._quit),
        }

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, server: Server, exports: list[Export], client: VolumeClient,
                   shutdown: trio.Event, **options) -> AsyncIterator[ExportControl]:
        """`exports` (the command line's) get their names as ids."""
        async with trio.open_nursery() as nursery:
            control = cls(server, client, nursery, shutdown, **options)
            for export in exports:
                control._entries[export.info.name] = _Entry(export, export.info.name)
            try:
                yield control
            finally:
                nursery.cancel_scope.cancel()
                for entry in control._entries.values():
                    entry.export.bridge.close()

    # -- events ------------------------------------------------------------

    def subscribe(self, send: Callable[[bytes], None]) -> Callable[[], None]:
        self._listeners.add(send)
        return lambda: self._listeners.discard(send)

    def emit(self, name: str, data: Mapping[str, object]) -> None:
        message = event(name, data)
        for send in list(self._listeners):
            send(message)

    # -- commands ----------------------------------------------------------

    def _no_arguments(self, arguments: dict[str, Any], result: Callable[[], object]) -> object:
        with Arguments(arguments):
            pass
        return result()

    def _quit(self) -> dict:
        self._shutdown.set()
        return {}

    def _entry(self, export_id: str) -> _Entry:
        entry = self._entries.get(export_id)
        if entry is None:
            raise QmpError(f"Export '{export_id}' is not found")
        return entry

    def block_export_add(self, arguments: dict[str, Any]) -> dict:
        with Arguments(arguments) as args:
            kind = args.take("type", str)
            export_id = args.take("id", str)
            node_name = args.take("node-name", str)
            name = args.take("name", str, node_name)
            writable = args.take("writable", bool, False)
            description = args.take("description", str, "")
        if kind != "nbd":
            raise QmpError(f"Invalid parameter 'type': pfnbd exports over nbd only, not {kind!r}")
        if export_id in self._entries:
            raise QmpError(f"Block export id '{export_id}' is already in use")
        if not export_id or not name:
            raise QmpError("export id and name must not be empty")
        if any(entry.export.info.name == name for entry in self._entries.values()):
            raise QmpError(f"An export named '{name}' exists already")
        for entry in self._entries.values():
            if entry.node_name == node_name:
                # One bridge per volume: two would each believe it serves every connection.
                raise QmpError(f"Node '{node_name}' is exported already, as '{entry.export.info.name}'")
        if writable and self._read_only:
            raise QmpError("Cannot export writable: the server was started --read-only")
        volume, snapshot = split_snapshot_name(node_name)
        try:
            backend = self._client.open_volume(volume, snapshot)
        except (VolumeOpenError, StoreError, OSError) as error:
            raise QmpError(f"Cannot open node '{node_name}': {error}") from None
        bridge = VolumeBridge(backend, self._retry_time_limit)
        if writable and backend.read_only:
            bridge.close()
            raise QmpError("Cannot export read-only node as writable")
        export = make_export(ExportSpec(name, description), bridge, read_only=not writable)
        self._server.add_export(export)
        self._entries[export_id] = _Entry(export, node_name)
        log.info("export added: id=%s node=%s name=%s writable=%s", export_id, node_name, name,
                 "yes" if writable else "no")
        return {}

    def block_export_del(self, arguments: dict[str, Any]) -> dict:
        with Arguments(arguments) as args:
            export_id = args.take("id", str)
            mode = args.take("mode", str, "safe")
        if mode not in ("safe", "hard"):
            raise QmpError(f"Parameter 'mode' does not accept value '{mode}'")
        entry = self._entry(export_id)
        if entry.shutting_down:
            raise QmpError(f"Block export '{export_id}' is already shutting down")
        name = entry.export.info.name
        clients = self._server.clients(name)
        if mode == "safe" and clients:
            raise QmpError(f"export '{export_id}' still in use by {clients} client(s); "
                           f"use mode 'hard' to disconnect them")
        # No await between the check and the withdrawal: no client can slip in.
        entry.shutting_down = True
        self._server.withdraw_export(name)
        self._nursery.start_soon(self._delete, export_id, entry)
        return {}

    async def _delete(self, export_id: str, entry: _Entry) -> None:
        """The rest of a deletion: once the export's connections have ended, its
        bridge is closed and BLOCK_EXPORT_DELETED goes out."""
        await self._server.remove_export(entry.export.info.name)
        del self._entries[export_id]
        entry.export.bridge.close()
        log.info("export deleted: id=%s", export_id)
        self.emit("BLOCK_EXPORT_DELETED", {"id": export_id})

    def query_block_exports(self, arguments: dict[str, Any]) -> list[dict]:
        with Arguments(arguments):
            pass
        return [{
            "type": "nbd", "id": export_id, "node-name": entry.node_name,
            "shutting-down": entry.shutting_down,
            # pfnbd's own members, named as QMP reserves for extensions
            "x-pfnbd-name": entry.export.info.name,
            "x-pfnbd-writable": not entry.export.read_only,
            "x-pfnbd-clients": self._server.clients(entry.export.info.name),
        } for export_id, entry in self._entries.items()]

    def block_set_io_throttle(self, arguments: dict[str, Any]) -> dict:
        with Arguments(arguments) as args:
            export_id = args.take("id", str)
            # QEMU requires the six limits, and takes the bursts as options.
            values = {name: args.take(name, int) for name in LIMITS}
            values |= {name: args.take(name, int, 0) for name in BURSTS + BURST_LENGTHS}
        entry = self._entry(export_id)
        try:
            limits = Limits({key: value for key, value in values.items() if value})
        except ThrottleError as error:
            raise QmpError(str(error)) from None
        entry.export.throttle.set(limits)
        log.info("throttle set: id=%s %s", export_id,
                 " ".join(f"{k}={v}" for k, v in limits.values.items()) or "unlimited")
        return {}

    def query_io_throttle(self, arguments: dict[str, Any]) -> list[dict]:
        with Arguments(arguments):
            pass
        return [{"id": export_id, **entry.export.throttle.limits.as_arguments()}
                for export_id, entry in self._entries.items()]


async def serve_control(listener: trio.SocketListener, control: ExportControl, shutdown: trio.Event,
                        *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serves QMP clients on `listener` until `shutdown` is set."""
    async with listener, trio.open_nursery() as nursery:
        task_status.started()
        nursery.start_soon(_accept_control, listener, control, nursery)
        await shutdown.wait()
        with trio.move_on_after(QUIT_GRACE):
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()


async def _accept_control(listener: trio.SocketListener, control: ExportControl, nursery: trio.Nursery) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError as error:
            log.error("control socket accept failed: %s", error.strerror or error)
            await trio.sleep(0.1)
            continue
        nursery.start_soon(_control_client, stream, control)


async def _control_client(stream: trio.SocketStream, control: ExportControl) -> None:
    """One QMP client.  Replies and events go out through one writer task, in order."""
    session = QmpSession(control.commands)
    send, outbox = trio.open_memory_channel[bytes](256)

    def queue_event(message: bytes) -> None:
        if session.negotiated:
            try:
                send.send_nowait(message)
            except trio.WouldBlock:
                pass  # a client that reads nothing loses events, never stalls the server

    async def write() -> None:
        async for message in outbox:
            await stream.send_all(message)

    unsubscribe = control.subscribe(queue_event)
    try:
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(write)
            async with send:  # closed at the client's EOF: the writer sends what is queued, and ends
                await send.send(session.greeting())
                while data := await stream.receive_some(RECEIVE_SIZE):
                    for reply in session.receive(data):
                        await send.send(reply)
                unsubscribe()
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    finally:
        unsubscribe()


# -- a blocking client, for `pfnbd export` -------------------------------------


class ControlError(Exception):
    """The control socket could not be reached, or a command failed."""


def call(path: Path, command: str, arguments: Mapping[str, object] | None = None,
         timeout: float = 30) -> object:
    """Runs one command on the control socket at `path` and returns its result."""
    reader = MessageReader()
    with stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            messages = _Replies(sock, reader)
            messages.next()  # the greeting
            for name, args in (("qmp_capabilities", {}), (command, dict(arguments or {}))):
                sock.sendall(encode({"execute": name, "arguments": args, "id": name}))
                reply = messages.reply(name)
                if "error" in reply:
                    raise ControlError(reply["error"]["desc"])
        except OSError as error:
            raise ControlError(f"control socket {path}: {error.strerror or error}") from None
    return reply["return"]


@attrs.define
class _Replies:
    sock: stdlib_socket.socket
    reader: MessageReader
    pending: list[object] = attrs.Factory(list)

    def next(self) -> dict:
        while not self.pending:
            data = self.sock.recv(RECEIVE_SIZE)
            if not data:
                raise ControlError("the control socket closed the connection")
            self.pending += self.reader.feed(data)
        message = self.pending.pop(0)
        if not isinstance(message, dict):
            raise ControlError(f"not a QMP message: {message!r}")
        return message

    def reply(self, request_id: str) -> dict:
        """The reply to `request_id`; events before it are skipped."""
        while True:
            message = self.next()
            if message.get("id") == request_id:
                return message
