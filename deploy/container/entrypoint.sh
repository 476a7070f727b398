#!/bin/bash
# Entrypoint of the hotswap container image; the first argument is the role.
#
#   control-plane   initialise the data directory on first start (CA, server
#                   certificate, admin profile), then run the control plane
#   bootstrap       create one join token per environment with the admin
#                   profile and leave them in the shared directory; exits
#   agent           enroll on first start with $HOTSWAP_JOIN_TOKEN, or with
#                   the bootstrap token of $HOTSWAP_ENVIRONMENT (later starts
#                   reuse the certificate), then run
#   ready HOST PORT exit 0 when http://HOST:PORT/readyz answers 200
#                   (a health check that needs no curl in the image)
#   anything else   run as a command, e.g. `hotswapctl nodes list` or `bash`
#
# Every step is idempotent: restarting a container, or the whole compose
# project, never re-initialises the control plane or creates a second token
# for an environment. Paths and addresses come from the environment (defaults
# are the image's), so the script runs outside a container as well.
set -euo pipefail

say() { printf 'hotswap-entrypoint: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# The control plane's URL as agents and operators reach it. Its host name is
# added to the server certificate at init.
: "${HOTSWAP_CONTROL_PLANE:=https://control-plane:7443}"
# Where the bootstrap role leaves join tokens for the agents.
: "${HOTSWAP_SHARED_DIR:=/var/lib/hotswap-shared}"
# How long to wait for the control plane or a token before giving up.
: "${HOTSWAP_WAIT_SECONDS:=120}"

# Value of a "key": "value" field in the JSON file that `hotswapctl -o json
# tokens create` writes (one field per line; tokens and fingerprints need no
# escaping).
json_field() { sed -n "s/^ *\"$2\": *\"\([^\"]*\)\".*/\1/p" "$1" | head -n 1; }

# Succeed when http://$1:$2/readyz answers 200.
http_ready() {
  local host=$1 port=$2 status=""
  # (Braces: a refused connection is the expected answer while starting,
  # and bash reports it on stderr unless the redirection itself is silenced.)
  { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null || return 1
  printf 'GET /readyz HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$host" >&3 || true
  IFS= read -r -t 5 status <&3 || true
  exec 3<&- 3>&-
  [[ $status == "HTTP/"*" 200"* ]]
}

control_plane() {
  local data_dir=${HOTSWAP_DATA_DIR:-/var/lib/hotswap}
  # The admin profile is written last by init: its presence means the data
  # directory is complete. A directory with files but no profile is refused
  # by init itself (it never overwrites), which is what we want: look first.
  # Replicas on etcd (compose-ha.yaml): the first replica initialises and
  # leaves a copy of its data directory (the PKI) in $HOTSWAP_PKI_SHARE; the
  # others start from that copy, as `cp -r` does outside containers.
  if [[ ! -e $data_dir/admin.profile.toml && -n ${HOTSWAP_PKI_FROM:-} ]]; then
    local deadline=$((SECONDS + HOTSWAP_WAIT_SECONDS))
    until [[ -e $HOTSWAP_PKI_FROM/admin.profile.toml ]]; do
      ((SECONDS < deadline)) || die "no data directory to copy in $HOTSWAP_PKI_FROM"
      sleep 1
    done
    say "copying the cluster's data directory from $HOTSWAP_PKI_FROM"
    mkdir -p "$data_dir"
    cp -a "$HOTSWAP_PKI_FROM/." "$data_dir/"
    rm -rf "$data_dir/run"
  fi
  if [[ ! -e $data_dir/admin.profile.toml ]]; then
    say "initialising the control plane in $data_dir"
    # Extra names for the server certificate, e.g. "cp.example.com *.example.com"
    # (read into an array: no glob expansion of the wildcards).
    local names=() name sans=()
    read -r -a names <<<"${HOTSWAP_SANS:-}"
    for name in "${names[@]}"; do sans+=(--san "$name"); done
    # Extra init flags, e.g. "--blobs s3://hotswap --s3-endpoint http://s3:8333"
    # (with HOTSWAP_ETCD_ENDPOINTS set, init claims the etcd prefix).
    local init_args=()
    read -r -a init_args <<<"${HOTSWAP_INIT_ARGS:-}"
    hotswap-control-plane init --data-dir "$data_dir" \
      --endpoint "$HOTSWAP_CONTROL_PLANE" "${sans[@]}" "${init_args[@]}"
    if [[ -n ${HOTSWAP_PKI_SHARE:-} ]]; then
      mkdir -p "$HOTSWAP_PKI_SHARE"
      cp -a "$data_dir/." "$HOTSWAP_PKI_SHARE/"
    fi
  fi
  local run_args=()
  read -r -a run_args <<<"${HOTSWAP_RUN_ARGS:-}"
  local config=()
  if [[ -n ${HOTSWAP_CONFIG:-} ]]; then config=(--config "$HOTSWAP_CONFIG"); fi
  exec hotswap-control-plane run --data-dir "$data_dir" \
    --listen "${HOTSWAP_LISTEN:-0.0.0.0:7443}" \
    --admin-listen "${HOTSWAP_ADMIN_LISTEN:-0.0.0.0:9443}" \
    "${config[@]}" "${run_args[@]}" "$@"
}

bootstrap() {
  # HOTSWAP_PROFILE (read by hotswapctl) names the admin profile.
  [[ -n ${HOTSWAP_PROFILE:-} ]] || die "HOTSWAP_PROFILE must name the admin profile"
  mkdir -p "$HOTSWAP_SHARED_DIR"
  local specs=() spec environment uses file deadline
  # Environment and number of nodes it may enroll, e.g. "dev:2 production:1".
  read -r -a specs <<<"${HOTSWAP_TOKENS:-dev:2 production:1}"
  for spec in "${specs[@]}"; do
    environment=${spec%%:*}
    uses=${spec#*:}
    [[ $spec == *:* && -n $environment && $uses =~ ^[0-9]+$ ]] ||
      die "HOTSWAP_TOKENS: ${spec@Q} is not ENVIRONMENT:USES"
    file=$HOTSWAP_SHARED_DIR/join-$environment.json
    if [[ -s $file ]]; then
      say "a join token for $environment exists already ($file)"
      continue
    fi
    # The control plane may still be starting: retry until the deadline.
    deadline=$((SECONDS + HOTSWAP_WAIT_SECONDS))
    until hotswapctl -o json tokens create --ttl "${HOTSWAP_TOKEN_TTL:-24h}" \
      --uses "$uses" --label "environment=$environment" >"$file.tmp"; do
      ((SECONDS < deadline)) || die "no join token for $environment: the control plane did not answer"
      sleep 2
    done
    # Written whole, then renamed: an agent never reads half a token.
    chmod 0600 "$file.tmp"
    mv "$file.tmp" "$file"
    say "join token for $environment ($uses uses) in $file"
  done
}

agent() {
  local data_dir=${HOTSWAP_DATA_DIR:-/var/lib/hotswap-agent}
  # identity/node.json is the agent's own commit point of enrollment. A token
  # given directly (HOTSWAP_JOIN_TOKEN and HOTSWAP_CA_FINGERPRINT, read by the
  # agent itself) wins over the shared directory.
  if [[ ! -e $data_dir/identity/node.json && -z ${HOTSWAP_JOIN_TOKEN:-} ]]; then
    [[ -n ${HOTSWAP_ENVIRONMENT:-} ]] ||
      die "not enrolled: set HOTSWAP_ENVIRONMENT (token from the bootstrap role) or HOTSWAP_JOIN_TOKEN"
    local file=$HOTSWAP_SHARED_DIR/join-$HOTSWAP_ENVIRONMENT.json
    local deadline=$((SECONDS + HOTSWAP_WAIT_SECONDS))
    until [[ -s $file ]]; do
      ((SECONDS < deadline)) || die "no join token in $file (is the bootstrap service done?)"
      sleep 1
    done
    HOTSWAP_JOIN_TOKEN=$(json_field "$file" token)
    HOTSWAP_CA_FINGERPRINT=$(json_field "$file" ca_fingerprint)
    [[ -n $HOTSWAP_JOIN_TOKEN && -n $HOTSWAP_CA_FINGERPRINT ]] || die "$file holds no token"
    # Through the environment, not flags: the token stays out of `ps`.
    export HOTSWAP_JOIN_TOKEN HOTSWAP_CA_FINGERPRINT
    say "enrolling in $HOTSWAP_ENVIRONMENT"
  fi
  local name=() extra=()
  if [[ -n ${HOTSWAP_NODE_NAME:-} ]]; then name=(--name "$HOTSWAP_NODE_NAME"); fi
  # HOTSWAP_AGENT_ARGS: more flags, split on spaces (--label k=v ...).
  read -r -a extra <<<"${HOTSWAP_AGENT_ARGS:-}"
  exec hotswap-agent run --data-dir "$data_dir" \
    --control-plane "$HOTSWAP_CONTROL_PLANE" \
    --admin-listen "${HOTSWAP_ADMIN_LISTEN:-127.0.0.1:9444}" \
    "${name[@]}" "${extra[@]}" "$@"
}

role=${1:-control-plane}
if (($# > 0)); then shift; fi
case $role in
  control-plane) control_plane "$@" ;;
  bootstrap) bootstrap ;;
  agent) agent "$@" ;;
  ready) http_ready "${1:-127.0.0.1}" "${2:-9443}" ;;
  *) exec "$role" "$@" ;;
esac
