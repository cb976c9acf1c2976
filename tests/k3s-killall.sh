#!/bin/sh
# A stand-in for k3s' k3s-killall.sh, beside the k3s stand-in (tests/k3s-standin, which
# describes it): stops the stand-in processes of its root and logs a `killall` event.
exec python3 "$(dirname "$0")/k3s-standin" killall
