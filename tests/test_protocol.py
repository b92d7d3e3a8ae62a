"""Every wire schema builds what it parses, and the struct forms agree with the schemas."""

import construct
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pfnbd import protocol as p

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
text = st.text(max_size=64).filter(lambda s: "\x00" not in s)

SCHEMAS = {
    "greeting": (p.greeting, st.fixed_dictionaries({"flags": u16})),
    "client_flags": (p.client_flags, st.fixed_dictionaries({"flags": u32})),
    "option_header": (p.option_header, st.fixed_dictionaries({"magic": u64, "option": u32, "length": u32})),
    "option_reply_header": (p.option_reply_header,
                            st.fixed_dictionaries({"option": u32, "type": u32, "length": u32})),
    "info_request": (p.info_request, st.fixed_dictionaries({"name": text, "requests": st.lists(u16, max_size=8)})),
    "meta_context_request": (p.meta_context_request,
                             st.fixed_dictionaries({"name": text, "queries": st.lists(text, max_size=4)})),
    "server_reply": (p.server_reply, st.fixed_dictionaries({"name": text, "description": text})),
    "meta_context_reply": (p.meta_context_reply, st.fixed_dictionaries({"context_id": u32, "name": text})),
    "request": (p.request, st.fixed_dictionaries(
        {"magic": u32, "flags": u16, "type": u16, "cookie": u64, "offset": u64, "length": u32})),
    "simple_reply": (p.simple_reply, st.fixed_dictionaries({"error": u32, "cookie": u64})),
    "chunk_header": (p.chunk_header, st.fixed_dictionaries(
        {"flags": u16, "type": u16, "cookie": u64, "length": u32})),
    "offset_hole": (p.chunk_payloads[p.ChunkType.OFFSET_HOLE],
                    st.fixed_dictionaries({"offset": u64, "size": u32})),
    "offset_data": (p.chunk_payloads[p.ChunkType.OFFSET_DATA],
                    st.fixed_dictionaries({"offset": u64, "data": st.binary(max_size=64)})),
    "block_status": (p.chunk_payloads[p.ChunkType.BLOCK_STATUS], st.fixed_dictionaries({
        "context_id": u32,
        "extents": st.lists(st.fixed_dictionaries({"length": u32, "flags": u32}), max_size=8)})),
    "error": (p.chunk_payloads[p.ChunkType.ERROR], st.fixed_dictionaries({"error": u32, "message": text})),
    "error_offset": (p.chunk_payloads[p.ChunkType.ERROR_OFFSET],
                     st.fixed_dictionaries({"error": u32, "message": text, "offset": u64})),
}

INFO_PAYLOADS = st.one_of(
    st.fixed_dictionaries({"type": st.just(p.Info.EXPORT),
                           "info": st.fixed_dictionaries({"size": u64, "flags": u16})}),
    st.fixed_dictionaries({"type": st.just(p.Info.NAME), "info": st.fixed_dictionaries({"name": text})}),
    st.fixed_dictionaries({"type": st.just(p.Info.DESCRIPTION),
                           "info": st.fixed_dictionaries({"description": text})}),
    st.fixed_dictionaries({"type": st.just(p.Info.BLOCK_SIZE), "info": st.fixed_dictionaries(
        {"minimum": u32, "preferred": u32, "maximum": u32})}),
)


def assert_round_trip(schema: construct.Construct, value: dict) -> None:
    data = schema.build(value)
    parsed = schema.parse(data)
    for key, expected in value.items():
        got = parsed[key]
        if isinstance(expected, list) and expected and isinstance(expected[0], dict):
            got = [dict((k, v) for k, v in item.items() if not k.startswith("_")) for item in got]
        elif isinstance(expected, dict):
            got = {k: v for k, v in got.items() if not k.startswith("_")}
        assert got == expected, key
    assert schema.build(parsed) == data


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_round_trip(name):
    schema, values = SCHEMAS[name]

    @given(values)
    def check(value):
        assert_round_trip(schema, value)

    check()


@given(INFO_PAYLOADS)
def test_info_reply_round_trip(value):
    assert_round_trip(p.info_reply, value)


@given(st.fixed_dictionaries({"size": u64, "flags": u16}), st.booleans())
def test_export_name_reply_with_and_without_zeroes(value, padded):
    data = p.export_name_reply.build(value, padded=padded)
    assert len(data) == (134 if padded else 10)
    assert data[10:] == bytes(len(data) - 10)
    parsed = p.export_name_reply.parse(data, padded=padded)
    assert (parsed.size, parsed.flags) == (value["size"], value["flags"])


EXTENDED_REQUESTS = st.fixed_dictionaries(
    {"magic": u32, "flags": u16, "type": u16, "cookie": u64, "offset": u64, "length": u64})
EXTENDED_CHUNK_HEADERS = st.fixed_dictionaries(
    {"flags": u16, "type": u16, "cookie": u64, "offset": u64, "length": u64})


@pytest.mark.parametrize("schema, layout, values", [
    (p.request, p.request_layout, SCHEMAS["request"][1]),
    (p.extended_request, p.extended_request_layout, EXTENDED_REQUESTS),
    (p.simple_reply, p.simple_reply_layout, SCHEMAS["simple_reply"][1]),
    (p.chunk_header, p.chunk_header_layout, SCHEMAS["chunk_header"][1]),
    (p.extended_chunk_header, p.extended_chunk_header_layout, EXTENDED_CHUNK_HEADERS),
    (p.offset_data_prefix, p.offset_data_prefix_layout, st.fixed_dictionaries({"offset": u64})),
    (p.offset_data_head, p.offset_data_head_layout, st.fixed_dictionaries(
        {"flags": u16, "type": u16, "cookie": u64, "length": u32, "offset": u64})),
], ids=lambda value: getattr(value, "format", None))
def test_fixed_layouts_agree_with_their_schemas(schema, layout, values):
    """The struct forms the per-request path uses: same bytes built, same fields parsed."""
    names = [field.name for field in schema.subcons]

    @given(values)
    def check(value):
        data = schema.build(value)
        parsed = schema.parse(data)
        fields = [parsed[name] for name in names]  # constants included, as built
        assert layout.pack(*fields) == data
        assert list(layout.unpack(data)) == fields

    check()


def test_fixed_layout_refuses_schemas_it_cannot_represent():
    with pytest.raises(TypeError):
        p.fixed_layout(p.info_request)


def test_wire_sizes_match_the_spec():
    assert p.greeting.sizeof() == 18
    assert p.option_header.sizeof() == 16
    assert p.option_reply_header.sizeof() == 20
    assert p.request.sizeof() == 28
    assert p.simple_reply.sizeof() == 16
    assert p.chunk_header.sizeof() == 20


def test_option_payloads_must_end_where_their_length_says():
    good = p.info_request.build({"name": "v", "requests": [p.Info.BLOCK_SIZE]})
    with pytest.raises(construct.ConstructError):
        p.info_request.parse(good + b"\0")
    with pytest.raises(construct.ConstructError):
        p.info_request.parse(good[:-1])
    # A name length pointing past the end of the option is an error, not a big read.
    with pytest.raises(construct.ConstructError):
        p.info_request.parse(b"\xff\xff\xff\xf0abc\x00\x00")
