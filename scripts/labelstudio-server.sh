#!/usr/bin/env bash
# Install a local Label Studio server for the integration tests, in its own venv so that its pins
# never touch the project's environment, and build a template database once.
#
#   scripts/labelstudio-server.sh install   # idempotent; ~1-2 min the first time
#   scripts/labelstudio-server.sh path      # print the install folder
#
# The test fixture (tests/integrations/labelstudio_server.py) copies the template per test session
# and starts `label-studio start` on 127.0.0.1 on a free port.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
LS_HOME="${FREESHAP_DQ_LABEL_STUDIO_HOME:-$ROOT/.labelstudio}"
LS_VERSION="${FREESHAP_DQ_LABEL_STUDIO_VERSION:-1.23.2}"
PYTHON="${PYTHON:-python3}"
STAMP="$LS_HOME/installed-$LS_VERSION"

ls_env() {
    local data_dir="$1"
    export LABEL_STUDIO_BASE_DATA_DIR="$data_dir"
    export XDG_CONFIG_HOME="$data_dir/config"
    export LABEL_STUDIO_USERNAME="test@example.com"
    export LABEL_STUDIO_PASSWORD="freeshap-dq-test-only"
    export LABEL_STUDIO_USER_TOKEN="$(cat "$LS_HOME/token")"
    export LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true
    export LABEL_STUDIO_LATEST_VERSION_CHECK=false
    export LABEL_STUDIO_SENTRY_DSN=""
    export LABEL_STUDIO_FRONTEND_SENTRY_DSN=""
    export LABEL_STUDIO_COLLECT_ANALYTICS=false
}

install() {
    if [[ -f "$STAMP" ]]; then
        echo "Label Studio $LS_VERSION already installed in $LS_HOME"
        return
    fi
    rm -rf "$LS_HOME"
    mkdir -p "$LS_HOME"
    echo "Installing Label Studio $LS_VERSION into $LS_HOME/venv (own venv) ..." >&2
    "$PYTHON" -m venv "$LS_HOME/venv"
    {
        "$LS_HOME/venv/bin/python" -m pip install --quiet --upgrade pip &&
        "$LS_HOME/venv/bin/python" -m pip install --quiet "label-studio==$LS_VERSION"
    } > "$LS_HOME/pip.log" 2>&1 || { tail -40 "$LS_HOME/pip.log" >&2; exit 1; }
    # A test-only token for a server that only ever listens on 127.0.0.1.
    "$PYTHON" -c "import secrets; print(secrets.token_hex(20))" > "$LS_HOME/token"
    chmod 600 "$LS_HOME/token"
    echo "Building the template database (label-studio init) ..." >&2
    mkdir -p "$LS_HOME/template"
    (
        ls_env "$LS_HOME/template"
        cd "$LS_HOME"
        "$LS_HOME/venv/bin/label-studio" init --quiet > "$LS_HOME/init.log" 2>&1 \
            || { cat "$LS_HOME/init.log" >&2; exit 1; }
    )
    touch "$STAMP"
    echo "Label Studio $LS_VERSION ready in $LS_HOME" >&2
}

case "${1:-}" in
    install) install ;;
    path) echo "$LS_HOME" ;;
    *) echo "usage: $0 install|path" >&2; exit 2 ;;
esac
