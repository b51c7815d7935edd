"""The local demo: kvpn installed with Helm on a cluster with real nodes, left running for you to poke at.

    python hack/demo.py up      # `make demo`: starts it detached, prints what it built and how to use it
    python hack/demo.py status  # is it up; the same summary
    python hack/demo.py down    # `make demo-down`: removes all of it (idempotent, also after a partial start)

`up` starts a small daemon (this script, `_serve`) that builds the world of tests/e2e
(harness/world.py): the project's image built from its Dockerfile; a control plane and two
kubelet nodes (containerd, kube-proxy) in network namespaces; `helm install` of helm/kvpn; the
`hello` Deployment and a DNS stand-in as pods; VpnServers applied with kubectl; a laptop namespace
running stock wg-quick on VpnPeer dev/alice's config -- then waits for `down`. Everything it creates
is recorded as it goes in $KVPN_DEMO_DIR/manifest.json (default /var/tmp/kvpn-demo), so `down`
removes it even if the daemon died. Needs root (network namespaces, cgroups, TUN, nftables).
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

from harness.cluster import Manifest, start_time, sweep  # noqa: E402
from harness.world import CHART_NAMESPACE, HELLO_URL, PEER_NAMESPACE, World  # noqa: E402

# Not under /run, /var/lib or /var/log: each node mounts folders of its own over those.
STATE_DIR = Path(os.environ.get("KVPN_DEMO_DIR", "/var/tmp/kvpn-demo"))  # noqa: S108 - root's demo, made 0700
STATE = STATE_DIR / "state.json"
MANIFEST = STATE_DIR / "manifest.json"
LOG = STATE_DIR / "demo.log"
UP_TIMEOUT = 900.0  # a first run also builds the image (a few minutes); later ones take about a minute
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
    return isinstance(pid, int) and start_time(pid) == start  # the same process, not a later one with its pid


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
        write_state(ready=True, world=world.describe(), hello=body.strip(), timings=world.timings)
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
    write_state(daemon_pid=daemon.pid, daemon_start=start_time(daemon.pid), ready=False)
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
    laptop = world["laptops"]["alice"]
    nodes = world["nodes"]
    kubectl = world["kubectl"]
    node_lines = "\n".join(
        f"                  {n['name']} {n['address']} (pods {', '.join(n['podCIDRs'])})" for n in nodes.values()
    )
    first = next(iter(nodes.values()))["name"]
    return f"""\
What it built:
  control plane   etcd, kube-apiserver, kube-controller-manager, kube-scheduler v1.20 ({world["api_server"]})
  nodes           kubelet + containerd + kube-proxy (iptables), each in a network namespace:
{node_lines}
  image           {world["image"]}, built from ./Dockerfile with buildah, imported into each node
  kvpn            `helm install kvpn helm/kvpn -n {CHART_NAMESPACE}`, the peers' namespace in
                  operator.secretNamespaces ({PEER_NAMESPACE}): operator Deployment, agent and
                  wireguard-go DaemonSets, as pods
  VpnServer       {CHART_NAMESPACE}/cluster, HostPort, endpoint {world["server"]["endpoint"]}
                  routes {", ".join(world["server"]["routes"])}, DNS {world["dns"]} (discovered)
  pods            hello (a Deployment, a pod per node; Service default/hello), a DNS stand-in for
                  CoreDNS (Service kube-system/kube-dns)
  laptop          VpnPeer {PEER_NAMESPACE}/alice, stock `wg-quick up` ({laptop["interface"]});
                  resolv.conf from its DNS line
                  answered: {state.get("hello", "")}

Poke at it (kubectl here is {kubectl}):
  export KUBECONFIG={world["kubeconfig"]}
    kubectl get pods -A -o wide; kubectl get vpnservers,vpnpeers -A -o wide
    kubectl -n {CHART_NAMESPACE} logs daemonset/kvpn-agent
    kubectl -n {CHART_NAMESPACE} delete pod -l app.kubernetes.io/component=agent      # tunnels stay up
    kubectl -n {PEER_NAMESPACE} patch vpnpeer alice --type merge -p '{{"spec":{{"disabled":true}}}}'   # curl stops
  ip netns exec {laptop["netns"]} bash      # the laptop; then:
    curl {HELLO_URL}       # by name (also: curl http://hello.default)
    wg show
  ip netns exec {first} nft list ruleset    # a node: inet kvpn (the agent) beside kube-proxy's tables
  logs: {world["run_dir"]}/nodes/*/{{kubelet,containerd,kube-proxy}}.log, {LOG}

`make demo-down` (python hack/demo.py down) removes all of it."""


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
