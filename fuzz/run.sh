#!/usr/bin/env bash
# Runs fuzz targets for a bounded time.
#
#   fuzz/run.sh [SECONDS]                  every target, SECONDS each (default
#                                          10: the smoke run tools/test.sh does);
#                                          the first crash stops the run.
#   fuzz/run.sh --long SECONDS [TARGET...] the long campaign: every target (or
#                                          those named) in turn, SECONDS each, at
#                                          `nice -n 19`; a crash is recorded and
#                                          the campaign goes on to the next
#                                          target. A table of execs, coverage and
#                                          findings per target is printed and
#                                          written to corpus/campaign-DATE.txt.
#
# Corpora grow under fuzz/corpus/TARGET (not committed). Inputs kept as
# regression tests live under fuzz/regressions/TARGET (committed): every run
# replays them first, so a finding that comes back fails the smoke run.
# libFuzzer leaves a crashing input under fuzz/artifacts/TARGET.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

long=0
if [[ "${1:-}" == "--long" ]]; then
    long=1
    shift
    [[ $# -ge 1 ]] || { echo "usage: $0 --long SECONDS [TARGET...]" >&2; exit 2; }
fi
SECONDS_EACH="${1:-10}"
[[ "$SECONDS_EACH" =~ ^[0-9]+$ ]] || { echo "SECONDS must be a number, got '$SECONDS_EACH'" >&2; exit 2; }
shift || true
if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(RUSTC_BOOTSTRAP=1 cargo fuzz list)
fi

mkdir -p corpus
summary="corpus/campaign-$(date -u +%Y%m%dT%H%M%SZ).txt"
if [[ $long -eq 1 ]]; then
    printf '%-20s %8s %12s %10s %8s %8s %8s %s\n' target seconds execs execs/s cov ft corpus findings | tee "$summary"
fi
failed=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    seeds=()
    [[ -d "regressions/$target" ]] && seeds=("regressions/$target")
    log="corpus/$target.log"
    status=0
    if [[ $long -eq 1 ]]; then
        # Build first (not niced twice, not counted in the fuzzing time).
        RUSTC_BOOTSTRAP=1 nice -n 19 cargo fuzz build -O "$target" >/dev/null 2>&1
        start=$(date +%s)
        RUSTC_BOOTSTRAP=1 nice -n 19 cargo fuzz run -O "$target" "corpus/$target" "${seeds[@]}" -- \
            -max_total_time="$SECONDS_EACH" -print_final_stats=1 -rss_limit_mb=2048 \
            >"$log" 2>&1 || status=$?
        took=$(( $(date +%s) - start ))
        execs=$(awk '/^stat::number_of_executed_units:/ {v=$2} END {print v}' "$log")
        rate=$(awk '/^stat::average_exec_per_sec:/ {v=$2} END {print v}' "$log")
        # The last status line libFuzzer printed (DONE, or the one before a crash).
        last=$(awk '/^#[0-9]+.* cov: / {l=$0} END {print l}' "$log")
        cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
        ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
        corp=$(sed -nE 's/.* corp: ([0-9]+).*/\1/p' <<<"$last")
        finding="none"
        if [[ $status -ne 0 ]]; then
            finding="exit $status: $(grep -m1 -E 'panicked|ERROR: ' "$log" | cut -c1-120 || true)"
            failed+=("$target")
        fi
        printf '%-20s %8s %12s %10s %8s %8s %8s %s\n' "$target" "$took" "${execs:-?}" "${rate:-?}" \
            "${cov:-?}" "${ft:-?}" "${corp:-?}" "$finding" | tee -a "$summary"
        continue
    fi
    echo "== fuzzing $target for ${SECONDS_EACH}s"
    RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$target" "corpus/$target" "${seeds[@]}" -- \
        -max_total_time="$SECONDS_EACH" -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb)|ERROR|SUMMARY|panicked" "$log" || true
    if [[ $status -ne 0 ]]; then
        tail -40 "$log" >&2
        echo "fuzz target $target failed (exit $status)" >&2
        exit 1
    fi
done
if [[ $long -eq 1 ]]; then
    echo "summary: $summary"
    if [[ ${#failed[@]} -gt 0 ]]; then
        echo "targets with findings: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
        exit 1
    fi
fi
