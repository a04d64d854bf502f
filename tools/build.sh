#!/usr/bin/env bash
# Builds the real Pulumi CLI, the Kubernetes provider plugin, etcd, kube-apiserver, the node's binaries (kubelet,
# kube-scheduler, kube-proxy), the Seldon operator and executor (vendored source), an OCI registry, helm, rclone
# and prometheus-operator from Go modules (no release downloads here), once per version, into a cache folder
# outside the repository. `tools/build.sh NAME...` builds only those (e.g. `seldon_operator registry`).
# Prints progress on stderr and the folder on its last stdout line.
set -euo pipefail

PULUMI_VERSION=3.274.1
K8S_PROVIDER_VERSION=4.25.0
K8S_PROVIDER_MODULE_VERSION=v4.0.0-20260115033456-f47bc2d6f199   # what the proxy serves for tag v4.25.0
ETCD_VERSION=3.6.16
KUBE_VERSION=1.37.2
KUBE_STAGING_VERSION=0.37.2
SELDON_VERSION=1.18.2          # operator and executor, from the vendored source (../shared/vendor)
REGISTRY_VERSION=3.1.2         # github.com/distribution/distribution/v3: the local OCI registry
HELM_VERSION=4.3.2             # helm.sh/helm/v4: renders the pinned charts for the chart-output checks
RCLONE_VERSION=1.76.0          # github.com/rclone/rclone: `rclone serve s3`, the local artifact store
PROM_OPERATOR_VERSION=0.85.0   # github.com/prometheus-operator/prometheus-operator
PROMETHEUS_VERSION=3.5.0       # the operator's default Prometheus; module github.com/prometheus/prometheus v0.305.0
PROMETHEUS_MODULE_VERSION=0.305.0

CACHE=${ML_SERVING_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ml-serving/tools}
OUT="$CACHE/pulumi-$PULUMI_VERSION-k8s-$K8S_PROVIDER_VERSION-etcd-$ETCD_VERSION-kube-$KUBE_VERSION"
BIN="$OUT/bin"
WORK="$CACHE/.build"
if [ "${1:-}" = --print-dir ]; then echo "$OUT"; exit 0; fi
mkdir -p "$BIN" "$WORK"
export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
export PULUMI_HOME="$OUT/pulumi-home" PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION=true PULUMI_SKIP_UPDATE_CHECK=true

say() { printf '[tools %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# wrapper DIR MODULE-LINES: a throwaway main module that requires what is to be built.
wrapper() {
  local dir="$WORK/$1"; shift
  rm -rf "$dir"; mkdir -p "$dir"
  printf 'module wrapper\n\ngo 1.26\n\n%s\n' "$*" >"$dir/go.mod"
  printf 'package wrapper\n' >"$dir/wrapper.go"
  echo "$dir"
}

build_pulumi() {
  [ -x "$BIN/pulumi" ] && { say "pulumi v$PULUMI_VERSION: cached"; return; }
  say "pulumi v$PULUMI_VERSION: building (cold: several minutes)"
  local dir; dir=$(wrapper pulumi "require (
	github.com/pulumi/pulumi/pkg/v3 v$PULUMI_VERSION
	github.com/pulumi/pulumi/sdk/v3 v$PULUMI_VERSION
)")
  (cd "$dir" && go get github.com/pulumi/pulumi/pkg/v3/cmd/pulumi@v$PULUMI_VERSION >&2 &&
    go build -trimpath -ldflags "-s -w -X github.com/pulumi/pulumi/sdk/v3/go/common/version.Version=v$PULUMI_VERSION" \
      -o "$BIN/pulumi.tmp" github.com/pulumi/pulumi/pkg/v3/cmd/pulumi)
  mv "$BIN/pulumi.tmp" "$BIN/pulumi"
  say "pulumi: done"
}

build_k8s_provider() {
  local plugin="$BIN/pulumi-resource-kubernetes"
  if [ ! -x "$plugin" ]; then
    say "pulumi-kubernetes provider v$K8S_PROVIDER_VERSION: building (cold: several minutes)"
    local mod="github.com/pulumi/pulumi-kubernetes/provider/v4"
    local src; src=$(cd "$(wrapper k8s-dl "require $mod $K8S_PROVIDER_MODULE_VERSION")" &&
      go mod download -json "$mod@$K8S_PROVIDER_MODULE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
    local dir="$WORK/k8s-provider"
    rm -rf "$dir"; cp -r "$src" "$dir"; chmod -R u+w "$dir"
    # Its go.mod replaces the SDK with ../sdk (the repository's folder): take the same release from the proxy.
    (cd "$dir" && go mod edit -dropreplace=github.com/pulumi/pulumi-kubernetes/sdk/v4 \
      -require=github.com/pulumi/pulumi-kubernetes/sdk/v4@v$K8S_PROVIDER_VERSION)
    # The embedded schema and mapping are generated (gitignored) upstream: write them from the committed files.
    python3 - "$dir" "$K8S_PROVIDER_VERSION" <<'PY'
import json, pathlib, sys
root, version = pathlib.Path(sys.argv[1]), sys.argv[2]
cmd = root / "cmd" / "pulumi-resource-kubernetes"
schema = json.loads((cmd / "schema.json").read_text())
schema["version"] = version
(cmd / "schema-embed.json").write_text(json.dumps(schema))
(cmd / "terraform-mapping-embed.json").write_text((cmd / "terraform-mapping.json").read_text())
PY
    (cd "$dir" && go build -trimpath -ldflags "-s -w -X github.com/pulumi/pulumi-kubernetes/provider/v4/pkg/version.Version=$K8S_PROVIDER_VERSION" \
      -o "$plugin.tmp" ./cmd/pulumi-resource-kubernetes)
    mv "$plugin.tmp" "$plugin"
    say "pulumi-kubernetes provider: built"
  else
    say "pulumi-kubernetes provider v$K8S_PROVIDER_VERSION: cached"
  fi
  if ! "$BIN/pulumi" plugin ls 2>/dev/null | grep -q "kubernetes.*$K8S_PROVIDER_VERSION"; then
    "$BIN/pulumi" plugin install resource kubernetes "$K8S_PROVIDER_VERSION" --file "$plugin" >&2
  fi
}

build_etcd() {
  [ -x "$BIN/etcd" ] && { say "etcd v$ETCD_VERSION: cached"; return; }
  say "etcd v$ETCD_VERSION: building"
  local dir; dir=$(wrapper etcd "require go.etcd.io/etcd/server/v3 v$ETCD_VERSION")
  (cd "$dir" && go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >&2 && go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$BIN/etcd.tmp" "$BIN/etcd"
  say "etcd: done"
}

# kube_binary NAME: a main package of k8s.io/kubernetes (kube-apiserver; kube-controller-manager for the garbage
# collector and namespace controllers, without which a foreground deletion never finishes).
kube_binary() {
  local name=$1
  [ -x "$BIN/$name" ] && { say "$name v$KUBE_VERSION: cached"; return; }
  say "$name v$KUBE_VERSION: building (cold: the longest of these)"
  local mod="k8s.io/kubernetes"
  local src; src=$(cd "$(wrapper kube-dl "require $mod v$KUBE_VERSION")" &&
    go mod download -json "$mod@v$KUBE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  # k8s.io/kubernetes requires every staging module at v0.0.0 and replaces it with a local path:
  # point each one at its published version instead.
  local replaces
  replaces=$(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$src/go.mod" |
    sed "s#.*#replace & => & v$KUBE_STAGING_VERSION#")
  local dir; dir=$(wrapper "$name" "require $mod v$KUBE_VERSION
$replaces")
  (cd "$dir" && go get "$mod/cmd/$name@v$KUBE_VERSION" >&2 &&
    go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=v$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${KUBE_VERSION#1.}" \
      -o "$BIN/$name.tmp" "$mod/cmd/$name")
  mv "$BIN/$name.tmp" "$BIN/$name"
  say "$name: done"
}

build_kube_apiserver() { kube_binary kube-apiserver; }
build_kube_controller_manager() { kube_binary kube-controller-manager; }
# What a node needs (the `pods` tests): same module, same replaces, so a warm build cache makes these quick.
build_kubelet() { kube_binary kubelet; }
build_kube_scheduler() { kube_binary kube-scheduler; }
build_kube_proxy() { kube_binary kube-proxy; }
# The node's own images' binaries (tools/node, standard library only): the pause process and the node test's server.
build_node_images() {
  [ -x "$BIN/node-pause" ] && [ -x "$BIN/node-hello" ] && { say "node-pause, node-hello: cached"; return; }
  say "node-pause, node-hello: building"
  (cd "$(dirname "$0")/node" && for name in pause hello; do
    go build -trimpath -ldflags "-s -w" -o "$BIN/node-$name.tmp" "./$name" && mv "$BIN/node-$name.tmp" "$BIN/node-$name"
  done)
  say "node-pause, node-hello: done"
}

# The Seldon Core operator and executor, from the vendored source of tag v$SELDON_VERSION (no module proxy copy).
SELDON_SRC_TAR=${ML_SERVING_SELDON_SRC:-$(cd "$(dirname "$0")/../.." && pwd)/shared/vendor/seldon-core-$SELDON_VERSION-src.tar.gz}
seldon_source() {
  local dir="$WORK/seldon-core-$SELDON_VERSION"
  if [ ! -d "$dir" ]; then
    [ -f "$SELDON_SRC_TAR" ] || { echo "error: $SELDON_SRC_TAR is missing (the vendored Seldon source)" >&2; exit 2; }
    tar -C "$WORK" -xzf "$SELDON_SRC_TAR"
  fi
  echo "$dir"
}
build_seldon_operator() {
  [ -x "$BIN/seldon-operator" ] && { say "seldon-operator v$SELDON_VERSION: cached"; return; }
  say "seldon-operator v$SELDON_VERSION: building from the vendored source (cold: ~4 min)"
  local src; src=$(seldon_source)
  (cd "$src/operator" && go build -trimpath -ldflags "-s -w" -o "$BIN/seldon-operator.tmp" .)
  mv "$BIN/seldon-operator.tmp" "$BIN/seldon-operator"
  say "seldon-operator: done"
}
build_seldon_executor() {
  [ -x "$BIN/seldon-executor" ] && { say "seldon-executor v$SELDON_VERSION: cached"; return; }
  say "seldon-executor v$SELDON_VERSION: building from the vendored source"
  local src; src=$(seldon_source)
  # Its main is cmd/executor; go.mod replaces the operator with ./_operator (upstream's Makefile copies ../operator
  # there); confluent-kafka-go needs cgo, so link statically: the image is then the binary alone.
  rm -rf "$src/executor/_operator"; cp -r "$src/operator" "$src/executor/_operator"
  (cd "$src/executor" && CGO_ENABLED=1 go build -trimpath -ldflags "-s -w -linkmode external -extldflags -static" \
    -o "$BIN/seldon-executor.tmp" ./cmd/executor)
  mv "$BIN/seldon-executor.tmp" "$BIN/seldon-executor"
  say "seldon-executor: done"
}

# go_tool NAME MODULE VERSION PACKAGE: a main package of a served module, built through a wrapper module.
go_tool() {
  local name=$1 mod=$2 version=$3 pkg=$4
  [ -x "$BIN/$name" ] && { say "$name v$version: cached"; return; }
  say "$name v$version: building"
  local dir; dir=$(wrapper "$name" "require $mod v$version")
  (cd "$dir" && go get "$pkg@v$version" >&2 && go build -trimpath -ldflags "-s -w" -o "$BIN/$name.tmp" "$pkg")
  mv "$BIN/$name.tmp" "$BIN/$name"
  say "$name: done"
}
build_registry() {
  go_tool registry github.com/distribution/distribution/v3 "$REGISTRY_VERSION" github.com/distribution/distribution/v3/cmd/registry
}
build_helm() { go_tool helm helm.sh/helm/v4 "$HELM_VERSION" helm.sh/helm/v4/cmd/helm; }
build_rclone() { go_tool rclone github.com/rclone/rclone "$RCLONE_VERSION" github.com/rclone/rclone; }
# prometheus-operator and the config reloader it puts beside Prometheus (same module and version, as upstream
# releases them): the `pods` monitoring test runs Prometheus as the StatefulSet the operator generates.
build_prometheus_operator() {
  local mod=github.com/prometheus-operator/prometheus-operator
  go_tool prometheus-operator "$mod" "$PROM_OPERATOR_VERSION" "$mod/cmd/operator"
  go_tool prometheus-config-reloader "$mod" "$PROM_OPERATOR_VERSION" "$mod/cmd/prometheus-config-reloader"
  build_prometheus
}
# Prometheus itself for the operator's pod: Debian's 2.42 is built without Kubernetes service discovery, which every
# PodMonitor's scrape job uses. Module versions v0.3xx.y are Prometheus v3.xx.y; no UI assets (the API is enough).
build_prometheus() {
  [ -x "$BIN/prometheus" ] && { say "prometheus v$PROMETHEUS_VERSION: cached"; return; }
  say "prometheus v$PROMETHEUS_VERSION (module v$PROMETHEUS_MODULE_VERSION): building"
  local mod=github.com/prometheus/prometheus
  local dir; dir=$(wrapper prometheus "require $mod v$PROMETHEUS_MODULE_VERSION")
  (cd "$dir" && go get "$mod/cmd/prometheus@v$PROMETHEUS_MODULE_VERSION" >&2 &&
    go build -trimpath -ldflags "-s -w -X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION" \
      -o "$BIN/prometheus.tmp" "$mod/cmd/prometheus")
  mv "$BIN/prometheus.tmp" "$BIN/prometheus"
  say "prometheus: done"
}

command -v go >/dev/null || { echo "error: no Go toolchain on PATH (Go >= 1.25 builds these tools)" >&2; exit 2; }
start=$SECONDS
if [ $# -gt 0 ]; then
  for t in "$@"; do "build_$t"; done
else
  # Two chains side by side (the provider installs itself with the CLI); downloads overlap with compiles.
  (build_pulumi && build_k8s_provider) &
  cli=$!
  (build_etcd && build_kube_apiserver && build_kube_controller_manager && build_kubelet && build_kube_scheduler &&
    build_kube_proxy && build_node_images) &
  cluster=$!
  # The cluster's own workloads' tools, after the CLI chain (its compiles are the lightest).
  status=0
  wait $cli || status=$?
  build_seldon_operator && build_registry && build_helm && build_seldon_executor && build_rclone &&
    build_prometheus_operator || status=$?
  wait $cluster || status=$?
  [ $status -eq 0 ] || { say "a build failed (its output is above)"; exit $status; }
fi
say "all tools ready in $((SECONDS - start)) s (cold on 2 cores: about 28 min; warm: about 1 s)"
echo "$OUT"
