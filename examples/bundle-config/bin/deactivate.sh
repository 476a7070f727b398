#!/bin/sh
# Deactivate hook of the greeting-config bundle: records that this version
# stopped being the active one in the module's activations.log (next to
# the version dirs, see activate.sh).
set -eu

for var in HOTSWAP_MODULE HOTSWAP_VERSION HOTSWAP_MODULE_DIR; do
    eval "value=\${$var:-}"
    if [ -z "$value" ]; then
        echo "deactivate: $var is not set; this hook expects to be run by hotswap-agent" >&2
        exit 1
    fi
done

printf 'deactivated %s %s\n' "$HOTSWAP_MODULE" "$HOTSWAP_VERSION" \
    >>"$HOTSWAP_MODULE_DIR/../activations.log"
