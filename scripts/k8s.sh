#!/usr/bin/env bash
# Build, start, stop or show a small Kubernetes control plane on 127.0.0.1 for the deployment
# tests: etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok (fake nodes, two
# of them with nvidia.com/gpu in their capacity), plus the helm client. Nothing runs in the pods:
# kwok marks them Running.
#
#   scripts/k8s.sh build     # once: go build from the Go module proxy, cached outside the checkout
#   scripts/k8s.sh start     # idempotent; writes .cache/k8s/env (KUBECONFIG, RLHF_TEST_K8S_*)
#   scripts/k8s.sh status
#   scripts/k8s.sh stop      # stops every process and deletes the cluster's state
#   scripts/k8s.sh bin-dir   # prints the directory of the built binaries (exit 1 if not built)
#
# The versions are pinned by the wrapper modules in deploy/k8s/tools/*/go.mod and go.sum
# (Kubernetes 1.37.2 with etcd 3.7.0, Helm 3.22.0, kwok 0.8.0; prometheus-operator 0.85.0 only for
# its ServiceMonitor and PrometheusRule CRDs). The binaries go to
# ${XDG_CACHE_HOME:-$HOME/.cache}/rlhf/k8s/<module>-<hash of its go.mod and go.sum>/, so a version
# change builds anew and an unchanged one is reused. Go 1.26 must be on PATH for the build only.
#
# Environment:
#   RLHF_TEST_INFRA=none      do nothing
#   RLHF_K8S_BUILD_JOBS       parallel packages in the build (go build -p; default: every core,
#                             so that a cold build fits the test command's budget; 1 leaves the
#                             other cores free, at 25 minutes on an idle core, an hour on a busy one)
#   RLHF_TEST_K8S_PORT        kube-apiserver port (default 16443); etcd uses the next two
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/rlhf/k8s"
TOOLS="$ROOT/deploy/k8s/tools"
STATE="$ROOT/.cache/k8s"
API_PORT="${RLHF_TEST_K8S_PORT:-16443}"
ETCD_PORT="$((API_PORT + 1))"
ETCD_PEER_PORT="$((API_PORT + 2))"
START_TIMEOUT="${RLHF_TEST_INFRA_TIMEOUT:-90}"
K8S_VERSION=v1.37.2
JOBS="${RLHF_K8S_BUILD_JOBS:-$(nproc 2>/dev/null || echo 1)}"

log() { echo "[k8s] $*" >&2; }
die() { echo "[k8s] error: $*" >&2; exit 1; }

if [ "${RLHF_TEST_INFRA:-}" = "none" ] && [ "${1:-}" != "bin-dir" ] && [ "${1:-}" != "status" ]; then
  log "RLHF_TEST_INFRA=none: not building or managing the control plane"
  exit 0
fi

# ---------------------------------------------------------------------------------------- build

module_dir() {  # the cache directory of one wrapper module's binaries
  local key
  key="$(cat "$TOOLS/$1/go.mod" "$TOOLS/$1/go.sum" | sha256sum | cut -c1-12)"
  echo "$CACHE/$1-$key"
}

bin_dir() {  # one directory of links for this checkout's combination of versions
  echo "$CACHE/bin-$(echo "$(module_dir kubernetes) $(module_dir helm) $(module_dir kwok) $(module_dir prometheus-operator)" | sha256sum | cut -c1-12)"
}

KUBE_BINS=(etcd kube-apiserver kube-controller-manager kube-scheduler)
built() {
  local b
  for b in "${KUBE_BINS[@]}"; do [ -x "$(module_dir kubernetes)/$b" ] || return 1; done
  [ -x "$(module_dir helm)/helm" ] && [ -x "$(module_dir kwok)/kwok" ] \
    && [ -f "$(module_dir kwok)/stages.yaml" ] && [ -f "$(module_dir prometheus-operator)/crds.yaml" ]
}

go_build() {  # module, output file, package, ldflags
  local mod="$1" out="$2" pkg="$3" ldflags="$4"
  [ -x "$out" ] && return 0
  need_go
  log "building $(basename "$out") ($pkg)"
  mkdir -p "$(dirname "$out")"
  (cd "$TOOLS/$mod" && GOFLAGS=-mod=readonly GOMAXPROCS="$JOBS" nice -n 10 go build -p "$JOBS" -trimpath \
     -ldflags "-s -w $ldflags" -o "$out.tmp" "$pkg") || die "go build $pkg failed"
  mv "$out.tmp" "$out"
}

need_go() {
  command -v go >/dev/null || die "Go 1.26 is needed once to build the control plane (https://go.dev/dl)"
}

build() {
  local kube helm kwok po bin v kv="" src f
  kube="$(module_dir kubernetes)"; helm="$(module_dir helm)"; kwok="$(module_dir kwok)"
  po="$(module_dir prometheus-operator)"; bin="$(bin_dir)"
  # without these the servers report v0.0.0-master and helm assumes Kubernetes 1.20
  for v in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    kv="$kv -X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=37 -X $v.gitTreeState=clean"
  done
  go_build kubernetes "$kube/etcd" go.etcd.io/etcd/server/v3 ""
  go_build kubernetes "$kube/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver "$kv"
  go_build kubernetes "$kube/kube-controller-manager" k8s.io/kubernetes/cmd/kube-controller-manager "$kv"
  go_build kubernetes "$kube/kube-scheduler" k8s.io/kubernetes/cmd/kube-scheduler "$kv"
  go_build helm "$helm/helm" helm.sh/helm/v3/cmd/helm \
    "-X helm.sh/helm/v3/internal/version.version=v3.22.0 -X helm.sh/helm/v3/internal/version.gitTreeState=clean
     -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=37
     -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=37"
  go_build kwok "$kwok/kwok" sigs.k8s.io/kwok/cmd/kwok ""
  if [ ! -f "$kwok/stages.yaml" ]; then
    # kwok needs stages to act on nodes and pods; the "fast" ones ship in its module
    need_go
    src="$(cd "$TOOLS/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)" || die "kwok's module source not found"
    for f in node/fast/node-initialize.yaml node/heartbeat/node-heartbeat.yaml pod/fast/pod-ready.yaml \
             pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
      echo "---"; cat "$src/kustomize/stage/$f"
    done >"$kwok/stages.yaml.tmp"
    mv "$kwok/stages.yaml.tmp" "$kwok/stages.yaml"
  fi
  if [ ! -f "$po/crds.yaml" ]; then
    # the ServiceMonitor and PrometheusRule kinds, for the API server to validate the chart's objects
    need_go
    src="$(cd "$TOOLS/prometheus-operator" && GOFLAGS=-mod=readonly go mod download -json github.com/prometheus-operator/prometheus-operator \
           | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
    [ -d "$src" ] || die "downloading the prometheus-operator module failed"
    mkdir -p "$po"
    for f in servicemonitors prometheusrules; do
      echo "---"; cat "$src/example/prometheus-operator-crd/monitoring.coreos.com_$f.yaml"
    done >"$po/crds.yaml.tmp"
    mv "$po/crds.yaml.tmp" "$po/crds.yaml"
  fi
  mkdir -p "$bin"
  for v in "${KUBE_BINS[@]}"; do ln -sfn "$kube/$v" "$bin/$v"; done
  ln -sfn "$helm/helm" "$bin/helm"
  ln -sfn "$kwok/kwok" "$bin/kwok"
  ln -sfn "$kwok/stages.yaml" "$bin/kwok-stages.yaml"
  ln -sfn "$po/crds.yaml" "$bin/prometheus-operator-crds.yaml"
  log "built: $bin"
}


# ---------------------------------------------------------------------------------- the cluster

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

component_pid() {  # prints the pid of a component this checkout started, when it runs
  local pid
  [ -f "$STATE/$1.pid" ] || return 1
  pid="$(cat "$STATE/$1.pid")"
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$1" || return 1
  echo "$pid"
}

api() {  # method, path, [json body]: a call to the apiserver as the admin
  curl -sS --fail-with-body --max-time 10 --cacert "$STATE/pki/ca.crt" --cert "$STATE/pki/admin.crt" \
    --key "$STATE/pki/admin.key" -X "$1" -H 'Content-Type: application/json' \
    ${3:+--data "$3"} "https://127.0.0.1:$API_PORT$2"
}

make_pki() {  # a CA, the apiserver's serving cert, an admin client cert, the service-account keys
  local d="$STATE/pki"
  mkdir -p "$d"
  (
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj "/CN=rlhf-test-ca"
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver"
    printf 'subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\n' >san.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 30 -extfile san.ext
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=rlhf-test-admin"
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 30
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
  ) >"$STATE/pki.out" 2>&1 || { cat "$STATE/pki.out" >&2; die "creating the certificates with openssl failed"; }
  cat >"$STATE/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: rlhf-test
  cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: "$d/ca.crt"}
users:
- name: admin
  user: {client-certificate: "$d/admin.crt", client-key: "$d/admin.key"}
contexts:
- name: rlhf-test
  context: {cluster: rlhf-test, user: admin}
current-context: rlhf-test
EOF
}

launch() {  # name, args...: start a component in the background, its output in $STATE/<name>.log
  local name="$1"
  shift
  nohup "$BIN/$name" "$@" >"$STATE/$name.log" 2>&1 </dev/null 9>&- &
  echo $! >"$STATE/$name.pid"
}

wait_for() {  # what, command...: until the command succeeds, while the components run
  local what="$1" waited=0 c
  shift
  until "$@" >/dev/null 2>&1; do
    if [ "$waited" -ge "$START_TIMEOUT" ]; then
      tail -20 "$STATE"/*.log >&2 || true
      die "$what not ready within ${START_TIMEOUT}s (log tails above)"
    fi
    for c in "${COMPONENTS[@]}"; do
      # alive is enough here: just after the launch its command line may still be this script's
      if [ -f "$STATE/$c.pid" ] && ! kill -0 "$(cat "$STATE/$c.pid")" 2>/dev/null; then
        tail -30 "$STATE/$c.log" >&2 || true
        die "$c exited during start (log tail above)"
      fi
    done
    sleep 1
    waited=$((waited + 1))
  done
}

# Fake nodes for kwok: one without GPUs, two in a GPU pool (labelled and tainted as the NVIDIA
# GPU operator's nodes are). A node's status may be set on create; kwok keeps its capacity.
node_json() {  # name, gpus
  local gpu_labels="" taints="" gpu_cap=""
  if [ "$2" -gt 0 ]; then
    gpu_labels=',"nvidia.com/gpu.present":"true"'
    taints=',"taints":[{"key":"nvidia.com/gpu","value":"present","effect":"NoSchedule"}]'
    gpu_cap=",\"nvidia.com/gpu\":\"$2\""
  fi
  cat <<EOF
{"apiVersion":"v1","kind":"Node","metadata":{"name":"$1","annotations":{"kwok.x-k8s.io/node":"fake"},
 "labels":{"kubernetes.io/hostname":"$1","kubernetes.io/os":"linux","kubernetes.io/arch":"amd64",
           "type":"kwok"$gpu_labels}},
 "spec":{"unschedulable":false$taints},
 "status":{"capacity":{"cpu":"32","memory":"256Gi","pods":"110"$gpu_cap},
           "allocatable":{"cpu":"32","memory":"256Gi","pods":"110"$gpu_cap}}}
EOF
}

nodes_ready() {  # three nodes, each Ready
  api GET /api/v1/nodes | python3 -c '
import json, sys
nodes = json.load(sys.stdin)["items"]
ready = [n for n in nodes if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))]
sys.exit(0 if len(ready) >= 3 else 1)'
}

start() {
  built || build
  BIN="$(bin_dir)"
  command -v openssl >/dev/null || die "openssl is needed for the cluster's certificates"
  command -v curl >/dev/null || die "curl is needed to talk to the apiserver"
  if component_pid kube-apiserver >/dev/null; then
    [ "$(cat "$STATE/port" 2>/dev/null)" = "$API_PORT" ] \
      || die "the control plane already runs on port $(cat "$STATE/port" 2>/dev/null), not $API_PORT: stop it first"
    log "control plane already running (https://127.0.0.1:$API_PORT)"
  else
    stop_all
    local p pki="$STATE/pki" n
    for p in "$API_PORT" "$ETCD_PORT" "$ETCD_PEER_PORT"; do
      port_open "$p" && die "port $p is in use by another process (set RLHF_TEST_K8S_PORT)"
    done
    mkdir -p "$STATE"
    echo "$API_PORT" >"$STATE/port"
    make_pki
    log "starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (logs: .cache/k8s/*.log)"
    launch etcd --name rlhf-test --data-dir "$STATE/etcd" --unsafe-no-fsync --log-level warn \
      --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
      --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
      --initial-cluster "rlhf-test=http://127.0.0.1:$ETCD_PEER_PORT"
    wait_for etcd curl -sf "http://127.0.0.1:$ETCD_PORT/health"
    # advertising 127.0.0.1 needs the endpoint reconciler off; no kubelet mounts tokens, so no
    # ServiceAccount admission (nothing runs in the pods)
    launch kube-apiserver --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
      --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
      --endpoint-reconciler-type none --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
      --client-ca-file "$pki/ca.crt" --authorization-mode RBAC --disable-admission-plugins ServiceAccount \
      --service-account-issuer https://kubernetes.default.svc.cluster.local --service-account-key-file "$pki/sa.pub" \
      --service-account-signing-key-file "$pki/sa.key" --service-cluster-ip-range 10.96.0.0/16 \
      --allow-privileged=true --profiling=false
    wait_for kube-apiserver api GET /readyz
    launch kube-controller-manager --kubeconfig "$STATE/kubeconfig" --leader-elect=false --secure-port 0 \
      --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
      --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" --profiling=false
    launch kube-scheduler --kubeconfig "$STATE/kubeconfig" --leader-elect=false --secure-port 0 --profiling=false
    launch kwok --kubeconfig "$STATE/kubeconfig" --config "$BIN/kwok-stages.yaml" \
      --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake --cidr 10.244.0.0/16 --node-ip 10.0.0.1
    for n in "kwok-cpu-0 0" "kwok-gpu-0 8" "kwok-gpu-1 8"; do
      # shellcheck disable=SC2086
      api POST /api/v1/nodes "$(node_json $n)" >/dev/null || die "creating node ${n% *} failed"
    done
    wait_for "the fake nodes" nodes_ready
  fi
  cat >"$STATE/env" <<EOF
# written by scripts/k8s.sh start; source it before running the deployment tests
export RLHF_TEST_KUBECONFIG=$STATE/kubeconfig
export RLHF_TEST_K8S_BIN=$BIN
EOF
  log "ready: source .cache/k8s/env (kubeconfig: .cache/k8s/kubeconfig)"
}

stop_all() {  # every component, in reverse order, each waited for; then the state
  local i c pid
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    c="${COMPONENTS[$i]}"
    if pid="$(component_pid "$c")"; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -9 "$pid" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    fi
  done
  rm -rf "$STATE"
}

# ----------------------------------------------------------------------------------------- main

# one build, start or stop at a time per checkout (the components run with fd 9 closed)
case "${1:-}" in
  build | start | stop)
    mkdir -p "$ROOT/.cache"
    if command -v flock >/dev/null; then
      exec 9>"$ROOT/.cache/k8s.lock"
      flock 9
    fi
    ;;
esac

case "${1:-}" in
  build) build ;;
  start) start ;;
  stop)
    if component_pid kube-apiserver >/dev/null || [ -d "$STATE" ]; then log "stopping the control plane"; fi
    stop_all
    ;;
  status)
    rc=0
    for c in "${COMPONENTS[@]}"; do
      if pid="$(component_pid "$c")"; then echo "$c: running (pid $pid)"; else echo "$c: stopped"; rc=1; fi
    done
    [ "$rc" -eq 0 ] && echo "apiserver: https://127.0.0.1:$(cat "$STATE/port"), kubeconfig $STATE/kubeconfig"
    exit "$rc"
    ;;
  bin-dir)
    built || { echo "[k8s] not built: run scripts/k8s.sh build" >&2; exit 1; }
    bin_dir
    ;;
  *)
    echo "usage: $0 build|start|stop|status|bin-dir" >&2
    exit 2
    ;;
esac
