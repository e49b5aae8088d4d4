#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time, starting from the corpus kept in the
# repository (fuzz/corpus/<target>). New inputs found go to a scratch copy, so a run never
# edits the repository; pass --save to keep them (then minimise with `cargo fuzz cmin`).
#
#   fuzz/run.sh                 # 30 s per target (what CI runs)
#   FUZZ_SECS=600 fuzz/run.sh   # longer
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
set -euo pipefail
cd "$(dirname "$0")"
secs="${FUZZ_SECS:-30}"
save=0
[ "${1:-}" = "--save" ] && save=1
targets=$(cargo +nightly fuzz list)
cargo +nightly fuzz build -O
for t in $targets; do
  seeds="corpus/$t"
  mkdir -p "$seeds"
  if [ "$save" = 1 ]; then
    work="$seeds"
  else
    work=$(mktemp -d)
    cp -r "$seeds/." "$work/"
  fi
  echo "fuzz: $t for ${secs}s from $(ls "$seeds" | wc -l) seeds"
  log=$(mktemp)
  if ! cargo +nightly fuzz run -O "$t" "$work" -- -max_total_time="$secs" -rss_limit_mb=2048 \
    -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    echo "fuzz: $t failed:" >&2
    tail -n 60 "$log" >&2
    exit 1
  fi
  grep -E "^stat::(number_of_executed_units|new_units_added)" "$log" | tr '\n' ' '
  echo
  rm -f "$log"
  [ "$save" = 1 ] || rm -rf "$work"
done
echo "fuzz: all targets ran ${secs}s with no crash"
