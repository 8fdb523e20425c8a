#!/usr/bin/env bash
# Creates .venv (Python 3.11 + pip) and installs tutorial_moe with the extras named in $1
# ("book" or "test"). A stamp keyed on the dependency files makes a satisfied install a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-test}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
stamp=".venv/.tutorial_moe-$extra.stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup: .venv already satisfies [$extra]"
  exit 0
fi
echo "setup: installing tutorial_moe[$extra] into .venv (first time: several minutes, torch is large)"
# The local mirrors print one harmless 'is ignored' warning per package: keep the log readable.
.venv/bin/python -m pip install --disable-pip-version-check -q -e ".[$extra]" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import tutorial_moe, torch; print('setup: torch', torch.__version__)"
echo "$want" > "$stamp"
