#!/usr/bin/env bash
# Runs one step of `make test` and prints its wall time, so a slow CI run says where the time went.
# Usage: timed.sh STEP-NAME COMMAND [ARGS...]; exits with the command's status.
set -u
step=$1
shift
start=$SECONDS
"$@"
status=$?
echo "[make test] $step: $((SECONDS - start)) s (exit $status)"
exit "$status"
