#!/usr/bin/env bash
# End to end on kind: a laptop (a WireGuard client container) reaches a cluster Service by its DNS name
# through kvpn, installed with Helm the way users install it.
#
#   hack/kind-e2e.sh            # creates cluster "kvpn-e2e", runs, deletes it
#   KEEP_CLUSTER=1 hack/kind-e2e.sh   # leaves cluster and client container up to poke at
#
# Needs docker, kind, kubectl and helm (v3.8+ or v4) on PATH, and a Linux Docker host (the client
# container joins the "kind" network and creates a WireGuard interface). It cannot run on the kvpn
# development machines (no Docker engine); .github/workflows/kind-e2e.yaml runs it on a hosted runner.
#
# What it asserts (issue 4's end-to-end list): by name, short name, ClusterIP and pod IP through the
# tunnel; both gateway nodes serve the peer; restarting the operator and an agent drops no request;
# disabling a peer cuts it off within 2 s; a peer with allowedDestinations reaches only those; deleting
# a peer cuts it off within 2 s.
set -euo pipefail

cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-kvpn-e2e}
IMAGE=${KVPN_IMAGE:-kvpn:e2e}
CLIENT_IMAGE=${KVPN_CLIENT_IMAGE:-kvpn-e2e-client:latest}
NAMESPACE=${KVPN_NAMESPACE:-kvpn-system}
PEERS=dev
HELLO_IMAGE=${HELLO_IMAGE:-registry.k8s.io/e2e-test-images/agnhost:2.52}
NODE_PORT=31820   # kind-config.yaml maps host UDP 51820 to this NodePort on the first worker
LISTEN_PORT=51820 # the VpnServer's listenPort: each agent's WireGuard port on its node (hostNetwork)
CUT_MS=2000       # disabling or deleting a peer cuts it off within this long
KEEP=${KEEP_CLUSTER:-0}
CLIENT=$CLUSTER-client

work=$(mktemp -d)
export KUBECONFIG=$work/kubeconfig # never touches the user's kubeconfig

log() { printf '\n== %s\n' "$*" >&2; }
fail() {
  echo "FAIL: $*" >&2
  exit 1
}

diagnostics() {
  log "diagnostics"
  kubectl get nodes -o wide || true
  kubectl get pods -A -o wide || true
  kubectl -n "$NAMESPACE" get vpnservers -o yaml || true
  kubectl -n "$PEERS" get vpnpeers -o yaml || true
  kubectl get events -A --sort-by=.lastTimestamp | tail -n 40 || true
  kubectl -n "$NAMESPACE" logs deployment/kvpn-operator --tail=100 || true
  for pod in $(kubectl -n "$NAMESPACE" get pods -l app.kubernetes.io/component=agent -o name 2>/dev/null); do
    kubectl -n "$NAMESPACE" logs "$pod" --tail=100 || true
  done
  docker exec "$CLIENT" wg show 2>/dev/null || true
  docker exec "$CLIENT" ip route 2>/dev/null || true
}

cleanup() {
  local status=$?
  trap - EXIT
  if [ "$status" -ne 0 ]; then diagnostics; fi
  if [ "$KEEP" = 1 ]; then
    log "kept: cluster $CLUSTER (KUBECONFIG=$KUBECONFIG), client container $CLIENT"
  else
    docker rm -f "$CLIENT" >/dev/null 2>&1 || true
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    rm -rf "$work"
  fi
  exit "$status"
}
trap cleanup EXIT

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || fail "$tool is not on PATH"
done

now_ms() {
  local t=$EPOCHREALTIME # bash 5: seconds.microseconds
  echo $((10#${t/./} / 1000))
}

# --- cluster, image, chart -------------------------------------------------------------------------

log "kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --config kind-config.yaml --kubeconfig "$KUBECONFIG" --wait 180s

log "image $IMAGE"
DOCKER_BUILDKIT=1 docker build -t "$IMAGE" .  # the Dockerfile mounts build secrets (RUN --mount)
kind load docker-image "$IMAGE" --name "$CLUSTER"
# The laptop: the same WireGuard tools plus curl.
docker build -t "$CLIENT_IMAGE" - <<EOF
FROM $IMAGE
USER 0
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
EOF

node_ip() { kubectl get node "$1" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}'; }
WORKER1=$CLUSTER-worker
WORKER2=$CLUSTER-worker2
WORKER1_IP=$(node_ip "$WORKER1")
WORKER2_IP=$(node_ip "$WORKER2")
if [ -z "$WORKER1_IP" ] || [ -z "$WORKER2_IP" ]; then fail "no InternalIP on the workers"; fi

log "helm install into $NAMESPACE"
# The agent needs hostNetwork and NET_ADMIN: the namespace must allow privileged pods.
kubectl create namespace "$NAMESPACE"
kubectl label namespace "$NAMESPACE" pod-security.kubernetes.io/enforce=privileged
kubectl create namespace "$PEERS"
helm install kvpn helm/kvpn --namespace "$NAMESPACE" \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=Never \
  --set server.create=true \
  --set server.expose.type=NodePort \
  --set server.expose.nodePort=$NODE_PORT \
  --set server.expose.endpoint="$WORKER1_IP:$NODE_PORT" \
  --set "server.peerNamespaces={$PEERS}" \
  --set "operator.secretNamespaces={$PEERS}" \
  --wait --timeout 5m
kubectl -n "$NAMESPACE" wait vpnserver/default --for=condition=Ready --timeout=120s
kubectl -n "$NAMESPACE" get vpnserver default -o wide

log "hello: a ClusterIP Service in front of one pod"
kubectl create deployment hello --image="$HELLO_IMAGE" -- /agnhost netexec --http-port=8080
kubectl expose deployment hello --port=80 --target-port=8080
# The same pods behind a second ClusterIP: what the restricted peer must not reach.
kubectl expose deployment hello --name=hello-other --port=80 --target-port=8080
kubectl rollout status deployment/hello --timeout=180s
HELLO_CLUSTER_IP=$(kubectl get service hello -o jsonpath='{.spec.clusterIP}')
OTHER_CLUSTER_IP=$(kubectl get service hello-other -o jsonpath='{.spec.clusterIP}')
HELLO_POD_IP=$(kubectl get pods -l app=hello -o jsonpath='{.items[0].status.podIP}')

log "VpnPeers laptop (everything) and restricted (hello's ClusterIP, TCP 80 only)"
kubectl apply -f - <<EOF
apiVersion: kvpn.dev/v1alpha1
kind: VpnPeer
metadata:
  name: laptop
  namespace: $PEERS
spec:
  serverRef: {name: default, namespace: $NAMESPACE}
---
apiVersion: kvpn.dev/v1alpha1
kind: VpnPeer
metadata:
  name: restricted
  namespace: $PEERS
spec:
  serverRef: {name: default, namespace: $NAMESPACE}
  allowedDestinations:
    - cidr: $HELLO_CLUSTER_IP/32
      protocol: TCP
      ports: [{port: 80}]
EOF
kubectl -n "$PEERS" wait vpnpeer/laptop vpnpeer/restricted --for=condition=Ready --timeout=120s

# --- the laptop --------------------------------------------------------------------------------------

log "WireGuard client container $CLIENT on the kind network"
docker rm -f "$CLIENT" >/dev/null 2>&1 || true
docker run -d --name "$CLIENT" --network kind --cap-add NET_ADMIN --device /dev/net/tun \
  --user 0 --entrypoint sleep "$CLIENT_IMAGE" infinity >/dev/null
in_client() { docker exec "$CLIENT" "$@"; }

# Brings the client's tunnel up with the peer's config from its Secret, exactly as a user fetches it.
# A container has no resolvconf for wg-quick's DNS line: its servers and search domains go to the
# container's /etc/resolv.conf instead (what wg-quick would have done).
connect() {
  local peer=$1 secret conf dns
  secret=$(kubectl -n "$PEERS" get vpnpeer "$peer" -o jsonpath='{.status.configSecretName}')
  conf=$(kubectl -n "$PEERS" get secret "$secret" -o jsonpath='{.data.wg0\.conf}' | base64 -d)
  in_client wg-quick down wg0 >/dev/null 2>&1 || true
  printf '%s\n' "$conf" | sed '/^DNS *=/d' |
    in_client sh -c 'mkdir -p /etc/wireguard && umask 077 && cat > /etc/wireguard/wg0.conf'
  dns=$(sed -n 's/^DNS *= *//p' <<<"$conf")
  if [ -n "$dns" ]; then
    local items item servers=() domains=()
    IFS=',' read -ra items <<<"$dns"
    for item in "${items[@]}"; do
      read -r item <<<"$item" # trims the blanks around it
      if [[ $item =~ ^[0-9a-fA-F:.]+$ ]]; then servers+=("$item"); else domains+=("$item"); fi
    done
    {
      printf 'nameserver %s\n' "${servers[@]}"
      if [ ${#domains[@]} -gt 0 ]; then echo "search ${domains[*]}"; fi
      echo "options timeout:1 attempts:2"
    } | in_client sh -c 'cat > /etc/resolv.conf'
  fi
  in_client wg-quick up wg0
}

get() { in_client curl -fsS --max-time "${2:-3}" "$1"; }

# Polls until a request succeeds (the first one waits for the handshake and the agents' sync).
eventually_get() {
  local url=$1 deadline=$(($(now_ms) + ${2:-60} * 1000))
  until get "$url" 2>/dev/null; do
    [ "$(now_ms)" -lt "$deadline" ] || fail "never reached $url"
    sleep 0.5
  done
}

expect_hello() {
  local what=$1 url=$2 body
  body=$(get "$url") || fail "$what: $url unreachable"
  [[ $body == hello-* ]] || fail "$what: $url answered '$body', not a hello pod's name"
  echo "ok: $what ($url -> $body)"
}

expect_unreachable() {
  local what=$1 url=$2
  if get "$url" 2 >/dev/null 2>&1; then fail "$what: $url is reachable"; fi
  echo "ok: $what ($url unreachable)"
}

# Milliseconds from now until requests to $url stop getting through; fails past $CUT_MS.
expect_cut_within() {
  local what=$1 url=$2 start elapsed
  start=$(now_ms)
  while in_client curl -fsS --max-time 0.5 "$url" >/dev/null 2>&1; do
    elapsed=$(($(now_ms) - start))
    [ "$elapsed" -le $((CUT_MS + 1000)) ] || fail "$what: $url still reachable after ${elapsed} ms"
    sleep 0.1
  done
  elapsed=$(($(now_ms) - start))
  [ "$elapsed" -le "$CUT_MS" ] || fail "$what: cut after ${elapsed} ms (> ${CUT_MS} ms)"
  echo "ok: $what cut after ${elapsed} ms"
}

log "laptop: by name, short name, ClusterIP and pod IP"
connect laptop
eventually_get "http://hello.default.svc.cluster.local/hostname" >/dev/null
expect_hello "by DNS name" "http://hello.default.svc.cluster.local/hostname"
expect_hello "by short name (search domains)" "http://hello.default/hostname"
expect_hello "by ClusterIP" "http://$HELLO_CLUSTER_IP/hostname"
expect_hello "by pod IP" "http://$HELLO_POD_IP:8080/hostname"
expect_hello "another Service" "http://$OTHER_CLUSTER_IP/hostname"

log "both gateway nodes serve the peer"
SERVER_KEY=$(kubectl -n "$NAMESPACE" get vpnserver default -o jsonpath='{.status.publicKey}')
for ip in "$WORKER2_IP" "$WORKER1_IP"; do
  # Straight to one agent (hostNetwork, listenPort), not through the NodePort's load balancing.
  in_client wg set wg0 peer "$SERVER_KEY" endpoint "$ip:$LISTEN_PORT"
  eventually_get "http://$HELLO_CLUSTER_IP/hostname" 20 >/dev/null
  expect_hello "via the gateway at $ip" "http://hello.default.svc.cluster.local/hostname"
done

log "restarting the operator and the agent the tunnel goes through drops nothing"
failures=$work/failures
: >"$failures"
(
  while [ ! -e "$work/stop" ]; do
    get "http://$HELLO_CLUSTER_IP/hostname" 2 >/dev/null 2>&1 || echo "$(date +%T.%N) failed" >>"$failures"
    sleep 0.2
  done
) &
prober=$!
kubectl -n "$NAMESPACE" rollout restart deployment/kvpn-operator
kubectl -n "$NAMESPACE" rollout status deployment/kvpn-operator --timeout=180s
agent=$(kubectl -n "$NAMESPACE" get pods -l app.kubernetes.io/component=agent \
  --field-selector spec.nodeName="$WORKER1" -o jsonpath='{.items[0].metadata.name}')
kubectl -n "$NAMESPACE" delete pod "$agent" --wait=true
kubectl -n "$NAMESPACE" rollout status daemonset/kvpn-agent --timeout=180s
sleep 5
touch "$work/stop"
wait "$prober"
[ ! -s "$failures" ] || fail "requests failed during the restarts: $(cat "$failures")"
echo "ok: no request failed while the operator and agent $agent restarted"

log "disabling the peer cuts it off within ${CUT_MS} ms, enabling brings it back"
kubectl -n "$PEERS" patch vpnpeer laptop --type=merge -p '{"spec":{"disabled":true}}' >/dev/null
expect_cut_within "disabled peer" "http://$HELLO_CLUSTER_IP/hostname"
kubectl -n "$PEERS" patch vpnpeer laptop --type=merge -p '{"spec":{"disabled":false}}' >/dev/null
eventually_get "http://$HELLO_CLUSTER_IP/hostname" 30 >/dev/null
echo "ok: re-enabled peer reaches hello again"

log "restricted peer: only hello's ClusterIP, TCP 80"
connect restricted
eventually_get "http://$HELLO_CLUSTER_IP/hostname" >/dev/null
expect_hello "allowed destination" "http://$HELLO_CLUSTER_IP/hostname"
expect_unreachable "pod IP outside allowedDestinations" "http://$HELLO_POD_IP:8080/hostname"
expect_unreachable "another Service, same pods" "http://$OTHER_CLUSTER_IP/hostname"

log "deleting the peer cuts it off within ${CUT_MS} ms"
kubectl -n "$PEERS" delete vpnpeer restricted --wait=false >/dev/null
expect_cut_within "deleted peer" "http://$HELLO_CLUSTER_IP/hostname"

log "PASS"
