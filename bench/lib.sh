# Sourced by the scripts in bench/: a node on loopback ephemeral ports,
# started, awaited and stopped by its PID.
#
#   start_node OUT COMMAND...
#       Runs COMMAND (`BIN serve` and its arguments, after whatever runs
#       it: `env NAME=value`, `valgrind ...`) with `--http 127.0.0.1:0
#       --grpc 127.0.0.1:0` added, its standard output in OUT.out and its
#       log in OUT.log; waits until it listens (a minute at most, and no
#       longer than it lives: its log is shown if it exits first); sets
#       node_pid, grpc (host:port) and http (http://host:port).
#   stop_node [SIGNAL]
#       Sends SIGNAL (TERM by default) to the node and waits until it has
#       exited; nothing if none runs.
#   tenant_of REPORT
#       Prints the tenant of a `bazaar loadgen` JSON report (the one its
#       --setup made).
#   ingested
#       Prints the node's bazaar_events_ingested_total, summed over tenants.
#   threads PID
#       Prints each thread of process PID as JSON, by thread id: [name
#       (a trailing number dropped), CPU ticks (user + system), voluntary
#       and involuntary context switches].
#
# A script's EXIT trap calls stop_node, so that no node outlives it.

node_pid=""
grpc=""
http=""

start_node() {
    local out=$1
    shift
    "$@" --http 127.0.0.1:0 --grpc 127.0.0.1:0 > "$out.out" 2> "$out.log" &
    node_pid=$!
    local _
    for _ in $(seq 1200); do
        grep -q "bazaar listening on" "$out.out" 2>/dev/null && break
        if ! kill -0 "$node_pid" 2>/dev/null; then
            node_pid=""
            cat "$out.log" >&2
            echo "$(basename "$0"): the node exited before it listened" >&2
            exit 1
        fi
        sleep 0.05
    done
    grpc=$(sed -n 's/^bazaar gRPC listening on //p' "$out.out")
    http=$(sed -n 's/^bazaar listening on \(http:[^ ]*\).*/\1/p' "$out.out")
    if [ -z "$grpc" ] || [ -z "$http" ]; then
        cat "$out.log" >&2
        echo "$(basename "$0"): the node did not listen within a minute" >&2
        exit 1
    fi
}

stop_node() {
    [ -n "$node_pid" ] || return 0
    kill "-${1:-TERM}" "$node_pid" 2>/dev/null || true
    wait "$node_pid" 2>/dev/null || true
    node_pid=""
}

tenant_of() {
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["tenant"])' "$1"
}

ingested() {
    curl -s "$http/metrics" | awk '/^bazaar_events_ingested_total/ {sum += $2} END {print sum + 0}'
}

threads() {
    python3 - "$1" <<'PY'
import json, os, sys
pid = sys.argv[1]
out = {}
for tid in os.listdir(f"/proc/{pid}/task"):
    try:
        stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        status = open(f"/proc/{pid}/task/{tid}/status").read().splitlines()
    except FileNotFoundError:
        continue
    name = stat[stat.index("(") + 1 : stat.rindex(")")].rstrip("0123456789-#")
    fields = stat[stat.rindex(")") + 2 :].split()
    switches = {line.split(":")[0]: int(line.split()[1]) for line in status if "ctxt_switches" in line}
    out[tid] = [name, int(fields[11]) + int(fields[12]), switches["voluntary_ctxt_switches"],
                switches["nonvoluntary_ctxt_switches"]]
print(json.dumps(out))
PY
}
