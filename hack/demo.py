"""The local demo: the end-to-end world of tests/e2e, left running for you to poke at.

    python hack/demo.py up      # `make demo`: starts it detached, prints what it built and how to use it
    python hack/demo.py status  # is it up; the same summary
    python hack/demo.py down    # `make demo-down`: removes all of it (idempotent, also after a partial start)

`up` starts a small daemon (this script, `_serve`) that builds the world -- a real control plane, the
chart's CRDs and RBAC, the operator and two gateway agents running as the chart's ServiceAccounts, a
pod network with "hello" and cluster DNS, a laptop namespace running stock wg-quick on VpnPeer
dev/alice's config -- then waits for `down`. Everything the world creates is recorded as it goes in
$KVPN_DEMO_DIR/manifest.json (default /run/kvpn-demo), so `down` removes it even if the daemon died.
Needs root (network namespaces, TUN, nftables).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.world import (  # noqa: E402
    DNS_CLUSTER_IP,
    HELLO_CLUSTER_IP,
    HELLO_POD_IP,
    HELLO_PORT,
    HELLO_URL,
    KUBE_PROXY_STANDIN,
    Manifest,
    World,
    _start_time,
    sweep,
)

STATE_DIR = Path(os.environ.get("KVPN_DEMO_DIR", "/run/kvpn-demo"))
STATE = STATE_DIR / "state.json"
MANIFEST = STATE_DIR / "manifest.json"
LOG = STATE_DIR / "demo.log"
UP_TIMEOUT = 180.0
DOWN_TIMEOUT = 60.0


def read_state() -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(STATE.read_text())
    except (OSError, ValueError):
        return {}
    return data


def write_state(**changes: Any) -> None:
    data = {**read_state(), **changes}
    tmp = STATE.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(STATE)


def daemon_alive(state: dict[str, Any]) -> bool:
    pid, start = state.get("daemon_pid"), state.get("daemon_start")
    return isinstance(pid, int) and _start_time(pid) == start  # the same process, not a later one with its pid


# --- the daemon ------------------------------------------------------------------------------------


def serve() -> None:
    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(f"stopping on {signal.Signals(signum).name}")

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    world = World(run_dir=STATE_DIR / "run", manifest=MANIFEST)
    try:
        world.start()
        laptop = world.add_laptop("alice")
        body = world.wait_reachable(laptop, HELLO_URL, timeout=20)
        print(f"kvpn demo: up in {world.timings['total']:.1f} s; from the laptop: {body.strip()}", flush=True)
        write_state(
            ready=True,
            world=world.describe(),
            hello=body.strip(),
            agent_pids={node: agent.pid for node, agent in world.agents.items()},
        )
        while True:
            signal.pause()
    except BaseException as error:
        if not isinstance(error, SystemExit):
            write_state(error=f"{type(error).__name__}: {error}")
        raise
    finally:
        print("kvpn demo: removing the world", flush=True)
        world.stop()


# --- the commands ----------------------------------------------------------------------------------


def up() -> int:
    if os.geteuid() != 0:
        print("kvpn demo: needs root (network namespaces, TUN, nftables): sudo make demo", file=sys.stderr)
        return 1
    state = read_state()
    if daemon_alive(state) and state.get("ready"):
        print("kvpn demo: already up\n")
        print(summary(state))
        return 0
    if state or MANIFEST.exists():
        print("kvpn demo: removing what a previous demo left behind")
        down(quiet=True)
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    began = time.monotonic()
    with LOG.open("ab") as log:
        daemon = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_serve"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # detached: it outlives this command
        )
    write_state(daemon_pid=daemon.pid, daemon_start=_start_time(daemon.pid), ready=False)
    print(f"kvpn demo: building the world (daemon pid {daemon.pid}, log {LOG}) ...", flush=True)
    try:
        while True:
            state = read_state()
            if state.get("ready"):
                break
            if state.get("error") or daemon.poll() is not None or time.monotonic() - began > UP_TIMEOUT:
                tail = "\n".join(LOG.read_text(errors="replace").splitlines()[-40:])
                print(f"kvpn demo: start failed: {state.get('error') or 'no world'}\n{tail}", file=sys.stderr)
                down(quiet=True)
                return 1
            time.sleep(0.2)
    except KeyboardInterrupt:
        down(quiet=True)
        return 130
    print(f"kvpn demo: up in {time.monotonic() - began:.1f} s\n")
    print(summary(state))
    return 0


def down(quiet: bool = False) -> int:
    done: list[str] = []
    state = read_state()
    if daemon_alive(state):
        pid = int(state["daemon_pid"])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # the daemon stops the world itself
        deadline = time.monotonic() + DOWN_TIMEOUT
        while daemon_alive(state) and time.monotonic() < deadline:
            time.sleep(0.2)
        if daemon_alive(state):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            done.append(f"killed the daemon {pid}")
        else:
            done.append(f"stopped the daemon {pid}")
    if MANIFEST.exists():
        try:
            done += sweep(Manifest.load(MANIFEST))  # whatever the daemon did not get to
        except (OSError, ValueError, TypeError) as error:
            print(f"kvpn demo: unreadable {MANIFEST}: {error}", file=sys.stderr)
    if STATE_DIR.exists():
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        done.append(f"removed {STATE_DIR}")
    if not quiet:
        print("kvpn demo: " + ("; ".join(done) if done else "nothing to remove"))
    return 0


def status() -> int:
    state = read_state()
    if daemon_alive(state) and state.get("ready"):
        print(summary(state))
        return 0
    print("kvpn demo: not running" + (f" (leftovers in {STATE_DIR}: `make demo-down`)" if STATE_DIR.exists() else ""))
    return 1


def summary(state: dict[str, Any]) -> str:
    world = state["world"]
    ns = world["netns"]
    laptop = world["laptops"]["alice"]
    agent_a = world["agents"]["node-a"]
    kubectl = "kubectl" if shutil.which("kubectl") else str(_tool_dir() / "kubectl")
    return f"""\
What it built (all in network namespaces {", ".join(ns.values())}):
  control plane   etcd + kube-apiserver + kube-controller-manager v1.20 on loopback
  chart           helm/kvpn rendered: CRDs, ServiceAccounts, RBAC applied; operator and agents use their tokens
  gateway nodes   {world["nodes"]["node-a"]}, {world["nodes"]["node-b"]}: a kvpn-agent each
                  (wireguard-go {world["interface"]})
  VpnServer       kvpn-system/cluster, HostPort, endpoint {world["server"]["endpoint"]}
                  routes {", ".join(world["server"]["routes"])}, DNS {world["dns"]}
  pods            hello {HELLO_POD_IP}:{HELLO_PORT} (Service default/hello {HELLO_CLUSTER_IP}:80),
                  dnsmasq (Service kube-system/kube-dns {DNS_CLUSTER_IP});
                  DNAT by `ip {KUBE_PROXY_STANDIN}` in each node (the harness's stand-in for kube-proxy, not kvpn)
  laptop          VpnPeer dev/alice, stock `wg-quick up` ({laptop["interface"]}); resolv.conf from its DNS line
                  answered: {state.get("hello", "")}

Poke at it:
  ip netns exec {laptop["netns"]} bash                      # the laptop; then:
    curl http://hello.default.svc.cluster.local            # by name (also: curl http://hello.default)
    curl http://{HELLO_CLUSTER_IP}   curl http://{HELLO_POD_IP}:{HELLO_PORT}     # by ClusterIP, by pod IP
    wg show
  export KUBECONFIG={world["kubeconfig"]}
    {kubectl} get nodes,svc -A; {kubectl} get vpnservers,vpnpeers -A -o wide
    {kubectl} patch vpnpeer -n dev alice --type merge -p '{{"spec":{{"disabled":true}}}}'   # and watch curl stop
  ip netns exec {ns["node-a"]} nft list ruleset            # inet kvpn (the agent) + ip {KUBE_PROXY_STANDIN}
  nsenter -t {agent_a["pid"]} -m ip netns exec {ns["node-a"]} wg show   # a gateway's WireGuard (private socket folder)
  logs: {world["run_dir"]}/{{operator,agent-node-a,agent-node-b,hello,dnsmasq,wg-quick}}.log, {LOG}

`make demo-down` (python hack/demo.py down) removes all of it."""


def _tool_dir() -> Path:
    from tests.support.chart import tool_dir  # noqa: PLC0415

    return tool_dir()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="up", choices=["up", "down", "status", "_serve"])
    command = parser.parse_args().command
    if command == "_serve":
        serve()
        return 0
    return {"up": up, "down": down, "status": status}[command]()


if __name__ == "__main__":
    sys.exit(main())
