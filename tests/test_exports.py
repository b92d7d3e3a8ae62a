"""Many volumes behind one `pfnbd serve`: every export has its own data, `--all`
exports the whole data directory, and NBD_OPT_LIST / NBD_OPT_INFO describe each
export (size, replica count, snapshot of what) to nbdinfo and libnbd."""

from __future__ import annotations

import json
import random
import re

from conftest import Server
from test_cli import assert_fails_with_one_line
from test_libnbd_clients import libnbd, nbdinfo, nbdinfo_json
from test_qemu_clients import assert_volume_holds, qemu_io, write_pattern
from test_snapshots import qemu_io_read_only

KiB = 1 << 10
MiB = 1 << 20


def size_pattern(size: int) -> str:
    """How a description may spell a size: 16 MiB, 16M, 16 MB or 16777216."""
    return rf"\b({size // MiB} ?Mi?B?|{size})\b"


def assert_describes(description: str, volume: str, size: int, replicas: int) -> None:
    assert volume in description, description
    assert re.search(size_pattern(size), description), f"no size {size} in {description!r}"
    assert re.search(rf"\b{replicas} replicas?\b|\breplicas?\W+{replicas}\b", description), (
        f"no replica count {replicas} in {description!r}")


# Writes (export, offset, seed, length) with libnbd, two connections, pipelined and
# interleaved so both exports have requests in flight at once.
INTERLEAVED_WRITES = r'''
writes = json.loads(sys.argv[2])
handles = {name: connect(sys.argv[1].replace("EXPORT", name)) for name in {w[0] for w in writes}}
cookies = {name: [] for name in handles}
for name, offset, seed, length in writes:
    cookies[name].append(handles[name].aio_pwrite(nbd.Buffer.from_bytearray(pattern(seed, length)), offset))
for name, h in handles.items():
    wait_for_all(h, cookies[name])
print(json.dumps({name: h.get_size() for name, h in handles.items()}))
'''


def test_two_volumes_on_one_server_keep_their_own_data(start_server, tmp_path):
    sizes = {"vol_a": 8 * MiB, "vol_b": 4 * MiB}
    server = start_server({name: str(size) for name, size in sizes.items()})
    models = {name: bytearray(size) for name, size in sizes.items()}

    qemu_io(server.uri("vol_a"), write_pattern(models["vol_a"], 0xaa, 0, 1 * MiB))
    qemu_io(server.uri("vol_b"), write_pattern(models["vol_b"], 0xbb, 512 * KiB, 1 * MiB))
    # Both exports get different data at the same offsets, in flight together.
    writes = [[name, offset, 2 * i + j, 64 * KiB + i * 512]
              for i, offset in enumerate(range(1 * MiB, 3 * MiB, 128 * KiB))
              for j, name in enumerate(sizes)]
    for name, offset, seed, length in writes:
        models[name][offset:offset + length] = random.Random(seed).randbytes(length)
    uri = f"nbd+unix:///EXPORT?socket={server.socket}"
    assert libnbd(INTERLEAVED_WRITES, uri, json.dumps(writes)) == sizes

    qemu_io(server.uri("vol_a"), "read -P 0xaa 0 1M")
    qemu_io(server.uri("vol_b"), "read -P 0 0 512k", "read -P 0xbb 512k 512k")
    for name, model in models.items():
        assert_volume_holds(server.uri(name), bytes(model), tmp_path)


def test_a_volume_and_its_snapshot_on_one_server(start_server, cli, tmp_path):
    head = bytearray(8 * MiB)
    first = start_server({"test_v1": "8M"})
    qemu_io(first.uri(), write_pattern(head, 0xaa, 0, 2 * MiB))
    assert first.stop() == 0
    cli.run("volume", "snapshot", "test_v1", "snap1")
    moment = bytes(head)

    server = start_server({}, exports=["test_v1", "test_v1@snap1"])
    qemu_io(server.uri(), write_pattern(head, 0xbb, 1 * MiB, 2 * MiB))

    qemu_io_read_only(server.uri("test_v1@snap1"), "read -P 0xaa 0 2M", "read -P 0 2M 1M")
    qemu_io(server.uri(), "read -P 0xaa 0 1M", "read -P 0xbb 1M 2M")
    assert_volume_holds(server.uri("test_v1@snap1"), moment, tmp_path)
    assert_volume_holds(server.uri(), bytes(head), tmp_path)
    listed = {e["export-name"]: e for e in nbdinfo_json("--list", server.uri(""))["exports"]}
    assert {name: e["is_read_only"] for name, e in listed.items()} == {"test_v1": False, "test_v1@snap1": True}


def test_all_exports_every_volume(start_server, cli, tmp_path):
    volumes = {"alpha": (1 * MiB, 1), "beta": (4 * MiB, 2), "gamma": (64 * MiB, 3)}
    for name, (size, replicas) in volumes.items():
        cli.run("volume", "create", name, "--size", str(size), "--replicas", str(replicas))

    server = start_server({}, "--all", exports=[])

    listed = {e["export-name"]: e for e in nbdinfo_json("--list", server.uri(""))["exports"]}
    assert {name: e["export-size"] for name, e in listed.items()} == {n: s for n, (s, _) in volumes.items()}
    for byte, (name, (size, replicas)) in enumerate(volumes.items(), start=0x11):
        assert_describes(listed[name].get("description", ""), name, size, replicas)
        model = bytearray(size)
        qemu_io(server.uri(name), write_pattern(model, byte, size - 64 * KiB, 64 * KiB))
        assert_volume_holds(server.uri(name), bytes(model), tmp_path)


def test_all_refuses_volume_names_and_an_empty_data_directory(cli, tmp_path):
    socket = str(tmp_path / "refused.sock")
    assert_fails_with_one_line(cli.run("serve", "--all", "--socket", socket, check=False), "--all")
    cli.run("volume", "create", "alpha", "--size", "1M")
    assert_fails_with_one_line(
        cli.run("serve", "--all", "--volume", "alpha", "--socket", socket, check=False), "--all")
    assert not (tmp_path / "refused.sock").exists()


# NBD_OPT_LIST, then NBD_OPT_INFO for every listed name, an unknown one, and the
# default (empty) one; then NBD_OPT_GO into the snapshot, all on one connection.
LIST_AND_INFO = r'''
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)  # ask INFO for descriptions too
h.connect_uri(sys.argv[1])
listed = {}
h.opt_list(lambda name, description: listed.__setitem__(name, description) or 0)
info = {}
for name in [*listed, ""]:
    h.set_export_name(name)
    h.opt_info()
    info[name] = {"canonical": h.get_canonical_export_name(), "size": h.get_size(),
                  "read_only": h.is_read_only(), "description": h.get_export_description()}
h.set_export_name("nope")
expect_errno("ENOENT", h.opt_info)
h.set_export_name(sys.argv[2])
h.opt_go()
print(json.dumps({"listed": listed, "info": info, "first_sector": h.pread(512, 0)[0]}))
'''


def test_list_and_info_describe_size_replicas_and_snapshots(start_server, cli):
    cli.run("volume", "create", "test_v1", "--size", "16M")
    cli.run("volume", "create", "triple", "--size", "4M", "--replicas", "3")
    cli.run("volume", "snapshot", "test_v1", "snap1")
    server: Server = start_server({}, exports=["test_v1", "triple", "test_v1@snap1"])

    result = libnbd(LIST_AND_INFO, server.uri(""), "test_v1@snap1")

    listed, info = result["listed"], result["info"]
    assert sorted(listed) == ["test_v1", "test_v1@snap1", "triple"]
    assert {name: i["description"] for name, i in info.items() if name} == listed
    assert info[""] == {**info["test_v1"], "canonical": "test_v1"}
    assert {name: (i["size"], i["read_only"]) for name, i in info.items() if name} == {
        "test_v1": (16 * MiB, False), "triple": (4 * MiB, False), "test_v1@snap1": (16 * MiB, True)}
    assert_describes(listed["test_v1"], "test_v1", 16 * MiB, 1)
    assert_describes(listed["triple"], "triple", 4 * MiB, 3)
    snapshot = listed["test_v1@snap1"]
    assert_describes(snapshot, "test_v1", 16 * MiB, 1)
    assert re.search(r"\bsnapshot\b", snapshot) and "snap1" in snapshot, snapshot
    assert result["first_sector"] == 0

    text = nbdinfo("--list", server.uri("")).stdout
    for name, description in listed.items():
        assert f'export="{name}":\n\tdescription: {description}\n' in text, text
