#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 10 s each; the first
# argument overrides it, e.g. `fuzz/run.sh 3600` for an hour per target).
# Corpora grow under fuzz/corpus/TARGET (not committed); a crash stops the
# run with the target's name, and libFuzzer leaves the input under
# fuzz/artifacts/TARGET for a regression test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
SECONDS_EACH="${1:-10}"
for target in $(RUSTC_BOOTSTRAP=1 cargo fuzz list); do
    echo "== fuzzing $target for ${SECONDS_EACH}s"
    mkdir -p "corpus/$target"
    log="corpus/$target.log"
    status=0
    RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$target" "corpus/$target" -- \
        -max_total_time="$SECONDS_EACH" -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb)|ERROR|SUMMARY|panicked" "$log" || true
    if [[ $status -ne 0 ]]; then
        tail -40 "$log" >&2
        echo "fuzz target $target failed (exit $status)" >&2
        exit 1
    fi
done
