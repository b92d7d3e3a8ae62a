"""Volume management on a real PureFlash cluster, through its conductor's REST API.

The conductor is found the way the client library finds it (`pf_client_api.cpp`,
get_master_conductor_ip): the first child, in name order, of ZooKeeper's
/pureflash/<cluster>/conductors holds the leader's IP; its REST API listens on port
49180 under /s5c/.  ZooKeeper through kazoo, a maintained client, rather than a
hand-written one.
"""

from __future__ import annotations

import configparser
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import attrs

from .store import StoreError

CONDUCTOR_PORT = 49180
TIMEOUT = 10  # seconds for ZooKeeper and for one REST call

# kazoo logs every connect, retry and close; its failures come back as exceptions, which
# find_conductor turns into one line, so its log would only repeat them.
_zookeeper_log = logging.getLogger("pfnbd.zookeeper")
_zookeeper_log.disabled = True


class ConductorError(StoreError):
    """The conductor refused, or cannot be reached: one line for the user."""


@attrs.frozen
class ClusterVolume:
    """A volume as the conductor's list_volume describes it, with `VolumeMeta`'s names."""

    name: str
    size: int
    replicas: int
    id: int
    status: str
    snapshots: tuple = ()  # the conductor has no op that lists them

    def to_json(self) -> dict:
        return attrs.asdict(self)


def _read_conf(path: Path) -> tuple[str, str]:
    """(ZooKeeper hosts, cluster name) from a PureFlash client configuration."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    try:
        with open(path) as conf:
            parser.read_file(conf)
    except (OSError, configparser.Error) as error:
        raise ConductorError(f"cannot read the PureFlash configuration {path}: {error}") from None
    hosts = parser.get("zookeeper", "ip", fallback="")
    if not hosts:
        raise ConductorError(f"{path} names no ZooKeeper ([zookeeper] ip=)")
    return hosts, parser.get("cluster", "name", fallback="cluster1")


def find_conductor(conf: Path) -> str:
    """The leading conductor's REST base URL."""
    from kazoo.client import KazooClient
    from kazoo.exceptions import KazooException, NoNodeError
    from kazoo.handlers.threading import KazooTimeoutError

    hosts, cluster = _read_conf(conf)
    root = f"/pureflash/{cluster}/conductors"
    zk = KazooClient(hosts=hosts, timeout=TIMEOUT, logger=_zookeeper_log)
    try:
        zk.start(timeout=TIMEOUT)
        try:
            leader = min(zk.get_children(root))
            ip = zk.get(f"{root}/{leader}")[0].decode().strip()
        finally:
            zk.stop()
            zk.close()
    except KazooTimeoutError:
        raise ConductorError(f"cannot reach ZooKeeper at {hosts}") from None
    except (NoNodeError, ValueError):
        raise ConductorError(f"no conductor registered in ZooKeeper under {root}") from None
    except KazooException as error:
        raise ConductorError(f"ZooKeeper at {hosts}: {error!r}") from None
    return f"http://{ip}:{CONDUCTOR_PORT}/s5c/"


class Conductor:
    """The volume operations `Store` offers the CLI, on a real cluster."""

    def __init__(self, conf: str | os.PathLike) -> None:
        self.url = find_conductor(Path(conf))

    def call(self, op: str, **params: object) -> dict:
        query = urllib.parse.urlencode({"op": op, **params})
        try:
            with urllib.request.urlopen(f"{self.url}?{query}", timeout=TIMEOUT) as reply:
                answer = json.load(reply)
        except (OSError, ValueError) as error:
            raise ConductorError(f"conductor {self.url}: {error}") from None
        if answer.get("ret_code") != 0:
            reason = answer.get("reason") or f"ret_code {answer.get('ret_code')}"
            raise ConductorError(f"conductor refused {op}: {reason}")
        return answer

    def create(self, name: str, size: int, replicas: int = 1) -> ClusterVolume:
        self.call("create_volume", volume_name=name, size=size, rep_cnt=replicas)
        return self.get(name)

    def list(self) -> list[ClusterVolume]:
        return [self._volume(v) for v in self.call("list_volume").get("volumes", [])]

    def get(self, name: str) -> ClusterVolume:
        volumes = self.call("list_volume", name=name).get("volumes", [])
        matching = [v for v in volumes if v.get("name") == name]
        if not matching:
            raise ConductorError(f"no such volume: {name}")
        return self._volume(matching[0])

    def delete(self, name: str) -> None:
        self.call("delete_volume", volume_name=name)

    def create_snapshot(self, name: str, snapshot: str) -> None:
        self.call("create_snapshot", volume_name=name, snapshot_name=snapshot)

    def delete_snapshot(self, name: str, snapshot: str) -> None:
        self.call("delete_snapshot", volume_name=name, snapshot_name=snapshot)

    @staticmethod
    def _volume(data: dict) -> ClusterVolume:
        return ClusterVolume(data["name"], int(data["size"]), int(data.get("rep_count", 1)),
                             int(data["id"]), str(data.get("status", "")))
