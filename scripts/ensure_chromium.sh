#!/usr/bin/env bash
# Debian's chromium for the browser tests (tests/e2e/test_browser.py drives it with
# Playwright; Playwright's own browser downloads are never used). Idempotent: nothing to do
# when /usr/bin/chromium is there. Installing needs root and apt-get; without them the
# browser tests skip, saying why.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "warning: /usr/bin/chromium is missing and cannot be installed here (needs root and apt-get); the browser tests will skip." >&2
  exit 0
fi
echo "Installing Debian's chromium for the browser tests..."
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
/usr/bin/chromium --version
