#!/usr/bin/env bash
# Screenshot an evaluation report in headless Chromium, to look at it as a reader would.
#   scripts/screenshot_report.sh REPORT_DIR/report.html [OUT.png] [WIDTHxHEIGHT]
# Needs chromium (Debian: apt-get install -y chromium). Not run by CI.
set -euo pipefail
report=$(realpath "${1:?usage: $0 report.html [out.png] [1280x3000]}")
out=${2:-/tmp/report.png}
size=${3:-1280x3000}
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --window-size="${size/x/,}" --screenshot="$out" "file://$report" 2>/dev/null
echo "$out"
