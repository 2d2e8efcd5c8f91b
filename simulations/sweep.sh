#!/usr/bin/env bash
# The standard simulation sweep behind docs/simulations.md.
#
#   bash simulations/sweep.sh [OUT] [SIZES...]
#   bash simulations/sweep.sh OUT --series SIZES...
#
# OUT defaults to target/sim-sweep; SIZES default to "100 1000". With
# --series, only `join` runs, for 120 s, at each size: the dissemination
# growth series (about 20 catalog changes per size). Each run
# writes OUT/n<N>-<scenario>/ (summary.json, CSVs, SVG plots, stdout.txt)
# and a line "<N> <scenario> <wall seconds> <peak RSS KiB>" to OUT/costs.txt.
# Two runs go at a time. Every run uses seed 1, so the results are the same
# on every machine; only the wall times and RSS differ.
set -euo pipefail

cd "$(dirname "$0")/.."
out=${1:-target/sim-sweep}
shift || true
series=false
if [ "${1:-}" = --series ]; then
    series=true
    shift
fi
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(100 1000)

cargo build --release -q -p gossamer-sim
bin=$PWD/target/release/gossamer-sim
[ -x /usr/bin/time ] || { echo "sweep.sh needs GNU time (/usr/bin/time, Debian package 'time')" >&2; exit 1; }
mkdir -p "$out"

jobs=()
if $series; then
    for n in "${sizes[@]}"; do
        jobs+=("$n join --duration 120")
    done
fi
for n in "${sizes[@]}"; do
    $series && break
    for s in join crash partition slow churn; do
        jobs+=("$n $s")
    done
    # The full loss sweep (0-20 %) at small sizes; 1 % (the anchor) above.
    if [ "$n" -le 100 ]; then
        jobs+=("$n loss")
    else
        jobs+=("$n loss --loss 0.01")
    fi
done

run() {
    local n=$1 s=$2
    shift 2
    local dir=$out/n$n-$s
    mkdir -p "$dir"
    /usr/bin/time -f "%e %M" -o "$dir/cost.txt" \
        "$bin" "$s" --nodes "$n" --seed 1 --quiet --out "$dir" "$@" >"$dir/stdout.txt" 2>"$dir/stderr.txt"
    echo "$n $s $(cat "$dir/cost.txt")" | tee -a "$out/costs.txt"
}
export -f run
export bin out

: >"$out/costs.txt"
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} bash -c 'run {}'
echo "results in $out"
