#!/bin/sh
# CI smoke run of the fuzz targets: each one replays its kept corpus
# (fuzz/corpus/<target>/) and then fuzzes for a few seconds. Exits non-zero
# on the first crash, leak, timeout or build failure; the crashing input
# lands in fuzz/artifacts/<target>/.
#
# Needs a stable toolchain (RUSTC_BOOTSTRAP=1 unlocks -Zsanitizer) and a
# C++ compiler for libFuzzer. Installs cargo-fuzz when missing (about a
# minute). FUZZ_SECONDS (default 5) sets the time per target; FUZZ_SANITIZER
# (default address) may be set to none where ASan is unavailable.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
secs=${FUZZ_SECONDS:-5}
san=${FUZZ_SANITIZER:-address}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

targets=$(cargo fuzz list)
cargo fuzz build -s "$san"
for t in $targets; do
    echo "=== $t: corpus + ${secs}s"
    # A scratch copy: CI must not grow the kept corpus.
    scratch=$(mktemp -d)
    cp -r "corpus/$t/." "$scratch/" 2>/dev/null || true
    if ! cargo fuzz run -s "$san" "$t" "$scratch" -- \
        -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 2>"$scratch.log"; then
        tail -n 60 "$scratch.log"
        rm -rf "$scratch" "$scratch.log"
        echo "FAIL: fuzz target $t crashed; reproducer in fuzz/artifacts/$t/" >&2
        exit 1
    fi
    grep -E '^stat::number_of_executed_units|^Done' "$scratch.log" || true
    rm -rf "$scratch" "$scratch.log"
done
echo "all fuzz targets ok"
