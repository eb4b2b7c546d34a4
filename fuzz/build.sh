#!/usr/bin/env bash
# Builds every fuzz target (release, with AddressSanitizer and coverage
# instrumentation). cargo-fuzz passes `-Zsanitizer=address`, which needs a
# nightly compiler; only the pinned stable toolchain is available, so
# RUSTC_BOOTSTRAP=1 unlocks the unstable flag on it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
RUSTC_BOOTSTRAP=1 cargo fuzz build -O "$@"
