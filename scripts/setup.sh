#!/usr/bin/env bash
# Creates .venv (Python 3.11 + pip) and installs tutorial_moe with the extras named in $1
# ("book" or "test"). A stamp keyed on the dependency files makes a satisfied install a no-op.
# Also puts the ipywidgets HTML manager into .venv/share/tutorial_moe/widgets (npm, optional),
# so the built pages render widgets with no network (scripts/book_extension.py serves it).
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
# [test] includes every [book] dependency, so a satisfied [test] also satisfies [book].
for satisfied in "$stamp" .venv/.tutorial_moe-test.stamp; do
  if [[ -f "$satisfied" && "$(cat "$satisfied")" == "$want" ]]; then
    echo "setup: .venv already satisfies [$extra]"
    exit 0
  fi
done
echo "setup: installing tutorial_moe[$extra] into .venv (first time: several minutes, torch is large)"
# The local mirrors print one harmless 'is ignored' warning per package: keep the log readable.
.venv/bin/python -m pip install --disable-pip-version-check -q -e ".[$extra]" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import tutorial_moe, torch; print('setup: torch', torch.__version__)"
if [[ "$extra" == "test" ]]; then
  # The torchtitan peer test (tests/test_torchtitan_peer.py) needs torchtitan's MoE module,
  # which imports only torch, tyro and spmd_types ([test] lists those two). The wheel's other
  # requirements (datasets, pyarrow, tensorboard, wandb, torchdata, ...) serve its trainer, so
  # it goes in without them; `pip install -e '.[peer]'` installs the full torchtitan instead.
  .venv/bin/python -m pip install --disable-pip-version-check -q --no-deps "torchtitan==0.3.0" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  .venv/bin/python -c "import tutorial_moe.peers as p; p.import_torchtitan(); print('setup: torchtitan', p.TORCHTITAN_VERSION)"
fi

# The widget manager that renders saved ipywidgets in static pages ships only on npm
# (@jupyter-widgets/html-manager, BSD-3; RequireJS, MIT). Without npm the pages load it from a
# CDN instead, and widgets need a network; nothing else depends on it.
widgets=.venv/share/tutorial_moe/widgets
if [[ ! -f "$widgets/embed-amd.js" ]]; then
  if command -v npm >/dev/null; then
    tmp=$(mktemp -d)
    if (cd "$tmp" && timeout 180 npm pack --silent --fetch-retries=1 \
          @jupyter-widgets/html-manager@1.0.15 requirejs@2.3.8 >/dev/null 2>&1); then
      mkdir -p "$widgets" "$tmp/hm" "$tmp/rq"
      tar xzf "$tmp"/jupyter-widgets-html-manager-1.0.15.tgz -C "$tmp/hm"
      tar xzf "$tmp"/requirejs-2.3.8.tgz -C "$tmp/rq"
      # embed-amd.js and the icon fonts its stylesheet asks for (browsers take woff2 or woff).
      cp "$tmp"/hm/package/dist/embed-amd.js "$tmp"/hm/package/dist/*.woff2 \
         "$tmp"/hm/package/dist/*.woff "$widgets"/
      cp "$tmp"/hm/package/package.json "$widgets"/html-manager.package.json
      cp "$tmp"/rq/package/require.js "$widgets"/require.js
      echo "setup: ipywidgets HTML manager in $widgets ($(du -sh "$widgets" | cut -f1))"
    else
      echo "setup: npm could not fetch @jupyter-widgets/html-manager; widget pages will use a CDN"
    fi
    rm -rf "$tmp"
  else
    echo "setup: no npm: widget pages will load the ipywidgets HTML manager from a CDN"
  fi
fi
echo "$want" > "$stamp"
