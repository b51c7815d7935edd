"""The running agent at 10,000 peers: a binding change reaches wireguard-go and nftables within a second."""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.factories import binding_secret, key, keypair
from harness.netlab import Lab, wait_for
from kvpn_agent.dataplane import build_dataplane
from kvpn_agent.desired import interface_name
from kvpn_agent.runner import Agent, Settings
from kvpn_agent.served import secret_index
from kvpn_agent.state import StateFile
from kvpn_agent.uapi import UapiClient
from kvpn_agent.watch import Obj, Store
from kvpn_core.contract import LABEL_ROLE, LABEL_SERVER, ROLE_SERVER_KEY, PeerBinding, encode_data

pytestmark = [pytest.mark.root, pytest.mark.slow]

PEERS = 10_000
NAMESPACE, SERVER = "scale", "big"


@dataclass
class FilledWatch:
    """Stands in for a watch on the API server: the test fills the store and notifies the agent."""

    store: Store
    synced: threading.Event = field(default_factory=threading.Event)
    connected: bool = True

    def __post_init__(self) -> None:
        self.synced.set()

    def start(self) -> None:
        pass


def binding(i: int, version: str = "1", enabled: bool = True) -> Obj:
    public = base64.b64encode(i.to_bytes(4, "big") + os.urandom(28)).decode()
    pb = PeerBinding(
        peer_namespace=NAMESPACE,
        peer_name=f"p{i}",
        peer_uid=f"u{i}",
        public_key=public,
        preshared_key=key(),
        addresses=[f"10.100.{(i + 2) // 256}.{(i + 2) % 256}"],
        enabled=enabled,
    )
    return binding_secret(SERVER, pb, namespace=NAMESPACE, resource_version=version)


@pytest.fixture
def agent(lab: Lab, tmp_path: Path) -> Iterator[tuple[Agent, Store]]:
    node = lab.netns("node")
    lab.interfaces.append(interface_name(NAMESPACE, SERVER))
    dataplane = build_dataplane("userspace", node, tmp_path / "wireguard-go")
    settings = Settings(resync_seconds=3600, report_seconds=3600, start_timeout=0)
    made = Agent(settings, dataplane, StateFile(tmp_path / "state"), api=None)
    servers, secrets = Store(), Store(secret_index)
    made.server_watches[""] = FilledWatch(servers)  # type: ignore[assignment]
    made.secret_watches[""] = FilledWatch(secrets)  # type: ignore[assignment]
    server_key, _ = keypair()
    servers.put(
        {
            "metadata": {"namespace": NAMESPACE, "name": SERVER, "resourceVersion": "1"},
            "spec": {"addressPool": ["10.100.0.0/16"], "routes": ["10.96.0.0/12"]},
        }
    )
    secrets.put(
        {
            "metadata": {
                "namespace": NAMESPACE,
                "name": f"kvpn-server-{SERVER}",
                "resourceVersion": "1",
                "labels": {LABEL_SERVER: SERVER, LABEL_ROLE: ROLE_SERVER_KEY},
            },
            "data": encode_data({"privateKey": server_key}),
        }
    )
    for i in range(PEERS):
        secrets.put(binding(i))
    stop = threading.Event()
    thread = threading.Thread(target=made.run, args=(stop,))
    thread.start()
    try:
        wait_for(made.synced.is_set, 120, "the cold sync of 10,000 peers")
        yield made, secrets
    finally:
        stop.set()
        thread.join(timeout=30)
        dataplane.netlink.close()


def incremental_syncs(agent: Agent) -> float:
    value = agent.metrics.registry.get_sample_value("kvpn_agent_sync_duration_seconds_count", {"mode": "incremental"})
    return value or 0.0


def test_one_binding_change_applies_within_a_second(agent: tuple[Agent, Store]) -> None:
    running, secrets = agent
    interface = interface_name(NAMESPACE, SERVER)
    assert len(UapiClient(interface).get().peers) == PEERS
    cold = running.metrics.registry.get_sample_value("kvpn_agent_sync_duration_seconds_sum", {"mode": "full"})
    latencies = []
    changes = [binding(PEERS + 1), binding(7, version="2", enabled=False), binding(8, version="2")]
    for change in changes:
        before = incremental_syncs(running)
        started = time.perf_counter()
        secrets.put(change)
        running.notify((NAMESPACE, SERVER))
        wait_for(lambda: incremental_syncs(running) > before, 5, "the incremental sync")  # noqa: B023
        latencies.append(time.perf_counter() - started)
    peers = UapiClient(interface).get().peers
    assert len(peers) == PEERS  # one added, one disabled, one re-keyed (removed and added)
    print(
        f"{PEERS} peers: cold sync {cold:.2f} s; binding change -> applied "
        + ", ".join(f"{t * 1000:.0f} ms" for t in latencies)
    )
    assert max(latencies) < 1.0
