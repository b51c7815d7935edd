"""`up --follow`: when the tunnel moves, where to, and what it leaves in the file."""

from __future__ import annotations

import http.server
import json
import re
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes.client import ApiClient, Configuration

from kvpn_cli import follow
from kvpn_cli import main as cli
from kvpn_cli.cluster import CliError, Cluster
from kvpn_cli.follow import (
    STALE_AFTER_SECONDS,
    Follower,
    Mark,
    Move,
    ServerName,
    ServerWatch,
    Tunnel,
    decide,
    next_endpoint,
    peer_named_in,
    peer_value,
    rewrite_endpoint,
    server_of,
    spelled_as,
    tunnel_of,
    with_endpoint,
)
from kvpn_cli.main import main
from kvpn_cli.wgquick import DnsMode, assemble
from kvpn_core import keys
from kvpn_core.api import Kind, VpnServerStatus
from kvpn_core.kube import KubeError
from kvpn_core.wgquick import ClientConfig, render_client_config

SERVER = ServerName("kvpn", "dev")
A, B, C = "192.0.2.1:31820", "192.0.2.2:31820", "192.0.2.3:31820"
SERVER_KEY = keys.public_key_of(keys.generate_private_key())


def status(endpoint: str | None, *endpoints: str) -> VpnServerStatus:
    return VpnServerStatus(endpoint=endpoint, endpoints=list(endpoints))


def fresh(endpoint: str | None) -> Tunnel:
    return Tunnel(endpoint=endpoint, silent_for=5, sent_since=True)


def silent(endpoint: str | None, seconds: float = STALE_AFTER_SECONDS + 5) -> Tunnel:
    return Tunnel(endpoint=endpoint, silent_for=seconds, sent_since=True)


def config_file(endpoint: str = A) -> str:
    """The file `join` writes: the operator's wg0.conf with the local key, split DNS."""
    private = keys.generate_private_key()
    secret = render_client_config(
        ClientConfig(
            private_key=None,
            public_key=keys.public_key_of(private),
            addresses=["10.8.0.2/32"],
            dns_servers=["10.96.0.10"],
            dns_search=["svc.cluster.local"],
            mtu=1420,
            server_public_key=SERVER_KEY,
            preshared_key=keys.generate_preshared_key(),
            endpoint=endpoint,
            allowed_ips=["10.96.0.0/12"],
            persistent_keepalive=25,
            name="team-a/alice-laptop",
        )
    )
    return assemble(secret, private, DnsMode.SPLIT)


# --- decide ------------------------------------------------------------------------------------


def test_a_healthy_answering_gateway_is_kept() -> None:
    assert decide(status(A, A, B), fresh(A), SERVER) is None


def test_a_gateway_that_is_no_longer_healthy_is_left_for_status_endpoint() -> None:
    move = decide(status(B, B, C), fresh(A), SERVER)
    assert move == Move(A, B, f"{A} is no longer a healthy gateway of kvpn/dev")
    assert move.line() == f"moved from {A} to {B}: {A} is no longer a healthy gateway of kvpn/dev"


def test_the_move_is_at_once_even_while_handshakes_are_fresh() -> None:
    """The operator knows before WireGuard's timers do: no waiting for 135 s of silence."""
    tunnel = Tunnel(endpoint=A, silent_for=0, sent_since=False)
    assert decide(status(B, B), tunnel, SERVER) == Move(A, B, f"{A} is no longer a healthy gateway of kvpn/dev")


def test_a_status_endpoint_that_is_not_healthy_is_not_a_target() -> None:
    move = decide(status(A, B, C), fresh(A), SERVER)
    assert move is not None
    assert move.new == B


def test_no_endpoints_listed_means_no_verdict_on_health() -> None:
    """An operator that writes no status.endpoints (or a server with no healthy gateway) moves nobody."""
    assert decide(status(B), fresh(A), SERVER) is None
    assert decide(status(None), silent(A), SERVER) is None


def test_a_tunnel_without_endpoint_gets_one() -> None:
    move = decide(status(B, A, B), fresh(None), SERVER)
    assert move is not None
    assert (move.old, move.new) == (None, B)
    assert move.line().startswith(f"moved from (no endpoint) to {B}: ")


def test_a_silent_status_endpoint_gives_way_to_the_next_healthy_one() -> None:
    move = decide(status(A, A, B, C), silent(A, 140), SERVER)
    assert move == Move(A, B, f"{A} has not answered for 140 s (no handshake while sending)")


def test_the_next_one_is_in_status_endpoints_order_wrapping_around() -> None:
    assert next_endpoint(status(B, A, B, C), B) == C
    assert next_endpoint(status(C, A, B, C), C) == A


def test_a_silent_other_endpoint_moves_on_round_the_list_starting_at_status_endpoint() -> None:
    """A silent, then B silent: C next (back to A would swing between two silent gateways)."""
    assert next_endpoint(status(A, A, B, C), B) == C
    assert next_endpoint(status(A, A, B, C), C) == A
    assert next_endpoint(status(B, A, B, C), A) == B


def test_a_silent_endpoint_unknown_to_the_server_goes_to_status_endpoint() -> None:
    """Before the operator listed endpoints there was only status.endpoint."""
    assert decide(status(B), silent(A), SERVER) == Move(
        A, B, f"{A} has not answered for {STALE_AFTER_SECONDS + 5:.0f} s (no handshake while sending)"
    )


def test_silence_within_the_rekey_window_is_not_a_failure() -> None:
    assert decide(status(A, A, B), silent(A, STALE_AFTER_SECONDS), SERVER) is None


def test_an_idle_tunnel_is_not_a_silent_one() -> None:
    """No traffic, no keepalives: WireGuard sends no handshake, so an old one says nothing about the gateway."""
    idle = Tunnel(endpoint=A, silent_for=3600, sent_since=False)
    assert decide(status(A, A, B), idle, SERVER) is None


def test_a_silent_only_gateway_stays() -> None:
    assert decide(status(A, A), silent(A), SERVER) is None
    assert decide(status(A), silent(A), SERVER) is None


# --- the mark: handshake or the endpoint set, and bytes sent since ---------------------------


def test_a_newer_handshake_moves_the_mark_and_its_byte_count() -> None:
    mark = Mark(at=1000.0, tx=500)
    assert mark.after(1100.0, 800) == Mark(1100.0, 800)
    assert mark.after(900.0, 800) is mark
    assert mark.after(0.0, 800) is mark  # never: wg prints 0


def test_the_tunnel_against_the_mark() -> None:
    mark = Mark(at=1000.0, tx=500)
    assert tunnel_of(A, mark, 500, 1200.0) == Tunnel(A, 200.0, sent_since=False)
    assert tunnel_of(A, mark, 532, 1200.0) == Tunnel(A, 200.0, sent_since=True)


# --- reading wg and the file -------------------------------------------------------------------


def test_wg_show_output_by_peer() -> None:
    other = keys.public_key_of(keys.generate_private_key())
    output = f"{other}\t(none)\n{SERVER_KEY}\t{A}\n"
    assert peer_value(output, SERVER_KEY) == [A]
    assert peer_value(output, other) == ["(none)"]
    assert peer_value(f"{SERVER_KEY}\t1024\t2048\n", SERVER_KEY) == ["1024", "2048"]
    assert peer_value("", SERVER_KEY) is None


def test_wg_shows_the_address_of_a_named_endpoint() -> None:
    def resolve(endpoint: str) -> set[str]:
        return {"203.0.113.7:51820", "[2001:db8::7]:51820"} if endpoint == "vpn.example.com:51820" else set()

    candidates = ["vpn.example.com:51820", A]
    assert spelled_as("203.0.113.7:51820", candidates, resolve) == "vpn.example.com:51820"
    assert spelled_as("[2001:db8::7]:51820", candidates, resolve) == "vpn.example.com:51820"
    assert spelled_as(A, candidates, resolve) == A
    assert spelled_as(B, candidates, resolve) == B
    assert spelled_as(None, candidates, resolve) is None


def test_the_file_names_its_peer() -> None:
    assert peer_named_in(config_file()) == ("team-a", "alice-laptop")
    assert peer_named_in("[Interface]\nPrivateKey = x\n") is None


def test_only_the_endpoint_line_changes() -> None:
    before = config_file(A)
    after = with_endpoint(before, B)
    changed = [(old, new) for old, new in zip(before.splitlines(), after.splitlines(), strict=True) if old != new]
    assert changed == [(f"Endpoint = {A}", f"Endpoint = {B}")]


def test_a_file_without_endpoint_gets_one_in_its_peer_section() -> None:
    config = "[Interface]\nPrivateKey = x\n\n[Peer]\nPublicKey = y\n"
    assert with_endpoint(config, B) == f"[Interface]\nPrivateKey = x\n\n[Peer]\nEndpoint = {B}\nPublicKey = y\n"


def test_the_file_is_rewritten_whole_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "kvpn-dev.conf"
    original = config_file(A)
    path.write_text(original)
    path.chmod(0o600)
    owner = (path.stat().st_uid, path.stat().st_gid)
    rewrite_endpoint(path, B)
    assert path.read_text() == with_endpoint(original, B)
    assert f"Endpoint = {B}\n" in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (path.stat().st_uid, path.stat().st_gid) == owner
    assert [p.name for p in tmp_path.iterdir()] == ["kvpn-dev.conf"]  # replaced atomically: no scratch left


# --- which server ------------------------------------------------------------------------------


class FakeCluster:
    def __init__(self, objects: dict[tuple[Kind, str, str], dict[str, Any]]) -> None:
        self.objects = objects

    def get_kvpn(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, namespace, name))


def peer_obj(ref: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"namespace": "team-a", "name": "alice-laptop"}, "spec": {"serverRef": ref}}


def test_the_server_is_the_one_of_the_peer_the_file_names(tmp_path: Path) -> None:
    cluster = FakeCluster({(Kind.VPN_PEER, "team-a", "alice-laptop"): peer_obj({"name": "dev", "namespace": "kvpn"})})
    path = tmp_path / "kvpn-dev.conf"
    assert server_of(cast(Cluster, cluster), path, config_file(), None, "default") == SERVER


def test_a_server_ref_without_namespace_is_in_the_peer_s(tmp_path: Path) -> None:
    cluster = FakeCluster({(Kind.VPN_PEER, "team-a", "alice-laptop"): peer_obj({"name": "dev"})})
    server = server_of(cast(Cluster, cluster), tmp_path / "x.conf", config_file(), None, "default")
    assert server == ServerName("team-a", "dev")


def test_a_file_that_names_no_peer_asks_for_server(tmp_path: Path) -> None:
    with pytest.raises(CliError, match=r"does not say which VpnServer .*: pass --server NAMESPACE/NAME"):
        server_of(cast(Cluster, FakeCluster({})), tmp_path / "x.conf", "[Interface]\n", None, "default")


def test_a_peer_that_is_gone_asks_for_server(tmp_path: Path) -> None:
    with pytest.raises(CliError, match=r"VpnPeer team-a/alice-laptop, named in .*, no longer exists"):
        server_of(cast(Cluster, FakeCluster({})), tmp_path / "x.conf", config_file(), None, "default")


def test_server_given_wins(tmp_path: Path) -> None:
    cluster = cast(Cluster, FakeCluster({}))
    assert server_of(cluster, tmp_path / "x.conf", "", "kvpn/dev", "default") == SERVER
    assert server_of(cluster, tmp_path / "x.conf", "", "dev", "team-a") == ServerName("team-a", "dev")


# --- the loop, with wg and the watch faked -----------------------------------------------------


class FakeWg:
    """`wg show` of one interface with the server's peer, and the `wg set` calls made."""

    def __init__(self, endpoint: str, handshake: float, tx: int) -> None:
        self.endpoint, self.handshake, self.tx = endpoint, handshake, tx
        self.sets: list[tuple[str, ...]] = []

    def __call__(self, *args: str, input: str | None = None) -> str:
        if args[0] == "set":
            self.sets.append(args)
            if args[-2] == "endpoint":
                self.endpoint = args[-1]
            return ""
        if args[0] == "addconf":  # the peer added back from the file: its Endpoint line
            self.sets.append(args)
            found = re.search(r"^Endpoint = (.*)$", input or "", re.MULTILINE)
            assert found is not None
            self.endpoint = found.group(1)
            return ""
        fields = {
            "endpoints": [self.endpoint],
            "latest-handshakes": [str(int(self.handshake))],
            "transfer": ["100", str(self.tx)],
        }[args[2]]
        return "\t".join([SERVER_KEY, *fields]) + "\n"


class FakeWatch:
    def __init__(self, server_status: VpnServerStatus | None) -> None:
        self.status = server_status


def test_a_lost_gateway_moves_the_tunnel_and_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "kvpn-dev.conf"
    path.write_text(config_file(A))
    path.chmod(0o600)
    fake = FakeWg(A, handshake=follow.time.time() - 10, tx=1000)
    monkeypatch.setattr(follow, "wg", fake)
    monkeypatch.setattr(follow, "strip", lambda path: path.read_text())
    watch = FakeWatch(status(A, A, B))
    follower = Follower(path, SERVER, cast(ServerWatch, watch), fresh=True)

    follower.step()
    assert fake.sets == []

    watch.status = status(B, B)
    follower.step()
    follower.step()  # moved already: once
    assert fake.sets == [
        ("set", "kvpn-dev", "peer", SERVER_KEY, "remove"),
        ("addconf", "kvpn-dev", "/dev/stdin"),
    ]  # a new session: none moves between gateways
    assert fake.endpoint == B
    assert f"Endpoint = {B}\n" in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .endswith(f"moved from {A} to {B}: {A} is no longer a healthy gateway of kvpn/dev")
    )


def test_a_silent_gateway_is_left_after_the_rekey_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "kvpn-dev.conf"
    path.write_text(config_file(A))
    now = [10_000.0]
    monkeypatch.setattr(follow.time, "time", lambda: now[0])
    fake = FakeWg(A, handshake=now[0] - 100, tx=1000)
    monkeypatch.setattr(follow, "wg", fake)
    monkeypatch.setattr(follow, "strip", lambda path: path.read_text())
    follower = Follower(path, SERVER, cast(ServerWatch, FakeWatch(status(A, A, B))), fresh=False)

    fake.tx += 148  # handshake attempts
    now[0] += 30  # 130 s since the handshake
    follower.step()
    assert fake.sets == []
    now[0] += 10
    follower.step()
    assert fake.sets == [("set", "kvpn-dev", "peer", SERVER_KEY, "remove"), ("addconf", "kvpn-dev", "/dev/stdin")]
    # B gets its own 135 s, although the latest handshake (A's) is older still.
    fake.tx += 148
    now[0] += 60
    follower.step()
    assert len(fake.sets) == 2


def test_a_peer_missing_from_the_interface_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "kvpn-dev.conf"
    path.write_text(config_file(A))
    monkeypatch.setattr(follow, "wg", lambda *args: "")
    with pytest.raises(CliError, match=r"interface kvpn-dev has no peer"):
        Follower(path, SERVER, cast(ServerWatch, FakeWatch(None)), fresh=True)


class Stop(BaseException):
    """Ends the watch thread's endless loop in a test."""


class WatchCluster:
    """An API server that fails once, then serves the VpnServer and one change to it."""

    def __init__(self) -> None:
        self.gets = 0

    def get_kvpn(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        self.gets += 1
        if self.gets == 1:
            raise CliError("no cluster reachable at https://k8s: API server unreachable")
        if self.gets == 3:
            raise Stop
        return {"metadata": {"resourceVersion": "5"}, "status": {"endpoint": A, "endpoints": [A]}}

    def watch_kvpn(self, kind: Kind, namespace: str, name: str, version: str, seconds: int) -> Iterator[dict[str, Any]]:
        assert version == "5"
        yield {"type": "MODIFIED", "object": {"status": {"endpoint": B, "endpoints": [B]}}}
        raise KubeError(500, "etcdserver: leader changed")


def test_the_watch_reports_api_errors_in_a_line_and_carries_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(follow.time, "sleep", lambda seconds: None)
    watch = ServerWatch(cast(Cluster, WatchCluster()), SERVER)
    with pytest.raises(Stop):
        watch._run()
    assert watch.status == status(B, B)
    err = capsys.readouterr().err
    assert "VpnServer kvpn/dev: no cluster reachable at https://k8s: API server unreachable; retrying" in err
    assert "watching VpnServer kvpn/dev again" in err
    assert "VpnServer kvpn/dev: watch failed (500): etcdserver: leader changed; retrying" in err
    assert "Traceback" not in err


def test_ctrl_c_leaves_the_tunnel_up_and_says_how_to_take_it_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "kvpn-dev.conf"
    path.write_text(config_file(A))
    monkeypatch.setattr(follow.os, "geteuid", lambda: 0)
    monkeypatch.setattr(follow, "wg", FakeWg(A, handshake=0, tx=0))
    monkeypatch.setattr(ServerWatch, "start", lambda self: None)

    def interrupted(self: Follower) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Follower, "run", interrupted)
    follow.follow(cast(Cluster, FakeCluster({})), path, SERVER, fresh=True)
    out = capsys.readouterr().out
    assert f"stopped following; kvpn-dev stays up (take it down with: kubectl vpn down {path})" in out


def test_server_without_follow_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "dev", "--server", "kvpn/dev"]) == 1
    assert capsys.readouterr().err == "error: --server goes with --follow or --via api\n"


def test_the_watch_streams_events_and_turns_an_error_event_into_a_kube_error() -> None:
    """Against a local HTTP server that answers as the API server does: one event a line, then a 410."""
    lines = [
        {"type": "MODIFIED", "object": {"metadata": {"name": "dev", "resourceVersion": "6"}}},
        {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version: 5 (6)"}},
    ]
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            for line in lines:
                self.wfile.write(json.dumps(line).encode() + b"\n")
                self.wfile.flush()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        configuration = Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
        cluster = Cluster(ApiClient(configuration))
        events = cluster.watch_kvpn(Kind.VPN_SERVER, "kvpn", "dev", "5", 60)
        assert next(events)["object"]["metadata"]["resourceVersion"] == "6"
        with pytest.raises(KubeError) as error:
            next(events)
        assert error.value.status == 410
    finally:
        server.shutdown()
    assert seen == [
        "/apis/kvpn.dev/v1alpha1/namespaces/kvpn/vpnservers"
        "?watch=1&fieldSelector=metadata.name%3Ddev&resourceVersion=5&timeoutSeconds=60"
    ]


def test_join_takes_its_server_without_the_follow_options_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """`join SERVER` names a server positionally; only `up --server` is the option that needs --follow."""

    class ConnectedError(Exception):
        pass

    def connect(context: str | None) -> None:
        raise ConnectedError

    monkeypatch.setattr(cli, "connect", connect)
    with pytest.raises(ConnectedError):
        cli.run(cli.parser().parse_args(["join", "kvpn/dev"]))
    with pytest.raises(CliError, match="--server goes with --follow"):
        cli.run(cli.parser().parse_args(["up", "kvpn-dev", "--server", "kvpn/dev"]))
