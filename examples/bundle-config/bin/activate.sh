#!/bin/sh
# Activate hook of the greeting-config bundle: validates this version's
# config, then records the activation in the module's activations.log.
#
# The agent runs it with cwd = this version's module dir (also in
# HOTSWAP_MODULE_DIR); the parent of that dir holds every version, so the
# log there survives swaps. A non-zero exit makes the agent flip back to
# the previous version.
set -eu

fail() {
    echo "activate: $*" >&2
    exit 1
}

for var in HOTSWAP_MODULE HOTSWAP_VERSION HOTSWAP_NODE HOTSWAP_MODULE_DIR; do
    eval "value=\${$var:-}"
    [ -n "$value" ] || fail "$var is not set; this hook expects to be run by hotswap-agent"
done
dir=$HOTSWAP_MODULE_DIR
conf="$dir/config/greeting.conf"

# Test hook: a FAIL_ACTIVATE file makes activation fail, to exercise the
# agent's flip back.
if [ -e "$dir/FAIL_ACTIVATE" ]; then
    fail "refusing to activate $HOTSWAP_MODULE $HOTSWAP_VERSION: FAIL_ACTIVATE exists in $dir"
fi
[ -f "$conf" ] || fail "invalid config: $conf is missing"
grep -Eq '^[[:space:]]*greeting[[:space:]]*=' "$conf" ||
    fail "invalid config: $conf has no 'greeting =' line"

printf 'activated %s %s (previous: %s) on %s\n' \
    "$HOTSWAP_MODULE" "$HOTSWAP_VERSION" "${HOTSWAP_PREVIOUS_VERSION:-none}" "$HOTSWAP_NODE" \
    >>"$dir/../activations.log"
