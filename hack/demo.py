"""The local demo: a real control plane and the operator, a VpnServer and a VpnPeer, and the config a laptop gets.

Run with `make demo`; it stays up until Ctrl-C and removes everything it started when it ends.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml
from kubernetes import client

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.controlplane import ControlPlane, apply_crd_files  # noqa: E402
from tests.support.kvpn import Kvpn, decode  # noqa: E402
from tests.support.operator_process import OperatorProcess  # noqa: E402

NAMESPACE = "demo"


def main() -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="kvpn-demo-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with ControlPlane(run_dir=run_dir / "control-plane") as plane:
        api = plane.api_client()
        apply_crd_files(api, sorted((REPO / "crds").glob("*.yaml")))
        with OperatorProcess(plane, log_path=run_dir / "operator.log"):
            client.CoreV1Api(api).create_namespace({"metadata": {"name": NAMESPACE}})
            kvpn = Kvpn(api)
            for sample in ("vpnserver.yaml", "vpnpeer.yaml"):
                obj = yaml.safe_load((REPO / "crds" / "samples" / sample).read_text())
                kvpn.create(f"{obj['kind'].lower()}s", NAMESPACE, obj["metadata"]["name"], obj["spec"])
            peer = kvpn.wait_ready("vpnpeers", NAMESPACE, "alice")
            secret = kvpn.secret(NAMESPACE, peer["status"]["configSecretName"])
            print(f"\nkvpn demo is up (files in {run_dir}).\n")
            print(f"  export KUBECONFIG={plane.kubeconfig}")
            print(f"  kubectl get vpnservers,vpnpeers -n {NAMESPACE} -o wide")
            print(f"  kubectl get secret -n {NAMESPACE} kvpn-peer-alice -o jsonpath='{{.data.wg0\\.conf}}' | base64 -d")
            print(f"  operator log: {run_dir / 'operator.log'}\n")
            print("The laptop's wg0.conf for VpnPeer demo/alice:\n")
            print(decode(secret, "wg0.conf") if secret else "(missing)")
            print("Ctrl-C stops the demo and removes everything it started.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                print("\nstopping")


if __name__ == "__main__":
    main()
