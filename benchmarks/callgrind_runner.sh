#!/bin/bash
# Instructions the runner process executes per call under real load, without the noise:
# the runner runs under callgrind, `a6-runner bench` drives it over its socket with N1
# and then N2 calls, and the difference of the two totals is divided by N2 - N1 (so
# start-up and shutdown cancel out). User space only: the kernel's share is not counted.
#
#   benchmarks/callgrind_runner.sh '[{"name": "request-info", "value": "{}"}]'
#   RUNNER_PATH=/tmp/orig benchmarks/callgrind_runner.sh '[{"name": "say", "value": "{}"}]'
#
# RUNNER_PATH runs another version of the runner (unpacked with git archive), as
# benchmarks/suite.py --runner-path does; RUNNER_ARGS adds options to the runner's
# command line (benchmarks/metrics.py: RUNNER_ARGS="--metrics-listen 127.0.0.1:0").
# FLOOR=1 measures benchmarks/floor_server.py instead, driven the same way: the user-space
# share of the transport floor, to set the runner's count beside (the kernel's share,
# the same for both, is in neither).
# Needs valgrind (Debian package valgrind).
set -euo pipefail
conf=${1:-'[{"name": "say", "value": "{}"}]'}
n1=${N1:-1000}
n2=${N2:-5000}
repo=$(cd "$(dirname "$0")/.." && pwd)
python=$repo/.venv/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

total() {  # total() CALLS -> instructions of a runner that served CALLS calls
    local sock=$work/runner.sock log=$work/callgrind.log
    rm -f "$sock"
    (
        if [ -n "${RUNNER_PATH:-}" ]; then cd "$RUNNER_PATH"; export PYTHONPATH=$RUNNER_PATH; fi
        if [ -n "${FLOOR:-}" ]; then
            server=("$repo/benchmarks/floor_server.py" "$sock")
        else
            server=(-m runner run --listen "$sock" --log-level warning ${RUNNER_ARGS:-})
        fi
        PYTHONHASHSEED=0 exec valgrind --tool=callgrind --callgrind-out-file=/dev/null \
            "$python" -P "${server[@]}"
    ) 2>"$log" &
    local pid=$!
    for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.5; done
    # -d 3600: under valgrind the calls take far longer than the bench's default 10 s.
    # (The floor's canned reply carries call id 0 whatever the request's.)
    "$python" -m runner bench --socket "$sock" -c 16 -n "$1" -d 3600 --warmup 0 --no-progress \
        ${FLOOR:+--no-check-id} \
        --call-timeout 600 --conf "$conf" >/dev/null
    kill -INT "$pid"
    wait "$pid" || true
    grep -o "Collected : [0-9]*" "$log" | awk '{print $3}'
}

a=$(total "$n1")
b=$(total "$n2")
echo "$(( (b - a) / (n2 - n1) )) instructions per call (${FLOOR:+the floor, driven with }$conf)"
