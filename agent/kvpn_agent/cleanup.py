"""`kvpn-agent cleanup`: removes everything the agent made (interfaces and their wireguard-go, table, files)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from kvpn_agent.desired import GATEWAY_PREFIX, interface_name, legacy_interface_name
from kvpn_agent.kernel import KernelWireGuard, empty
from kvpn_agent.linux import SOCKET_DIR
from kvpn_agent.netlink import Netlink
from kvpn_agent.nft import Nft
from kvpn_agent.processes import LOG_FOLDER, process_start_time, socket_owner, terminate
from kvpn_agent.state import StateFile
from kvpn_agent.supervisor_api import READY_FILE, SupervisorClient, SupervisorError, SupervisorUnreachableError


def cleanup(
    netns: str | None,
    state_file: StateFile,
    socket_dir: Path = SOCKET_DIR,
    timeout: float = 5.0,
    supervisor: Path | None = None,
) -> list[str]:
    """Removes the gateway's kvgw-* interfaces with their wireguard-go, the table and the state file; what it did.

    With ``supervisor`` the supervisor is asked to stop the devices (they are its children). One
    that does not answer has taken its devices with it in a pod; outside a pod they may live on,
    so they are then ended here, by the pid that serves each socket, as without a supervisor.
    """
    done = []
    saved = state_file.load()
    client = SupervisorClient(supervisor, socket_dir) if supervisor is not None else None
    kernel = KernelWireGuard(netns)
    with Netlink(netns) as netlink, contextlib.closing(kernel):
        names = set(netlink.interfaces(GATEWAY_PREFIX))
        names |= {interface_name(*s.key) for s in saved.servers} if saved else set()
        # Left by an agent before the kvgw- names; by exact name, so a laptop's kvpn-<server> stays.
        names |= {legacy_interface_name(*s.key) for s in saved.servers} if saved else set()
        if client is not None:
            try:
                names |= {n for n in client.devices() if n.startswith(GATEWAY_PREFIX)}
            except SupervisorError as exc:
                done.append(f"wireguard-go supervisor not asked ({exc}): ending wireguard-go here")
                client = None
        for name in sorted(names):
            sock = socket_dir / f"{name}.sock"
            if client is not None:
                try:
                    if (pid := client.stop(name)) is not None:
                        done.append(f"the supervisor stopped wireguard-go {pid} ({name})")
                except SupervisorUnreachableError as exc:
                    done.append(f"wireguard-go supervisor gone ({exc}): ending wireguard-go here")
                    client = None
                except SupervisorError as exc:
                    done.append(f"the supervisor did not stop {name}: {exc}")
            if client is None and (pid := socket_owner(sock)) is not None and process_start_time(pid) is not None:
                terminate(pid, timeout)
                done.append(f"stopped wireguard-go {pid} ({name})")
            if netlink.index(name) is not None:
                empty(kernel, name)  # a kernel device: fast only once emptied
                netlink.delete(name)
                done.append(f"deleted interface {name}")
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
    firewall = Nft(("ip", "netns", "exec", netns) if netns else ())
    if firewall.list_table() is not None:
        firewall.delete()
        done.append("deleted table inet kvpn")
    return done + _remove_files(state_file, supervisor)


def _remove_files(state_file: StateFile, supervisor: Path | None) -> list[str]:
    done = []
    if state_file.remove():
        done.append(f"removed {state_file.path}")
    if supervisor is not None and (verdict := supervisor.parent / READY_FILE).exists():
        verdict.unlink()  # nothing is served here any more: the gateway pod leaves the Services
        done.append(f"removed {verdict}")
    logs = state_file.directory / LOG_FOLDER
    if logs.is_dir():
        shutil.rmtree(logs, ignore_errors=True)
        done.append(f"removed {logs}")
    return done
