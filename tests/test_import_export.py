"""`pfnbd volume import` and `volume export` without a server: raw images sparse both
ways, qcow2 and vmdk through qemu-img, snapshots exported as of their moment, and
what an imported volume holds checked through a server with QEMU's and libnbd's tools."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

import pytest

from conftest import Cli, pfnbd_command, run
from test_cli import assert_fails_with_one_line
from test_faults import pattern
from test_libnbd_clients import allocation_map
from test_qemu_clients import STEP_TIMEOUT, assert_volume_holds, qemu_io, write_pattern
from test_snapshots import allocated_bytes

KiB = 1 << 10
MiB = 1 << 20
SPARSE = 1 * MiB  # more than the few KiB of data below, far less than the 64 MiB images
DATA = 0  # base:allocation type nbdinfo --map prints for data


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def write_sparse_image(path: Path, size: int, pieces: dict[int, bytes]) -> None:
    """A sparse file of `size` bytes with `pieces` (offset -> data) and holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)


def scattered_pieces(size: int) -> dict[int, bytes]:
    """A little data: sector-aligned, unaligned at both ends, and in the last sector."""
    return {1 * MiB: pattern(1, 4 * KiB), 40 * MiB + 100: pattern(2, 5000), size - 512: pattern(3, 512)}


def compare_images(image: str, image_format: str, raw: str) -> None:
    result = run("qemu-img", "compare", "-f", image_format, "-F", "raw", image, raw,
                 timeout=STEP_TIMEOUT, check=False)
    assert result.returncode == 0 and "Images are identical." in result.stdout, result


def test_sparse_raw_image_round_trips_byte_identical_and_stays_sparse(cli, start_server, tmp_path):
    size = 64 * MiB
    source, exported = tmp_path / "source.raw", tmp_path / "exported.raw"
    write_sparse_image(source, size, scattered_pieces(size))
    with open(source, "r+b") as f:  # allocated zeros are no data either
        f.seek(16 * MiB)
        f.write(bytes(8 * MiB))
    assert allocated(source) >= 8 * MiB

    imported = cli.run("volume", "import", "test_v1", str(source))
    assert "test_v1" in imported.stdout, imported
    assert json.loads(cli.run("volume", "info", "test_v1", "--json").stdout)["size"] == size
    used = allocated_bytes(cli.data_dir)
    assert used < SPARSE, f"the import allocated {used} bytes"

    server = start_server({}, exports=["test_v1"])
    assert_volume_holds(server.uri(), source.read_bytes(), tmp_path)
    data = sum(length for _, length, kind in allocation_map(server.uri()) if kind == DATA)
    assert 0 < data < SPARSE, f"nbdinfo --map shows {data} bytes of data"
    assert server.stop() == 0

    cli.run("volume", "export", "test_v1", str(exported))
    assert exported.stat().st_size == size
    assert exported.read_bytes() == source.read_bytes()
    assert allocated(exported) < SPARSE, f"the exported file uses {allocated(exported)} bytes"


def test_raw_image_of_an_odd_size_becomes_whole_sectors(cli, tmp_path):
    source, exported = tmp_path / "odd.raw", tmp_path / "exported.raw"
    source.write_bytes(pattern(4, 1 * MiB + 100))

    cli.run("volume", "import", "odd", str(source))
    cli.run("volume", "export", "odd", str(exported))

    assert json.loads(cli.run("volume", "info", "odd", "--json").stdout)["size"] == 1 * MiB + 512
    assert exported.read_bytes() == source.read_bytes() + bytes(412)


@pytest.mark.parametrize("image_format", ["qcow2", "vmdk"])
def test_image_formats_import_through_qemu_img(cli, start_server, tmp_path, image_format):
    size = 64 * MiB
    raw, image, exported = tmp_path / "source.raw", tmp_path / f"source.{image_format}", tmp_path / "out.raw"
    write_sparse_image(raw, size, {**scattered_pieces(size), 8 * MiB: pattern(5, 3 * MiB)})
    run("qemu-img", "convert", "-f", "raw", "-O", image_format, str(raw), str(image), timeout=STEP_TIMEOUT)

    cli.run("volume", "import", "test_v1", str(image))

    assert json.loads(cli.run("volume", "info", "test_v1", "--json").stdout)["size"] == size
    assert allocated_bytes(cli.data_dir) < 3 * MiB + SPARSE
    server = start_server({}, exports=["test_v1"])
    compare_images(str(image), image_format, server.uri())
    assert server.stop() == 0
    cli.run("volume", "export", "test_v1", str(exported))
    compare_images(str(image), image_format, str(exported))
    assert exported.read_bytes() == raw.read_bytes()
    assert allocated(exported) < 3 * MiB + SPARSE


def test_export_of_a_snapshot_is_its_moment(cli, start_server, tmp_path):
    size = 16 * MiB
    source = tmp_path / "source.raw"
    write_sparse_image(source, size, {0: pattern(6, 2 * MiB), size - 4 * KiB: pattern(7, 4 * KiB)})
    cli.run("volume", "import", "test_v1", str(source))
    server = start_server({}, exports=["test_v1"])
    cli.run("volume", "snapshot", "test_v1", "snap1")
    head = bytearray(source.read_bytes())
    qemu_io(server.uri(), write_pattern(head, 0xbb, 1 * MiB, 2 * MiB),
            write_pattern(head, 0xbc, size - 64 * KiB, 64 * KiB))

    # The head is still served; its snapshot can be exported meanwhile.
    cli.run("volume", "export", "test_v1@snap1", str(tmp_path / "snap1.raw"))
    assert (tmp_path / "snap1.raw").read_bytes() == source.read_bytes()
    assert allocated(tmp_path / "snap1.raw") < 2 * MiB + SPARSE
    assert server.stop() == 0
    cli.run("volume", "export", "test_v1", str(tmp_path / "head.raw"))
    assert (tmp_path / "head.raw").read_bytes() == bytes(head)


def test_export_overwrites_only_with_force(cli, tmp_path):
    source, target = tmp_path / "source.raw", tmp_path / "target.raw"
    write_sparse_image(source, 4 * MiB, {512 * KiB: pattern(8, 64 * KiB)})
    cli.run("volume", "import", "test_v1", str(source))
    target.write_bytes(b"\xff" * 8 * MiB)

    refused = cli.run("volume", "export", "test_v1", str(target), check=False)
    assert refused.returncode != 0 and "--force" in refused.stderr, refused  # one line: see below
    assert target.read_bytes() == b"\xff" * 8 * MiB

    cli.run("volume", "export", "test_v1", str(target), "--force")
    assert target.read_bytes() == source.read_bytes()  # the old, longer content is all gone
    assert allocated(target) < SPARSE


def refuse_directory(tmp_path: Path) -> list[str]:
    (tmp_path / "images").mkdir()
    return ["volume", "import", "fresh", str(tmp_path / "images")]


def refuse_import_on_existing_volume(tmp_path: Path) -> list[str]:
    (tmp_path / "other.raw").write_bytes(b"\x11" * MiB)
    return ["volume", "import", "present", str(tmp_path / "other.raw")]


def refuse_corrupt_qcow2(tmp_path: Path) -> list[str]:
    (tmp_path / "broken.qcow2").write_bytes(b"QFI\xfb" + b"\xee" * 4092)
    return ["volume", "import", "broken", str(tmp_path / "broken.qcow2")]


def refuse_existing_target(tmp_path: Path) -> list[str]:
    (tmp_path / "taken.raw").write_bytes(b"\xff" * MiB)
    return ["volume", "export", "present", str(tmp_path / "taken.raw")]


def refuse_bad_name(tmp_path: Path) -> list[str]:
    (tmp_path / "other.raw").write_bytes(b"\x11" * MiB)
    return ["volume", "import", "bad name", str(tmp_path / "other.raw")]


@pytest.mark.parametrize(
    "arguments, words",
    [
        (lambda tmp: ["volume", "import", "fresh", f"{tmp}/missing.raw"], ["missing.raw"]),
        (refuse_directory, ["images"]),
        (refuse_import_on_existing_volume, ["present"]),
        (refuse_bad_name, ["bad name"]),
        (refuse_corrupt_qcow2, ["broken.qcow2"]),
        (lambda tmp: ["volume", "export", "nope", f"{tmp}/out.raw"], ["nope"]),
        (refuse_existing_target, ["taken.raw", "--force"]),
        (lambda tmp: ["volume", "export", "present", f"{tmp}/no/such/dir/out.raw"], ["out.raw"]),
    ],
    ids=["import-missing-file", "import-directory", "import-onto-existing-volume", "import-bad-name",
         "import-corrupt-qcow2", "export-missing-volume", "export-onto-existing-file",
         "export-into-missing-directory"],
)
def test_import_and_export_refuse_bad_input_in_one_line(cli, tmp_path, arguments, words):
    present = tmp_path / "present.raw"
    write_sparse_image(present, 1 * MiB, {0: pattern(9, 4 * KiB)})
    cli.run("volume", "import", "present", str(present))

    assert_fails_with_one_line(cli.run(*arguments(tmp_path), check=False), *words)

    assert [v["name"] for v in json.loads(cli.run("volume", "list", "--json").stdout)] == ["present"]
    cli.run("volume", "export", "present", str(tmp_path / "check.raw"))
    assert (tmp_path / "check.raw").read_bytes() == present.read_bytes()
    assert not (tmp_path / "out.raw").exists()


def output_on_a_terminal(cli: Cli, *args: str) -> tuple[int, str]:
    """Runs `pfnbd ARGS` with a pseudo-terminal as stdin, stdout and stderr."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(pfnbd_command(*args), env=cli.env, stdin=terminal, stdout=terminal,
                                   stderr=terminal, close_fds=True)
        os.close(terminal)
        output = b""
        while chunk := read_or_eof(controller):
            output += chunk
        return process.wait(timeout=STEP_TIMEOUT), output.decode(errors="replace")
    finally:
        os.close(controller)


def read_or_eof(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: every writer of the terminal has gone
        return b""


def test_progress_bar_on_a_terminal_and_plain_output_otherwise(cli, tmp_path):
    source = tmp_path / "source.raw"
    source.write_bytes(pattern(10, 16 * MiB))

    code, shown = output_on_a_terminal(cli, "volume", "import", "on_tty", str(source))
    assert code == 0, shown
    assert "100%" in shown and "\r" in shown, f"no progress bar on a terminal: {shown[-500:]!r}"
    code, shown = output_on_a_terminal(cli, "volume", "export", "on_tty", str(tmp_path / "tty.raw"))
    assert code == 0 and "100%" in shown, f"no progress bar on a terminal: {shown[-500:]!r}"

    for result in (cli.run("volume", "import", "piped", str(source)),
                   cli.run("volume", "export", "piped", str(tmp_path / "piped.raw"))):
        output = result.stdout + result.stderr
        assert "%" not in output and "\r" not in output and "\x1b" not in output, output
        assert len(result.stdout.splitlines()) == 1, result.stdout
    assert (tmp_path / "piped.raw").read_bytes() == (tmp_path / "tty.raw").read_bytes() == source.read_bytes()
