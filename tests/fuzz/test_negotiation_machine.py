"""The sans-I/O `Negotiation` under random option sequences and bytes.

Properties, for every option of every sequence:
* the machine raises nothing but `RemoteProtocolError`, and that only where the spec
  lets the server hang up;
* every reply parses with pfnbd's own schemas and obeys "Option reply types": it answers
  the option sent, the last reply and only the last is final (ACK or an error), ACK is
  empty, errors carry a short UTF-8 message, INFO/SERVER/META_CONTEXT replies only go
  to the options that may have them, with the lengths the spec fixes;
* the answer is the one the spec gives, from a small model of the haggling (structured
  replies and the selected metadata contexts), and GO's agreement matches the model.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from pfnbd import protocol as p
from pfnbd.negotiation import MAX_OPTIONS, ExportInfo, Negotiation, RemoteProtocolError, State
from pfnbd.server import export_flags

from .nbdwire import info_request, meta_context_request

# The machine runs in NOTLS mode, its default (pfnbd serve without --tls).
EXPORTS = [
    ExportInfo("alpha", "the first volume", 1 << 20, export_flags(False)),
    ExportInfo("beta", "", 512 << 10, export_flags(True)),
]
DEFAULT = EXPORTS[0]  # the empty name
BY_NAME = {export.name: export for export in EXPORTS}
VALID_CLIENT_FLAGS = [p.ClientFlags.FIXED_NEWSTYLE, p.ClientFlags.FIXED_NEWSTYLE | p.ClientFlags.NO_ZEROES]
KNOWN_OPTIONS = {p.Option.EXPORT_NAME, p.Option.ABORT, p.Option.LIST, p.Option.INFO, p.Option.GO,
                 p.Option.STRUCTURED_REPLY, p.Option.LIST_META_CONTEXT, p.Option.SET_META_CONTEXT}
# Defined by the extended-headers extension (issue 4 part 4): checked for shape only.
EXTENSION_OPTIONS = {p.Option.EXTENDED_HEADERS}
NON_FINAL = {p.OptionReply.SERVER: {p.Option.LIST},
             p.OptionReply.INFO: {p.Option.INFO, p.Option.GO},
             p.OptionReply.META_CONTEXT: {p.Option.LIST_META_CONTEXT, p.Option.SET_META_CONTEXT}}

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
# Long names too: error messages that quote them must stay within 4096 bytes.
names = st.one_of(st.sampled_from(["alpha", "beta", ""]), st.sampled_from(["gamma", "alpha\0", "ALPHA"]),
                  st.text(max_size=24), st.integers(4000, 5000).map(lambda n: "n" * n))
queries = st.one_of(st.sampled_from([p.BASE_ALLOCATION, "base:"]),
                    st.sampled_from(["base:allocation2", "qemu:dirty-bitmap:x", "x-unknown:", "nocolon", ""]),
                    st.text(max_size=20))
info_types = st.one_of(st.sampled_from(list(p.Info)), u16)


def mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """Well-formed data (half the time), or the same cut short, extended, or with a
    length field lying."""
    return st.one_of(
        st.just(data),
        st.just(data),
        st.just(data),
        st.integers(0, max(len(data) - 1, 0)).map(lambda n: data[:n]),
        st.binary(min_size=1, max_size=8).map(lambda tail: data + tail),
        st.tuples(st.integers(0, max(len(data) - 4, 0)), u32).map(
            lambda at_value: data[: at_value[0]] + struct.pack(">I", at_value[1]) + data[at_value[0] + 4 :]),
    )


info_data = st.builds(info_request, names, st.lists(info_types, max_size=5)).flatmap(mutations)
meta_data = st.builds(meta_context_request, names, st.lists(queries, max_size=4)).flatmap(mutations)
# Options that end the haggling (ABORT, EXPORT_NAME, a good GO) come rarely enough
# for sequences to build up state first.
HAGGLING = sorted(KNOWN_OPTIONS - {p.Option.ABORT, p.Option.EXPORT_NAME})
option_numbers = st.one_of(st.sampled_from(HAGGLING), st.sampled_from(HAGGLING), st.sampled_from(HAGGLING),
                           st.sampled_from(list(p.Option)), u32)


@st.composite
def options(draw) -> tuple[int, bytes]:
    option = draw(option_numbers)
    if option in (p.Option.INFO, p.Option.GO):
        data = draw(st.one_of(info_data, info_data, st.binary(max_size=32)))
    elif option in (p.Option.LIST_META_CONTEXT, p.Option.SET_META_CONTEXT):
        data = draw(st.one_of(meta_data, meta_data, st.binary(max_size=32)))
    elif option == p.Option.EXPORT_NAME:
        data = draw(st.one_of(names.map(str.encode), st.binary(max_size=16)))
    else:  # options that carry no data, and unknown ones: usually none
        data = draw(st.one_of(st.just(b""), st.binary(max_size=16)))
    return option, data


# -- the spec's reading of option data (struct, not pfnbd's schemas) ------------


def parse_name(data: bytes, at: int) -> tuple[bytes, int] | None:
    if len(data) < at + 4:
        return None
    (length,) = struct.unpack_from(">I", data, at)
    end = at + 4 + length
    return (data[at + 4 : end], end) if end <= len(data) else None


def parse_info(data: bytes) -> tuple[bytes, list[int]] | None:
    """GO/INFO data: name length "MUST be no larger than the option data length - 6"."""
    name = parse_name(data, 0)
    if name is None or len(data) < name[1] + 2:
        return None
    (count,) = struct.unpack_from(">H", data, name[1])
    if len(data) != name[1] + 2 + 2 * count:
        return None
    return name[0], list(struct.unpack_from(f">{count}H", data, name[1] + 2))


def parse_meta(data: bytes) -> tuple[bytes, list[bytes]] | None:
    """META_CONTEXT data: a query "that would require reading beyond the original
    length" makes the request syntactically invalid."""
    name = parse_name(data, 0)
    if name is None or len(data) < name[1] + 4:
        return None
    (count,) = struct.unpack_from(">I", data, name[1])
    at, found = name[1] + 4, []
    for _ in range(count):
        query = parse_name(data, at)
        if query is None:
            return None
        found.append(query[0])
        at = query[1]
    return (name[0], found) if at == len(data) else None


def name_of(enum_type, value: int) -> str:
    try:
        return enum_type(value).name
    except ValueError:
        return "unknown"


def utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


def lookup(raw: bytes) -> ExportInfo | None:
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        return None
    return DEFAULT if name == "" else BY_NAME.get(name)


# -- checking replies -----------------------------------------------------------


class Model:
    """What the spec says the haggling has settled so far."""

    def __init__(self, no_zeroes: bool) -> None:
        self.no_zeroes = no_zeroes
        self.structured = False
        self.extended = False
        self.contexts: set[str] = set()
        self.context_export: str | None = None


def split_replies(option: int, replies: list[bytes]) -> list[tuple[int, bytes]]:
    """(type, payload) of each reply, after checking the generic rules."""
    parsed = []
    for index, reply in enumerate(replies):
        header = p.option_reply_header.parse(reply)  # Const magic: a wrong one raises
        payload = reply[p.option_reply_header.sizeof() :]
        assert header.option == option, f"reply to option {header.option} for option {option}"
        assert header.length == len(payload), "reply length disagrees with its payload"
        final = header.type == p.OptionReply.ACK or header.type & (1 << 31)
        assert bool(final) == (index == len(replies) - 1), f"final reply not last: {replies}"
        if header.type == p.OptionReply.ACK:
            assert payload == b"", "ACK with data"
        elif header.type & (1 << 31):
            assert len(payload) <= p.MAX_STRING_LENGTH and b"\0" not in payload, payload[:100]
            payload.decode()
        else:
            assert option in NON_FINAL.get(header.type, ()), f"reply type {header.type} to option {option}"
        parsed.append((header.type, payload))
    return parsed


def check_infos(parsed: list[tuple[int, bytes]], export: ExportInfo, model: Model) -> None:
    seen = set()
    for reply_type, payload in parsed[:-1]:
        info = p.info_reply.parse(payload)
        assert info.type not in seen, f"NBD_INFO {info.type} sent twice"
        seen.add(info.type)
        if info.type == p.Info.EXPORT:
            assert len(payload) == 12
            assert info.info.size == export.size
            assert info.info.flags & p.TransmissionFlags.HAS_FLAGS
            assert bool(info.info.flags & p.TransmissionFlags.SEND_DF) == model.structured
        elif info.type == p.Info.BLOCK_SIZE:
            assert len(payload) == 14
            minimum, preferred, maximum = info.info.minimum, info.info.preferred, info.info.maximum
            assert minimum & (minimum - 1) == 0 and minimum <= 1 << 16
            assert preferred & (preferred - 1) == 0 and preferred >= max(minimum, 512)
            assert maximum >= preferred
        else:
            assert len(payload) >= 2
    assert p.Info.EXPORT in seen, "ACK without NBD_INFO_EXPORT"


def expected_meta_contexts(queries: list[bytes], setting: bool) -> set[str]:
    if not queries:
        return set() if setting else {p.BASE_ALLOCATION}
    wanted = {p.BASE_ALLOCATION.encode()} | (set() if setting else {b"base:"})
    return {p.BASE_ALLOCATION} if wanted & set(queries) else set()


def check_option(negotiation: Negotiation, model: Model, option: int, data: bytes):
    """Feeds one option and checks the answer; returns the outcome (None if dropped)."""
    if option == p.Option.EXPORT_NAME and model.extended:
        # The extension forbids EXPORT_NAME after EXTENDED_HEADERS: a MUST broken, MAY drop.
        with pytest.raises(RemoteProtocolError):
            negotiation.receive_option(option, data)
        return None
    outcome = negotiation.receive_option(option, data)
    if option == p.Option.EXPORT_NAME:
        export = lookup(data)
        if export is None:  # "the server MUST terminate the session"
            assert outcome.close and not outcome.replies and outcome.agreement is None
            return outcome
        (reply,) = outcome.replies
        assert len(reply) == (10 if model.no_zeroes else 134)
        fields = p.export_name_reply.parse(reply, padded=not model.no_zeroes)
        assert (fields.size, reply[10:]) == (export.size, bytes(len(reply) - 10))
        check_agreement(outcome.agreement, export, model)
        return outcome

    parsed = split_replies(option, outcome.replies)
    assert parsed, "an option without a reply"
    final = parsed[-1][0]
    event(f"{name_of(p.Option, option)} -> {name_of(p.OptionReply, final)}")
    assert outcome.close == (option == p.Option.ABORT)
    assert (outcome.agreement is not None) == (option == p.Option.GO and final == p.OptionReply.ACK)

    if option == p.Option.ABORT:
        assert final == p.OptionReply.ACK
    elif option in EXTENSION_OPTIONS:
        if final == p.OptionReply.ACK:
            model.extended = model.structured = True
    elif option == p.Option.STARTTLS:
        # "NOTLS mode": ERR_POLICY or ERR_UNSUP "or another error explicitly permitted",
        # such as "NBD_REP_ERR_INVALID if the client included data" (NBD_OPT_STARTTLS).
        expected = {p.OptionReply.ERR_POLICY, p.OptionReply.ERR_UNSUP}
        if data:
            expected.add(p.OptionReply.ERR_INVALID)
        assert len(parsed) == 1 and final in expected, parsed
    elif option not in KNOWN_OPTIONS:
        assert parsed == [(p.OptionReply.ERR_UNSUP, parsed[0][1])], parsed
    elif option == p.Option.LIST:
        if data:
            assert parsed == [(p.OptionReply.ERR_INVALID, parsed[0][1])]
        else:
            assert final == p.OptionReply.ACK
            listed = [p.server_reply.parse(payload).name for _, payload in parsed[:-1]]
            assert sorted(listed) == sorted(BY_NAME)
    elif option == p.Option.STRUCTURED_REPLY:
        if data:
            assert final == p.OptionReply.ERR_INVALID
        elif not model.extended:
            assert final == p.OptionReply.ACK
            model.structured = True
    elif option in (p.Option.INFO, p.Option.GO):
        request = parse_info(data)
        if request is None:
            assert parsed == [(p.OptionReply.ERR_INVALID, parsed[0][1])], parsed
        else:
            export = lookup(request[0])
            if export is None:  # unknown, or a name that is not UTF-8
                assert len(parsed) == 1 and final in (p.OptionReply.ERR_UNKNOWN, p.OptionReply.ERR_INVALID)
            else:
                assert final == p.OptionReply.ACK, parsed
                check_infos(parsed, export, model)
                if option == p.Option.GO:
                    check_agreement(outcome.agreement, export, model)
    else:
        check_meta_context(option, data, parsed, model)
    return outcome


def check_meta_context(option: int, data: bytes, parsed, model: Model) -> None:
    setting = option == p.Option.SET_META_CONTEXT
    final = parsed[-1][0]
    if setting:  # "replaces all previously-set metadata contexts (including when this command fails)"
        model.contexts, model.context_export = set(), None
    request = parse_meta(data)
    if not model.structured:
        # SET "MUST NOT be requested unless structured replies have been negotiated
        # first ... a server SHOULD send NBD_REP_ERR_INVALID"; for LIST it MAY.
        if setting:
            assert parsed == [(p.OptionReply.ERR_INVALID, parsed[0][1])]
        return
    if request is None:  # "syntactically invalid ... MUST fail the request with ERR_INVALID"
        assert parsed == [(p.OptionReply.ERR_INVALID, parsed[0][1])], parsed
        return
    export = lookup(request[0])
    if export is None:
        assert len(parsed) == 1 and final in (p.OptionReply.ERR_UNKNOWN, p.OptionReply.ERR_INVALID)
        return
    if not all(utf8(query) for query in request[1]):  # strings are UTF-8 ("Conventions")
        assert parsed == [(p.OptionReply.ERR_INVALID, parsed[0][1])], parsed
        return
    assert final == p.OptionReply.ACK, parsed
    replies = [p.meta_context_reply.parse(payload) for _, payload in parsed[:-1]]
    returned = {reply.name for reply in replies}
    assert returned == expected_meta_contexts(request[1], setting), (request, returned)
    if setting:
        ids = [reply.context_id for reply in replies]
        assert len(set(ids)) == len(ids), "two contexts with one id"
        model.contexts, model.context_export = returned, export.name


def check_agreement(agreement, export: ExportInfo, model: Model) -> None:
    assert agreement.export.name == export.name
    assert agreement.structured_replies == model.structured
    selected = model.contexts if model.context_export == export.name else set()
    assert set(agreement.meta_contexts.values()) == selected


# -- the properties -----------------------------------------------------------------


@given(st.sampled_from(VALID_CLIENT_FLAGS), st.lists(options(), max_size=40))
@example(p.ClientFlags.FIXED_NEWSTYLE, [
    (p.Option.SET_META_CONTEXT, meta_context_request("alpha", [p.BASE_ALLOCATION])),  # before SR: refused
    (p.Option.STRUCTURED_REPLY, b""),
    (p.Option.GO, info_request("alpha"))])
@example(p.ClientFlags.FIXED_NEWSTYLE, [
    (p.Option.STRUCTURED_REPLY, b""),
    (p.Option.SET_META_CONTEXT, meta_context_request("beta", [p.BASE_ALLOCATION])),  # another export
    (p.Option.GO, info_request(""))])
@example(p.ClientFlags.FIXED_NEWSTYLE, [(p.Option.GO, struct.pack(">I", 0xFFFFFFFF) + b"alpha\0\0")])
def test_option_sequences_get_the_spec_answers(client_flags, sequence):
    negotiation = Negotiation(EXPORTS)
    assert len(negotiation.greeting()) == 18
    negotiation.receive_client_flags(struct.pack(">I", client_flags))
    model = Model(no_zeroes=bool(client_flags & p.ClientFlags.NO_ZEROES))
    for option, data in sequence:
        assert negotiation.state is State.OPTIONS
        outcome = check_option(negotiation, model, option, data)
        if outcome is None:  # dropped
            break
        if outcome.close or outcome.agreement is not None:
            assert negotiation.state is not State.OPTIONS
            break


@given(st.sampled_from(VALID_CLIENT_FLAGS),
       st.lists(st.tuples(option_numbers, st.binary(max_size=64)), max_size=30))
def test_raw_option_bytes_never_raise_anything_else(client_flags, sequence):
    """Arbitrary (option, bytes) pairs: only RemoteProtocolError may escape."""
    negotiation = Negotiation(EXPORTS)
    negotiation.receive_client_flags(struct.pack(">I", client_flags))
    for option, data in sequence:
        try:
            outcome = negotiation.receive_option(option, data)
        except RemoteProtocolError:
            return
        if option != p.Option.EXPORT_NAME:
            split_replies(option, outcome.replies)
        if outcome.close or outcome.agreement is not None:
            return


def test_too_many_options_end_the_handshake():
    """A bounded number of options per handshake: past it, a RemoteProtocolError."""
    negotiation = Negotiation(EXPORTS)
    negotiation.receive_client_flags(struct.pack(">I", p.ClientFlags.FIXED_NEWSTYLE))
    for _ in range(MAX_OPTIONS):
        negotiation.receive_option(p.Option.LIST, b"")
    with pytest.raises(RemoteProtocolError):
        negotiation.receive_option(p.Option.LIST, b"")


@given(u32)
@example(0xFFFFFFFF)
def test_client_flags_are_accepted_only_when_known_and_fixed(flags):
    """'Client flags': unknown or unadvertised flags MUST drop the connection (and
    pfnbd insists on fixed newstyle)."""
    negotiation = Negotiation(EXPORTS)
    acceptable = flags in VALID_CLIENT_FLAGS
    try:
        negotiation.receive_client_flags(struct.pack(">I", flags))
    except RemoteProtocolError:
        assert not acceptable, f"flags {flags:#x} refused"
    else:
        assert acceptable, f"flags {flags:#x} accepted"
        assert negotiation.state is State.OPTIONS
