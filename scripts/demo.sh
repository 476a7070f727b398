#!/usr/bin/env bash
# A local hotswap fleet on loopback, start to finish, no manual step:
# a control plane, three agents in two environments, the fleet view, a
# kill -9 of the control plane that the agents survive, then a clean teardown.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin="${HOTSWAP_BIN_DIR:-$root/target/debug}"
work=$(mktemp -d "${TMPDIR:-/tmp}/hotswap-demo.XXXXXX")
pids=()

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Wait up to $1 seconds for a command to succeed.
wait_for() {
  local seconds=$1; shift
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then echo "demo: timed out waiting for: $*" >&2; exit 1; fi
    sleep 0.2
  done
}

# Value of a "key": "value" field in a small JSON file.
json_field() { sed -n "s/.*\"$2\": *\"\([^\"]*\)\".*/\1/p" "$1" | head -n1; }

start_control_plane() {
  local listen=$1
  rm -f "$work/cp/run/addresses.json"
  "$bin/hotswap-control-plane" run --data-dir "$work/cp" --listen "$listen" \
    --admin-listen 127.0.0.1:0 --config "$work/cp.toml" >>"$work/cp.log" 2>&1 &
  cp_pid=$!
  pids+=("$cp_pid")
  wait_for 20 test -s "$work/cp/run/addresses.json"
  grpc=$(json_field "$work/cp/run/addresses.json" grpc)
  admin=$(json_field "$work/cp/run/addresses.json" admin)
}

ctl() { "$bin/hotswapctl" --profile "$work/cp/admin.profile.toml" --endpoint "https://$grpc" "$@"; }
connected_count() { ctl nodes list | grep -c ' connected ' || true; }
all_connected() { [ "$(connected_count)" -eq 3 ]; }

say "initialising a control plane in $work/cp"
"$bin/hotswap-control-plane" init --data-dir "$work/cp"
printf 'heartbeat_interval = "1s"\nheartbeat_grace = "3s"\n' >"$work/cp.toml"
start_control_plane 127.0.0.1:0
echo "gRPC on $grpc, admin on $admin"

say "creating join tokens (labels are forced on the nodes that use them)"
ctl -o json tokens create --uses 2 --label environment=dev >"$work/dev-token.json"
ctl -o json tokens create --uses 1 --label environment=production >"$work/prod-token.json"
cat "$work/dev-token.json"
fingerprint=$(json_field "$work/dev-token.json" ca_fingerprint)

start_agent() {
  local name=$1 token_file=$2 port=$3
  HOTSWAP_JOIN_TOKEN=$(json_field "$token_file" token) \
    "$bin/hotswap-agent" run --data-dir "$work/agent-$name" --control-plane "https://$grpc" \
    --ca-fingerprint "$fingerprint" --name "$name" --label zone=local --label "port=$port" \
    --admin-listen 127.0.0.1:0 >>"$work/agent-$name.log" 2>&1 &
  pids+=("$!")
}

say "starting three agents: web-1 and web-2 in dev, api-1 in production"
start_agent web-1 "$work/dev-token.json" 18081
start_agent web-2 "$work/dev-token.json" 18082
start_agent api-1 "$work/prod-token.json" 18083
wait_for 30 all_connected

say "hotswapctl nodes list"
ctl nodes list
say "hotswapctl nodes list --env production -o json"
ctl -o json nodes list --env production

say "signing and pushing modules: hello (process; 1.0.0, 1.1.0, and a broken 1.2.0) and greeting-config (bundle)"
"$bin/hotswapctl" keys generate --out "$work/publisher" >/dev/null
ctl keys trust "$work/publisher.pub" --name demo-publisher
pack() { # module-dir version out [env-line]
  local src=$1 version=$2 out=$3 extra=${4:-} tmp="$work/pack-$(basename "$1")-$2"
  mkdir -p "$tmp" && cp -R "$src/." "$tmp/"
  if grep -q 'runtime = "process"' "$tmp/module.toml"; then
    mkdir -p "$tmp/bin" && cp "$bin/hello-server" "$tmp/bin/"
    # Each demo node serves on the port in its `port` label.
    sed -i 's/127\.0\.0\.1:18080/127.0.0.1:${NODE_LABEL_port}/' "$tmp/module.toml"
    [ -n "$extra" ] && sed -i "s/^command = .*/&\nenv = { $extra }/" "$tmp/module.toml"
  fi
  sed -i "s/^version = .*/version = \"$version\"/" "$tmp/module.toml"
  "$bin/hotswapctl" module pack "$tmp" --key "$work/publisher.key" -o "$out" >/dev/null
  ctl module push "$out"
}
pack "$root/examples/hello-process" 1.0.0 "$work/hello-1.0.0.hsm"
pack "$root/examples/hello-process" 1.1.0 "$work/hello-1.1.0.hsm"
pack "$root/examples/hello-process" 1.2.0 "$work/hello-1.2.0.hsm" 'HELLO_ERROR_RATE = "0.5"'
pack "$root/examples/bundle-config" 1.0.0 "$work/greeting-1.0.0.hsm"
ctl module list

http_get() { # port
  exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n' >&3 && tail -n1 <&3; exec 3>&-
}
load() { # seconds: requests to both dev nodes, counting failures
  local ok=0 failed=0 end=$((SECONDS + $1))
  while ((SECONDS < end)); do
    for port in 18081 18082; do
      if out=$(http_get "$port" 2>/dev/null) && [[ $out == hello* ]]; then ok=$((ok + 1)); else failed=$((failed + 1)); fi
    done
  done
  echo "client: $ok requests answered, $failed failed"
}

say "deploy hello@1.0.0 to dev (dev's default strategy: direct)"
ctl deploy create hello@1.0.0 --env dev --wait --timeout 90s
echo "web-1: $(http_get 18081)    web-2: $(http_get 18082)"

say "rolling upgrade of dev to 1.1.0, one node at a time, while a client keeps sending requests"
load 12 &
loader=$!
ctl deploy create hello@1.1.0 --env dev --strategy rolling --batch-size 1 --min-healthy-time 2s --wait --timeout 90s
wait "$loader"
echo "web-1: $(http_get 18081)    web-2: $(http_get 18082)"

say "canary of a broken 1.2.0 (half its requests fail): caught by analysis against the baseline, rolled back"
load 30 >/dev/null &
loader=$!
if ctl deploy create hello@1.2.0 --env dev --strategy canary --steps 50,100 --step-duration 20s --wait --timeout 120s; then
  echo "demo: the broken canary was expected to be rolled back" >&2; exit 1
fi
kill "$loader" 2>/dev/null || true; wait "$loader" 2>/dev/null || true
echo "web-1: $(http_get 18081)    web-2: $(http_get 18082)"
ctl deploy list

say "production needs a second person: the creator cannot approve their own deployment"
ctl users create bob --role approver --out "$work/bob.profile.toml"
bob() { "$bin/hotswapctl" --profile "$work/bob.profile.toml" --endpoint "https://$grpc" "$@"; }
id=$(ctl deploy create greeting-config@1.0.0 --env production --steps 100 --step-duration 3s 2>/dev/null)
ctl deploy get "$id" | head -n 5
ctl deploy approve "$id" --reason "looks good to me" || true
echo "bob is an approver: he may approve, but not deploy"
bob deploy create greeting-config@1.0.0 --env dev || true
bob deploy approve "$id" --reason "CHG-1: config reviewed"
ctl deploy watch "$id" --timeout 60s

say "the audit log: every change and every refusal, hash-chained"
ctl audit list --limit 8
ctl audit verify

say "kill -9 the control plane, start it again: the agents come back by themselves"
kill -KILL "$cp_pid"; wait "$cp_pid" 2>/dev/null || true
echo "the modules keep serving meanwhile: $(http_get 18081)"
start_control_plane "$grpc"
wait_for 30 all_connected
ctl nodes list

say "per-environment view"
ctl clusters list

say "a few control plane metrics (http://$admin/metrics)"
exec 3<>"/dev/tcp/${admin%:*}/${admin##*:}"
printf 'GET /metrics HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$admin" >&3
grep -E '^hotswap_(nodes|deployments|rollbacks_total|analysis_failures_total|events_stored|audit_records)' <&3 | grep -v ' 0$' || true
exec 3>&-

say "the event log (durable, replayable by sequence number): what the deployments did"
ctl events --kind deployment. | tail -n 20

# The live dashboard (SPEC §8) on this fleet: with HOTSWAP_DEMO_UI=1 the
# demo stops here and serves it until Ctrl-C (which also tears down).
ui_command="$bin/hotswapctl --profile $work/cp/admin.profile.toml --endpoint https://$grpc ui"
if [ -n "${HOTSWAP_DEMO_UI:-}" ]; then
  say "the live dashboard on this fleet (Ctrl-C stops it and tears the fleet down)"
  echo "$ui_command"
  ctl ui || true
fi

say "tearing down: modules stopped through the control plane, then SIGTERM to every process"
ctl nodes unset-module web-1 hello >/dev/null
ctl nodes unset-module web-2 hello >/dev/null
no_hello() { ! pgrep -f "$work/agent-web-.*/artifacts/modules/hello" >/dev/null; }
wait_for 30 no_hello

say "the live dashboard"
echo "to browse this fleet in the dashboard, keep it up with:"
echo "  HOTSWAP_DEMO_UI=1 make demo"
echo "which stops before the teardown and runs:"
echo "  hotswapctl --profile DEMO_DIR/cp/admin.profile.toml --endpoint https://GRPC_ADDR ui"
echo "(against your own control plane: hotswapctl --profile ./admin.profile.toml ui)"
