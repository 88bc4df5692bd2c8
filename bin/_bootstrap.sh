# Sourced by bin/meterai and bin/test: creates .venv on first use and reinstalls the project
# whenever pyproject.toml changes, so a fresh clone needs nothing but python3 (>= 3.11).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${METERAI_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

meterai_bootstrap() {
    local extras="$1"
    local stamp="$VENV/.meterai-installed"
    local want
    want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1) $extras"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "meterai: creating virtual environment in $VENV" >&2
        "$PYTHON" -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
        # A dev install also satisfies a plain one; only install what is missing.
        if [ -f "$stamp" ] && [ "$extras" = "" ] && grep -qxF "${want}dev" "$stamp"; then
            return 0
        fi
        echo "meterai: installing the project into $VENV (first use or pyproject.toml changed)" >&2
        # The grep drops pip's notes about local mirror folders that this machine lacks.
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            -e "$ROOT${extras:+[$extras]}" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; } >&2
        echo "$want" > "$stamp"
    fi
}
