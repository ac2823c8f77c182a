#!/usr/bin/env bash
# Screenshots of TensorBoard as a user sees it, taken by headless Chromium (Debian's `chromium`):
# the time series, the Custom Scalars layout (train and val on one chart) and the HPARAMS table.
#
#   docs/tensorboard_screenshots.sh LOGDIR [OUT_DIR]
#
# LOGDIR is what a user passes to `tensorboard --logdir` (for example `runs/tb`, holding two
# `enigma train` runs); the PNGs go to OUT_DIR (default docs/).
set -euo pipefail
logdir=${1:?usage: $0 LOGDIR [OUT_DIR]}
out=${2:-docs}
port=${PORT:-6123}
bin=$(dirname "$0")/../.venv/bin
mkdir -p "$out"

"$bin/tensorboard" --logdir "$logdir" --host 127.0.0.1 --port "$port" >/tmp/tensorboard-shots.log 2>&1 &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 60); do
    curl -sf "http://127.0.0.1:$port/data/runs" >/dev/null && break
    sleep 1
done

shoot() {  # NAME FRAGMENT [HEIGHT]
    chromium --headless=new --no-sandbox --use-angle=swiftshader --enable-unsafe-swiftshader --hide-scrollbars \
        --window-size=1600,"${3:-1000}" --virtual-time-budget=30000 \
        --screenshot="$out/tensorboard-$1.png" "http://127.0.0.1:$port/?darkMode=false#$2" \
        2>/dev/null
    echo "$out/tensorboard-$1.png"
}
# The Scalars dashboard draws SVG (the Time Series one needs WebGL, blank here); the filter opens
# the train and val sections, which it would otherwise leave collapsed below machine and memory.
shoot time-series "scalars&tagFilter=train%2F%7Cval%2F%7Cperf%2F" 1300
shoot custom-scalars custom_scalars
shoot hparams hparams
