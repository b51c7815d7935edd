"""`kvpn-agent run` on each WireGuard backend without a cluster: restarts that drop nothing, and `--backend auto`.

The agent serves its state file here (no API server: the VM tier's guest is too slow to run the
control plane too). The ``kernel`` cases run in the VM tier; those that unload the WireGuard module
exist only there.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.commands import run
from harness.netlab import wait_for
from harness.traffic import RequestLoop, TcpProbe, curl, echo_server
from kvpn_agent.dataplane import build_dataplane
from kvpn_agent.processes import WireGuardGo
from kvpn_agent.sync import sync
from kvpn_agent.uapi import UapiClient
from tests.dataplane.agent_world import RESYNC, StateWorld, state_file_world
from tests.dataplane.conftest import NODE_SIDE, PORT, SERVICE, Site, both_backends

pytestmark = [pytest.mark.root]

URL = f"http://{SERVICE}:{PORT}/"
ECHO_PORT = 7007


@pytest.fixture
def world(site: Site, tmp_path: Path) -> Iterator[StateWorld]:
    with state_file_world(site, tmp_path) as made:
        yield made


@both_backends
def test_sigkill_and_restart_of_the_agent_loses_no_packet_and_adopts_the_interface(world: StateWorld) -> None:
    """The interface and its sessions live in the kernel (or in wireguard-go's own session): a killed agent
    takes nothing with it, and the next one adopts the interface as it is: same link, same session."""
    site = world.site
    time.sleep(RESYNC + 0.5)  # a resync has read back the node since the laptop came up
    index = site.ifindex()
    before = world.device().peers[world.laptop.public_key]
    assert before.last_handshake is not None
    pids = wireguard_go_pids(site)
    echo_server(site.lab, site.service_ns, SERVICE, ECHO_PORT)
    with (
        TcpProbe(site.lab, site.laptop_ns, SERVICE, ECHO_PORT, site.tmp / "tcp-probe.log") as probe,
        RequestLoop(site.laptop_ns, URL, NODE_SIDE) as requests,
    ):
        time.sleep(0.5)
        world.agent.stop(signal.SIGKILL)
        time.sleep(1)
        world.agent.start()  # returns once /readyz says the dataplane is as desired
        time.sleep(RESYNC + 0.5)  # and one resync
    tcp = probe.result()
    assert requests.attempts > 5
    assert requests.failures == [], world.diagnose()
    assert tcp["broken"] is None, tcp
    assert tcp["received"] == tcp["sent"], tcp
    assert site.ifindex() == index  # adopted, not re-created
    assert wireguard_go_pids(site) == pids
    after = world.device().peers[world.laptop.public_key]
    assert after.last_handshake == before.last_handshake  # the session went on: no new handshake was needed
    syncs = [r for r in world.agent.records(start=1) if r.get("message") == "synced"]
    assert syncs, world.agent.log_tail()
    assert syncs[0]["actions"] == 0, syncs
    print(f"{site.backend}: {requests.attempts} requests, TCP max gap {tcp['max_gap_s']} s across the agent's restart")


def wireguard_go_pids(site: Site) -> list[str]:
    pids = run("ip", "netns", "pids", site.node).stdout.split()
    return sorted(p for p in pids if "wireguard-go" in _cmdline(p))


def _cmdline(pid: str) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_text()
    return ""


# --- backend auto, in the VM tier: with the module, and with it unloaded -----------------------------

MODPROBE = Path("/proc/sys/kernel/modprobe")
REFUSING = """#!/bin/sh
# Stands in for the kernel's module loader while a test needs a kernel without WireGuard.
case "$*" in *wireguard*) exit 1 ;; esac
exec {original} "$@"
"""


@contextlib.contextmanager
def wireguard_unloaded(folder: Path) -> Iterator[None]:
    """The WireGuard module out of the kernel, and kept out (the kernel loads it on demand otherwise:
    `ip link add type wireguard` and the generic netlink family lookup both ask); loaded again after."""
    original = MODPROBE.read_text().strip()
    wrapper = folder / "refusing-modprobe"
    wrapper.write_text(REFUSING.format(original=original))
    wrapper.chmod(0o755)
    MODPROBE.write_text(str(wrapper))
    try:
        # Deleted namespaces release their links (and so the module) a moment later.
        wait_for(
            lambda: (
                not Path("/sys/module/wireguard").exists()
                or subprocess.run(["rmmod", "wireguard"], capture_output=True, check=False).returncode == 0
            ),
            20,
            "the wireguard module to be unloaded (a WireGuard link left somewhere holds it)",
        )
        yield
    finally:
        MODPROBE.write_text(original)
        subprocess.run(["modprobe", "wireguard"], check=True, timeout=60)


@pytest.mark.vm
def test_auto_picks_the_kernel_where_the_module_loads_and_userspace_where_it_does_not(
    site: Site, tmp_path: Path
) -> None:
    loaded = build_dataplane("auto", site.node, tmp_path / "wireguard-go")
    assert (loaded.backend, loaded.wggo is not None, loaded.fallback is not None) == ("kernel", True, True)
    loaded.netlink.close()
    with wireguard_unloaded(tmp_path):
        unloaded = build_dataplane("auto", site.node, tmp_path / "wireguard-go")
        assert (unloaded.backend, unloaded.fallback) == ("userspace", None)
        unloaded.netlink.close()


@pytest.mark.vm
def test_auto_serves_a_server_the_kernel_refuses_with_wireguard_go(site: Site, tmp_path: Path) -> None:
    """Kernel WireGuard chosen at start, then refused for a new server (here: the module unloaded and
    kept out): that server runs on wireguard-go, says why, and its laptop gets through."""
    dataplane = build_dataplane("auto", site.node, tmp_path / "wireguard-go")
    assert dataplane.fallback is not None
    assert dataplane.wggo is not None
    try:
        with wireguard_unloaded(tmp_path):
            laptop = site.add_peer()
            result = sync([site.desired()], dataplane.link, dataplane.wireguard, dataplane.firewall)
            assert result.errors == {}, result.errors
            why = dataplane.fallback.failed[site.interface]
            assert why.startswith("link creation refused: "), why
            assert UapiClient(site.interface).exists()  # wireguard-go serves it
            assert dataplane.userspace(site.interface)
            assert site.interface in dataplane.wggo.devices()
            device = dataplane.reader.get(site.interface)  # the reporter's view follows the fallback too
            assert device is not None
            assert set(device.peers) == {laptop.public_key}
            assert sync([site.desired()], dataplane.link, dataplane.wireguard, dataplane.firewall).actions == []
            site.up(laptop)
            assert curl(site.laptop_ns, URL, max_time=5) == NODE_SIDE, site.diagnose()
    finally:
        if isinstance(dataplane.wggo, WireGuardGo):  # no supervisor here: the agent's own children
            dataplane.wggo.stop_all()
        dataplane.netlink.close()
    assert Path("/sys/module/wireguard").exists()
