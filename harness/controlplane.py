"""Starts and stops a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, and
for a cluster with nodes kube-scheduler)."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Self

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_CIDR6 = "fd00:10:96::/112"  # a dual-stack cluster's second Service network
ADMIN_USER = "kvpn-admin"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")
NODE_BINARIES = ("kube-scheduler", "kubelet", "kube-proxy")
STOP_GRACE_SECONDS = 5.0


class ControlPlaneError(RuntimeError):
    """The control plane could not start; the message carries the relevant log tail."""


def cache_bin_dir() -> Path:
    """Where `hack/control-plane.sh` caches the binaries (same rule as the script)."""
    if cache := os.environ.get("KVPN_CACHE"):
        base = Path(cache)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvpn"
    return base / "control-plane" / "bin"


def find_binaries(names: Sequence[str] = BINARIES) -> dict[str, Path]:
    """Each binary from $KUBEBUILDER_ASSETS when it holds it, else from the cache folder."""
    folders = [Path(assets)] if (assets := os.environ.get("KUBEBUILDER_ASSETS")) else []
    folders.append(cache_bin_dir())
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in names:
        path = next((f / name for f in folders if os.access(f / name, os.X_OK)), None)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        raise ControlPlaneError(
            f"control-plane binaries missing: {', '.join(missing)} (looked in "
            f"{', '.join(str(f) for f in folders)}); run `make setup` to build them"
        )
    return found


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGKILL when this process dies, so nothing outlives
    a SIGKILLed test run. Linux's PR_SET_PDEATHSIG fires when the *thread* that forked exits, so
    it is only safe from the main thread; elsewhere stop() and atexit have to do."""
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return preexec


class _Process:
    """One started binary: its process (leader of its own process group) and its log."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),  # noqa: PLW1509 -- async-signal-safe: one prctl call
            )
        except BaseException:
            self._log.close()
            raise

    def exited(self) -> bool:
        return self.popen.poll() is not None

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after a grace period, then reap."""
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Members of the group may outlive the leader; they get the SIGKILL too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._log.close()


class ControlPlane:
    """A real control plane on loopback: `with ControlPlane() as cp: ... cp.api_client() ...`.

    Everything lives in one run folder (logs, certificates, tokens, kubeconfig, etcd data). A
    folder made here is removed by stop(); a `run_dir` passed in is kept for its logs, only the
    etcd data and the keys inside it are removed.

    For a cluster with nodes (harness/cluster.py): `address` is where the API server listens
    and what it advertises (an address the nodes reach), `tokens` are more (token, user, groups)
    identities (kubelets, kube-proxy), `apiserver_args`/`kcm_args` add flags, and `scheduler`
    also starts kube-scheduler.
    """

    def __init__(
        self,
        run_dir: Path | None = None,
        *,
        binaries: Mapping[str, Path] | None = None,
        ready_timeout: float = 60.0,
        address: str = "127.0.0.1",
        tokens: Sequence[tuple[str, str, Sequence[str]]] = (),
        apiserver_args: Sequence[str] = (),
        kcm_args: Sequence[str] = (),
        scheduler: bool = False,
        service_cidrs: Sequence[str] = (SERVICE_CIDR,),
    ) -> None:
        """`service_cidrs`: the Service network, one per family (a second makes the API server dual-stack)."""
        self._given_run_dir = run_dir
        self.service_cidrs = list(service_cidrs)
        self._binaries = dict(binaries) if binaries is not None else None
        self._ready_timeout = ready_timeout
        self.address = address
        self._tokens = list(tokens)
        self._apiserver_args = list(apiserver_args)
        self._kcm_args = list(kcm_args)
        self._scheduler = scheduler
        self._processes: list[_Process] = []
        self._run_dir: Path | None = None
        self._etcd_dir: Path | None = None
        self._server: str | None = None
        self.token = secrets.token_urlsafe(32)
        self.etcd_url = ""
        self.startup_seconds = 0.0

    # -- public surface ------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        if self._run_dir is None:
            raise ControlPlaneError("control plane not started")
        return self._run_dir

    @property
    def kubeconfig(self) -> Path:
        return self.run_dir / "kubeconfig"

    @property
    def ca_file(self) -> Path:
        """The apiserver's self-signed serving certificate followed by the CA that signed it."""
        return self.run_dir / "apiserver-certs" / "apiserver.crt"

    @property
    def server(self) -> str:
        if self._server is None:
            raise ControlPlaneError("control plane not started")
        return self._server

    def log_path(self, name: str) -> Path:
        """The log of one component: etcd, kube-apiserver or kube-controller-manager."""
        return self.run_dir / f"{name}.log"

    def env(self) -> dict[str, str]:
        """os.environ with KUBECONFIG pointing at the admin kubeconfig (for kubectl, the operator)."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def api_client(self) -> ApiClient:
        """A new kubernetes.client.ApiClient authenticated as the admin; the caller closes it."""
        from kubernetes import client  # noqa: PLC0415 -- keeps `import controlplane` light for scripts

        config = client.Configuration()
        config.host = self.server
        config.ssl_ca_cert = str(self.ca_file)
        config.api_key = {"authorization": self.token}
        config.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(config)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start etcd, kube-apiserver and kube-controller-manager; return once all three serve."""
        if self._processes:
            raise ControlPlaneError("control plane already started")
        began = time.monotonic()
        atexit.register(self.stop)
        try:
            names = (*BINARIES, "kube-scheduler") if self._scheduler else BINARIES
            binaries = self._binaries or find_binaries(names)
            self._make_dirs()
            # Ports are picked free, then bound by another process: another run may take one in
            # between, so a bind failure retries with fresh ports.
            for attempt in range(3):
                try:
                    self._start_once(binaries)
                    break
                except ControlPlaneError as error:
                    if "address already in use" not in str(error) or attempt == 2:
                        raise
                    self._stop_processes()
                    self._reset_etcd_dir()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Kill everything started here and remove what was created; safe to call twice."""
        atexit.unregister(self.stop)
        self._stop_processes()
        if self._run_dir is None:
            return
        if self._given_run_dir is None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
        else:
            for secret in ("sa.key", "tokens.csv", "kubeconfig", "apiserver-certs", "kcm-certs", "scheduler-certs"):
                path = self._run_dir / secret
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        if self._etcd_dir is not None:
            shutil.rmtree(self._etcd_dir, ignore_errors=True)
        self._run_dir = self._etcd_dir = self._server = None

    # -- internals -----------------------------------------------------------------------------

    def _make_dirs(self) -> None:
        if self._given_run_dir is None:
            self._run_dir = Path(tempfile.mkdtemp(prefix="kvpn-control-plane-"))
        else:
            self._run_dir = self._given_run_dir
            self._run_dir.mkdir(parents=True, exist_ok=True)
        self._reset_etcd_dir()
        self._write_credentials()

    def _reset_etcd_dir(self) -> None:
        if self._etcd_dir is not None:
            shutil.rmtree(self._etcd_dir, ignore_errors=True)
        # etcd fsyncs every write; on tmpfs that costs nothing, which makes tests faster.
        shm = Path("/dev/shm")
        parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
        self._etcd_dir = Path(tempfile.mkdtemp(prefix="kvpn-etcd-", dir=parent))

    def _write_credentials(self) -> None:
        run = self.run_dir
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (run / "sa.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        (run / "sa.pub").write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        # token,user,uid,"group,..." -- system:masters bypasses RBAC entirely.
        lines = [f'{self.token},{ADMIN_USER},{ADMIN_USER},"system:masters"']
        lines += [f'{token},{user},{user},"{",".join(groups)}"' for token, user, groups in self._tokens]
        (run / "tokens.csv").write_text("\n".join(lines) + "\n")
        for name in ("sa.key", "tokens.csv"):
            (run / name).chmod(0o600)

    def _write_kubeconfig(self) -> None:
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kvpn-test",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": ADMIN_USER, "user": {"token": self.token}}],
            "contexts": [{"name": "kvpn-test", "context": {"cluster": "kvpn-test", "user": ADMIN_USER}}],
            "current-context": "kvpn-test",
        }
        self.kubeconfig.write_text(yaml.safe_dump(kubeconfig, sort_keys=False))
        self.kubeconfig.chmod(0o600)

    def _spawn(self, name: str, argv: list[str]) -> _Process:
        process = _Process(name, argv, self.log_path(name))
        self._processes.append(process)
        return process

    def _wait(self, process: _Process, what: str, ready: Callable[[], bool]) -> None:
        """Poll `ready` until it holds; raise with the log tail of whichever process died first."""
        deadline = time.monotonic() + self._ready_timeout
        while True:
            if dead := next((p for p in self._processes if p.exited()), None):
                raise ControlPlaneError(
                    f"{dead.name} exited with {dead.popen.returncode} before {process.name} was "
                    f"{what}; last lines of {dead.log_path}:\n{log_tail(dead.log_path)}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"{process.name} not {what} after {self._ready_timeout:.0f}s; "
                    f"last lines of {process.log_path}:\n{log_tail(process.log_path)}"
                )
            time.sleep(0.05)

    def _start_once(self, binaries: Mapping[str, Path]) -> None:
        run = self.run_dir
        assert self._etcd_dir is not None
        client_port, peer_port, api_port, kcm_port, scheduler_port = (free_port() for _ in range(5))

        self.etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd = self._spawn(
            "etcd",
            [
                str(binaries["etcd"]),
                "--name=kvpn-test",
                f"--data-dir={self._etcd_dir}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=kvpn-test={peer_url}",
                "--log-level=warn",
            ],
        )
        # The apiserver starts right away: it retries etcd, and waiting for etcd first costs ~0.5 s.
        self._server = f"https://{self.address}:{api_port}"
        apiserver = self._spawn(
            "kube-apiserver",
            [
                str(binaries["kube-apiserver"]),
                f"--etcd-servers={self.etcd_url}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--secure-port={api_port}",
                f"--cert-dir={run / 'apiserver-certs'}",
                f"--token-auth-file={run / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={run / 'sa.pub'}",
                f"--service-account-signing-key-file={run / 'sa.key'}",
                f"--service-cluster-ip-range={','.join(self.service_cidrs)}",
                *(["--feature-gates=IPv6DualStack=true"] if len(self.service_cidrs) > 1 else []),
                "--allow-privileged=true",
                *self._apiserver_args,
            ],
        )
        ready_ctx = ssl.create_default_context(cafile=None)
        ready_ctx.check_hostname = False
        ready_ctx.verify_mode = ssl.CERT_NONE  # the certificate only exists once it serves

        self._wait(etcd, "healthy (/health)", lambda: _http_ok(f"{self.etcd_url}/health"))
        self._wait(
            apiserver,
            "ready (/readyz)",
            lambda: _http_ok(f"{self.server}/readyz", token=self.token, context=ready_ctx),
        )
        # From here on the serving certificate is on disk and is verified like any client would.
        self._wait(
            apiserver,
            "serving a verifiable certificate",
            lambda: _http_ok(
                f"{self.server}/readyz",
                token=self.token,
                context=ssl.create_default_context(cafile=str(self.ca_file)),
            ),
        )
        self._write_kubeconfig()

        kcm = self._spawn(
            "kube-controller-manager",
            [
                str(binaries["kube-controller-manager"]),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--controllers=*",
                "--enable-garbage-collector=true",
                f"--service-account-private-key-file={run / 'sa.key'}",
                f"--root-ca-file={self.ca_file}",
                "--bind-address=127.0.0.1",
                f"--secure-port={kcm_port}",
                f"--cert-dir={run / 'kcm-certs'}",
                # 1.20 also serves plain HTTP on 10252 unless told not to, which clashes between runs.
                "--port=0",
                *self._kcm_args,
            ],
        )
        self._wait(
            kcm,
            "healthy (/healthz)",
            lambda: _http_ok(f"https://127.0.0.1:{kcm_port}/healthz", context=ready_ctx),
        )
        if not self._scheduler:
            return
        scheduler = self._spawn(
            "kube-scheduler",
            [
                str(binaries["kube-scheduler"]),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={scheduler_port}",
                f"--cert-dir={run / 'scheduler-certs'}",
                "--port=0",
            ],
        )
        self._wait(
            scheduler,
            "healthy (/healthz)",
            lambda: _http_ok(f"https://127.0.0.1:{scheduler_port}/healthz", context=ready_ctx),
        )

    def _stop_processes(self) -> None:
        while self._processes:
            self._processes.pop().stop()


def _http_ok(url: str, *, token: str | None = None, context: ssl.SSLContext | None = None) -> bool:
    request = urllib.request.Request(url)  # noqa: S310 -- loopback URLs built here
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:  # noqa: S310
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def apply_crd(api_client: ApiClient, crd: Mapping[str, Any], timeout: float = 30.0) -> str:
    """Create or replace one CustomResourceDefinition, wait until it is Established; its name."""
    from kubernetes import client  # noqa: PLC0415 -- see api_client()
    from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

    # Any: the body goes as the plain dict read from YAML, which the client sends unchanged.
    extensions: Any = client.ApiextensionsV1Api(api_client)
    name: str = crd["metadata"]["name"]
    try:
        extensions.create_custom_resource_definition(crd)
    except ApiException as error:
        if error.status != 409:
            raise
        current = extensions.read_custom_resource_definition(name)
        body = {**crd, "metadata": {**crd["metadata"], "resourceVersion": current.metadata.resource_version}}
        extensions.replace_custom_resource_definition(name, body)
    deadline = time.monotonic() + timeout
    while True:
        status = extensions.read_custom_resource_definition(name).status
        conditions = {c.type: c for c in (status.conditions or [])} if status else {}
        if (established := conditions.get("Established")) and established.status == "True":
            return name
        if time.monotonic() > deadline:
            raise ControlPlaneError(f"CRD {name} not Established after {timeout:.0f}s: {conditions}")
        time.sleep(0.05)


def apply_crd_files(api_client: ApiClient, paths: Sequence[Path]) -> list[str]:
    """apply_crd() for every CustomResourceDefinition in these YAML files (multi-document too)."""
    names = []
    for path in paths:
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") == "CustomResourceDefinition":
                names.append(apply_crd(api_client, document))
    return names


def _main() -> None:
    """Start one for manual poking; Ctrl-C or SIGTERM stops it (and cleans up)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # A background job inherits SIGINT ignored; SIGTERM would skip cleanup by default.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    with ControlPlane() as cp:
        print(f"ready in {cp.startup_seconds:.1f}s\nexport KUBECONFIG={cp.kubeconfig}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    _main()
