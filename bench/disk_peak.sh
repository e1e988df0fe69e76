#!/usr/bin/env bash
# The most disk a command takes over what was in use when it started, on the file system of the
# current folder (df, sampled every 5 s: a shorter peak between two samples is missed). In a clean
# clone, `bench/disk_peak.sh bash .ci/run` measures the README's disk need of `make test`. The
# command's own output and exit code pass through; the figure goes to stderr last.
set -uo pipefail
[ $# -gt 0 ] || { echo "usage: bench/disk_peak.sh COMMAND [ARGS...]" >&2; exit 2; }
used() { df --output=used -B1M . | tail -1 | tr -d ' '; }
start=$(used)
peak=$start
"$@" &
pid=$!
while kill -0 "$pid" 2>/dev/null; do
  now=$(used)
  [ "$now" -gt "$peak" ] && peak=$now
  sleep 5
done
wait "$pid"
rc=$?
echo "disk_peak: $((peak - start)) MB over the $start MB in use at the start (df of $(pwd), every 5 s)" >&2
exit $rc
