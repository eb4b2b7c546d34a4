#!/usr/bin/env bash
# Run the whole replblk test suite on a fresh Debian/Ubuntu machine.
#
#   bash tools/test.sh
#
# Installs missing system packages (apt-get, as root or via sudo) and
# cargo-fuzz, then runs: rustfmt check, clippy, cargo test, the criterion
# benches in test mode, the fuzz build (if fuzz/build.sh exists) and a short
# benchmark smoke run.  Stops at the first failure with a non-zero exit
# status; on success the last line is "N passed, 0 failed".
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT=$(pwd)
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

REQUIRED_PACKAGES=(fio libnbd-bin nbdkit qemu-utils nbd-server fuse3 e2fsprogs iproute2 strace pacemaker corosync pacemaker-cli-utils resource-agents libxml2-utils crmsh util-linux systemd curl qemu-system-x86 binutils openssl)

PASSED=0
CURRENT_STEP=""
SKIPPED=()
SUITE_START=$SECONDS

on_exit() {
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        echo >&2
        echo "FAILED: step '${CURRENT_STEP:-setup}' (exit status $rc)" >&2
        echo "$PASSED passed, 1 failed" >&2
    fi
    exit "$rc"
}
trap on_exit EXIT

section() {
    CURRENT_STEP="$1"
    STEP_START=$SECONDS
    echo
    echo "=================================================================="
    echo "== [$((PASSED + 1))] $1"
    echo "=================================================================="
}

pass() {
    echo "-- ok: $CURRENT_STEP ($((SECONDS - STEP_START)) s)"
    PASSED=$((PASSED + 1))
    CURRENT_STEP=""
}

# Prefix for commands that need root: "" as root, "sudo" otherwise.
as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "error: '$*' needs root, and sudo is not available; run as root" >&2
        return 1
    fi
}

package_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# ---------------------------------------------------------------------------
section "system packages: ${REQUIRED_PACKAGES[*]}"
if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "error: dpkg-query not found; this script supports Debian/Ubuntu only" >&2
    exit 1
fi
missing_packages() {
    MISSING=()
    for pkg in "${REQUIRED_PACKAGES[@]}"; do
        package_installed "$pkg" || MISSING+=("$pkg")
    done
}
missing_packages
if [[ ${#MISSING[@]} -gt 0 ]]; then
    echo "installing missing packages: ${MISSING[*]}"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${MISSING[@]}"
    # An install can remove a required package it conflicts with: a
    # qemu-utils newer than the archive's qemu-system-x86 goes when that
    # is installed. A second pass puts back the archive's version.
    missing_packages
    if [[ ${#MISSING[@]} -gt 0 ]]; then
        echo "installing packages the first install removed: ${MISSING[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${MISSING[@]}"
        missing_packages
    fi
    if [[ ${#MISSING[@]} -gt 0 ]]; then
        echo "error: packages still not installed: ${MISSING[*]}" >&2
        exit 1
    fi
else
    echo "all required packages are installed"
fi
for tool in fio nbdkit nbdinfo nbdcopy qemu-io qemu-img qemu-storage-daemon qemu-system-x86_64; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "error: $tool not found after installing the packages" >&2
        exit 1
    fi
done
# Kernel modules used by some integration tests; harmless if unavailable
# (e.g. inside containers).
if command -v modprobe >/dev/null 2>&1; then
    for mod in fuse loop; do
        as_root modprobe "$mod" 2>/dev/null || echo "note: could not load kernel module $mod (ignored)"
    done
fi
pass

# ---------------------------------------------------------------------------
section "cargo-fuzz"
if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install Rust with rustup (https://rustup.rs)" >&2
    exit 1
fi
# rust-toolchain.toml pins the version; where rustup knows it only as
# "stable" (no network to fetch toolchains), name the installed one.
pinned=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
if command -v rustup >/dev/null 2>&1 && ! rustup toolchain list | grep -q "^${pinned}"; then
    if [[ "$(rustup run stable rustc --version 2>/dev/null)" == "rustc ${pinned} "* ]]; then
        rustup toolchain link "${pinned}" "$(rustup run stable rustc --print sysroot)"
    fi
fi
if cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz already available: $(cargo fuzz --version)"
else
    cargo install cargo-fuzz --locked
fi
pass

# ---------------------------------------------------------------------------
section "cargo fmt --all -- --check"
cargo fmt --all -- --check
pass

# ---------------------------------------------------------------------------
section "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
pass

# ---------------------------------------------------------------------------
section "cargo test --workspace"
cargo test --workspace
pass

# ---------------------------------------------------------------------------
section "bash tools/pacemaker-test.sh (two-node Pacemaker cluster in network namespaces)"
bash tools/pacemaker-test.sh
pass

# ---------------------------------------------------------------------------
# The kernel's NBD client (this host has no nbd module) in a small VM:
# Debian's stock kernel under qemu TCG, built and cached by tools/vm/build.sh.
section "VM tests: kernel NBD client (cargo test --test vm -- --ignored)"
bash tools/vm/build.sh >/dev/null
# --nocapture: the tests print boot time, I/O pauses and durations.
cargo test --test vm -- --ignored --test-threads=1 --nocapture
pass

# ---------------------------------------------------------------------------
section "cargo bench --bench codec -- --test"
cargo bench --bench codec -- --test
pass

# ---------------------------------------------------------------------------
section "cargo bench --bench metrics -- --test"
cargo bench --bench metrics -- --test
pass

# ---------------------------------------------------------------------------
if [[ -f fuzz/build.sh ]]; then
    section "bash fuzz/build.sh"
    bash fuzz/build.sh
    pass
    section "bash fuzz/run.sh 10 (every fuzz target, 10 s each)"
    bash fuzz/run.sh 10
    pass
else
    echo
    echo "== skipped: fuzz/build.sh (not present)"
    SKIPPED+=("fuzz/build.sh")
fi

# ---------------------------------------------------------------------------
section "python3 tools/bench.py --short --tls"
python3 "$REPO_ROOT/tools/bench.py" --short --tls
pass

# ---------------------------------------------------------------------------
section "python3 tools/longrun.py --cycles 8 (faults under load, ackcheck)"
cargo build --release --bins
python3 "$REPO_ROOT/tools/longrun.py" --cycles 8
pass

# ---------------------------------------------------------------------------
section "python3 tools/powerloss.py --cycles 6 (power cuts emulated with tools/lazyfs.py)"
if ! python3 -c "import mfusepy" 2>/dev/null; then
    python3 -m pip install --quiet mfusepy
fi
python3 "$REPO_ROOT/tools/powerloss.py" --cycles 6
pass

# ---------------------------------------------------------------------------
# Real power cuts: the nodes (or the Secondary) in the small VM, its disk a
# virtual one, qemu SIGKILLed under load. Bounded: 2 cycles of each variant.
section "python3 tools/vm_powerloss.py --cycles 2 (power cuts of the VM, ackcheck)"
timeout 900 python3 "$REPO_ROOT/tools/vm_powerloss.py" --cycles 2
pass

# ---------------------------------------------------------------------------
section "python3 tools/resync_bench.py (smoke: small sizes)"
timeout 900 python3 "$REPO_ROOT/tools/resync_bench.py" --only full,scatter,after \
    --full-sizes 256M --scatter-size 256M --scatter-mib 8 --after-size 64M --runtime 2 --rounds 1
timeout 900 python3 "$REPO_ROOT/tools/resync_bench.py" --only scatter --scatter-written \
    --scatter-size 256M --scatter-mib 8
pass

# ---------------------------------------------------------------------------
echo
echo "=================================================================="
echo "all steps passed in $((SECONDS - SUITE_START)) s${SKIPPED[*]:+ (skipped: ${SKIPPED[*]})}"
echo "$PASSED passed, 0 failed"
