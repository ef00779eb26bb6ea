# shellcheck shell=bash
# Shared by bench/chaos/run and bench/soak/run: the tools, the squall binary, `squall up` and
# `squall forkd` started and stopped, load from hey counted per request, the admin listener
# read, and the check for what a run left behind. Source it after setting $scratch (a fresh
# directory under /tmp, short enough for the Unix sockets forkd makes in it) and the array
# `pids` (every process started is added to it; the caller's EXIT trap stops them).
#
# Every process of a run starts from a copy of the squall binary at $scratch/bin/squall, so
# "a process whose command line mentions $scratch" finds the run's squall up, forkd daemons,
# templates and clones (QEMU too: its files are in $scratch), and nobody else's.

# Installs what is missing (as root, from Debian's packages); otherwise says what is missing.
need_tools() { # need_tools COMMAND:PACKAGE...
    local want=() entry
    for entry in "$@"; do
        command -v "${entry%%:*}" >/dev/null 2>&1 || want+=("${entry#*:}")
    done
    [ ${#want[@]} -eq 0 ] && return
    if [ "$(id -u)" -ne 0 ]; then
        echo "$bench_name: missing ${want[*]} (install them, or run as root)" >&2
        exit 1
    fi
    apt-get install -y -qq "${want[@]}" >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null && apt-get install -y -qq "${want[@]}" >/dev/null
    }
}

# The squall binary, copied into the scratch directory: $SQUALL_BIN, or a release build.
squall_binary() {
    local built="${SQUALL_BIN:-}"
    if [ -z "$built" ]; then
        cargo build --release --quiet -p squall --bin squall
        built="${CARGO_TARGET_DIR:-target}/release/squall"
    fi
    mkdir -p "$scratch/bin"
    cp "$built" "$scratch/bin/squall"
    echo "$scratch/bin/squall"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

now_us() { echo "${EPOCHREALTIME/./}"; }
# Seconds (3 decimals) from microsecond stamp $1 to $2.
seconds_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e6 }'; }

# Runs a command in the network namespace of `squall up` (nothing when there is none).
in_up_ns=()
at_up() { "${in_up_ns[@]}" "$@"; }

# GET a path on squall up's admin listener ($up_admin); fails when nothing answers.
admin() { at_up curl -fsS -m 2 "http://$up_admin$1"; }

# The value of one Prometheus sample on the admin listener (the first line that starts with
# $1), or "-" when it is not there.
metric() {
    admin /metrics 2>/dev/null | awk -v name="$1" 'index($0, name) == 1 && substr($0, length(name) + 1, 1) ~ /[ {]/ {
        print $NF; found = 1; exit } END { if (!found) print "-" }'
}

# ready desired pending draining, from /status ("- - - -" when it does not answer).
pool() {
    admin /status 2>/dev/null | jq -r '[.worker_counts.ready, (.scaler.desired // 0), .scaler.pending, .scaler.draining] | @tsv' 2>/dev/null ||
        echo "- - - -"
}

# Writes the policy file $1: workers from $2 to $3, $4 requests at once per worker, scale-down
# delay $5 seconds.
write_policy() {
    cat >"$1" <<YAML
name: bench
template: app
workers: {min: $2, max: $3}
target: {concurrency: $4}
window: {stable: 10s, panic: 1s}
scale_up: {max_step: 100%, cooldown: 0s}
scale_down: {delay: ${5}s, max_step: 4, drain_timeout: 10s}
tick: 100ms
YAML
}

# Starts `squall up` (in the namespace of `in_up_ns`, with TMPDIR=$run_tmp so forkd's
# runtime files are in the scratch directory) on $up_listen and $up_admin, and waits until
# it says where to send traffic. Arguments: squall up's own, then -- and the app. Logs go to
# $log_dir/up.log (appended across restarts). Sets up_pid. Fails if it exits or takes longer
# than $start_limit seconds (a microVM template boots first).
start_up() {
    local out="$log_dir/up.out.$RANDOM"
    # Not through at_up: a function run in the background is a subshell, and $! must be
    # squall up itself (ip netns exec execs its command).
    TMPDIR="$run_tmp" "${in_up_ns[@]}" "$squall" up --listen "$up_listen" --admin "$up_admin" "$@" \
        >"$out" 2>>"$log_dir/up.log" &
    up_pid=$!
    pids+=("$up_pid")
    local deadline=$((SECONDS + ${start_limit:-60}))
    until grep -q '^squall up: send traffic' "$out" 2>/dev/null; do
        if ! kill -0 "$up_pid" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
            echo "squall up did not start; the end of $log_dir/up.log:" >&2
            tail -5 "$log_dir/up.log" >&2
            return 1
        fi
        sleep 0.1
    done
}

# Stops squall up with SIGTERM and waits for it (45 s at most, then SIGKILL); prints how it
# ended ("exit N", or "killed after 45 s").
stop_up() {
    [ -n "${up_pid:-}" ] || return 0
    stop_process "$up_pid" 45
    up_pid=""
}

stop_process() { # stop_process PID LIMIT_SECONDS: SIGTERM, then SIGKILL after the limit
    local pid=$1 limit=$2 waited=0
    kill -TERM "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    while kill -0 "$pid" 2>/dev/null && [ $waited -lt $((limit * 10)) ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "process $pid did not stop within $limit s of SIGTERM; killed" >>"$log_dir/notes"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# Waits until at least $1 workers are ready, $2 seconds at most.
wait_ready() {
    local deadline=$((SECONDS + $2)) ready
    while :; do
        read -r ready _ < <(pool)
        [ "$ready" != "-" ] && [ "$ready" -ge "$1" ] && return 0
        [ $SECONDS -ge $deadline ] && { echo "fewer than $1 workers ready after $2 s" >&2; return 1; }
        sleep 0.2
    done
}

# Starts hey against squall up: $2 connections, each at most $3 requests/s, until stopped
# (`stop_load`) or $4 seconds; reports go to $log_dir/hey-$1-N.txt. A request has
# $REQUEST_TIMEOUT seconds to be answered. hey starts every connection's clock at once, so
# its requests leave in bursts of all its connections; the connections are spread over up
# to LOAD_PROCESSES (8) hey processes started evenly over one period (1/$3 s), which makes
# the bursts that many times smaller and more frequent.
start_load() {
    local name=$1 connections=$2 qps=$3 duration=${4:-3600} processes=${LOAD_PROCESSES:-8} i share
    [ "$processes" -gt "$connections" ] && processes=$connections
    local stagger
    stagger=$(awk -v q="$qps" -v p="$processes" 'BEGIN { printf "%.4f", 1 / (q * p) }')
    for ((i = 0; i < processes; i++)); do
        share=$(((connections * (i + 1)) / processes - (connections * i) / processes))
        # Not through at_up: $! must be hey itself (ip netns exec execs its command).
        "${in_up_ns[@]}" hey -z "${duration}s" -t "${REQUEST_TIMEOUT:-20}" -c "$share" -q "$qps" \
            "http://$up_listen/" >"$log_dir/hey-$name-$i.txt" 2>&1 &
        load_pids+=("$!")
        pids+=("$!")
        sleep "$stagger"
    done
}

# Stops every hey started (SIGINT: each finishes the requests it has in flight and reports).
stop_load() {
    local pid
    for pid in "${load_pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    for pid in "${load_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    load_pids=()
}

# "sent ok failed 5xx errors" over hey reports: every request has one outcome, a status
# (2xx ok; 5xx; anything else is failed too) or an error (refused, reset, timed out).
load_counts() {
    awk '
        /^Status code distribution:/ { section = "status"; next }
        /^Error distribution:/ { section = "error"; next }
        /^[^ \t]/ { section = "" }
        section == "status" && match($0, /\[[0-9]+\]/) {
            code = substr($0, RSTART + 1, RLENGTH - 2); n = $2
            sent += n
            if (code >= 200 && code < 300) ok += n; else { failed += n; if (code >= 500) s5xx += n }
        }
        section == "error" && match($0, /\[[0-9]+\]/) {
            n = substr($0, RSTART + 1, RLENGTH - 2); sent += n; failed += n; errors += n
        }
        END { printf "%d %d %d %d %d\n", sent, ok, failed, s5xx, errors }
    ' "$@"
}

# The slowest answer (seconds) over hey reports, errors aside.
load_slowest() {
    awk '$1 == "Slowest:" && $2 + 0 > max { max = $2 + 0 } END { printf "%.2f\n", max }' "$@"
}

# What went wrong, by kind, over hey reports (for the details file): "COUNT  status N" or
# "COUNT  error: MESSAGE", addresses and ports masked so that alike errors add up.
load_failures() {
    awk '
        /^Status code distribution:/ { section = "status"; next }
        /^Error distribution:/ { section = "error"; next }
        /^[^ \t]/ { section = "" }
        section == "status" && match($0, /\[[0-9]+\]/) {
            code = substr($0, RSTART + 1, RLENGTH - 2)
            if (code < 200 || code >= 300) count["status " code] += $2
        }
        section == "error" && match($0, /\[[0-9]+\]/) {
            n = substr($0, RSTART + 1, RLENGTH - 2)
            message = substr($0, RSTART + RLENGTH); sub(/^[ \t]+/, "", message)
            gsub(/[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+:[0-9]+/, "ADDR", message)
            count["error: " message] += n
        }
        END { for (k in count) printf "%7d  %s\n", count[k], k }
    ' "$@" | sort -rn | head -20
}

# The pids of every process whose command line mentions the scratch directory. (The list of
# /proc entries is made before grep starts, so grep, whose own command line mentions it,
# is not in it.)
run_processes() {
    local file pid
    # shellcheck disable=SC2013 # /proc paths have no spaces
    for file in $(grep -lsaF -- "$scratch" /proc/[0-9]*/cmdline 2>/dev/null); do
        pid=${file#/proc/}
        pid=${pid%/cmdline}
        [ "$pid" != "$$" ] && [ -e "/proc/$pid" ] && echo "$pid"
    done
    return 0
}

# Zombies that are ours: a child of one of the run's processes, or one of the run's programs
# (squall, warm-app, QEMU) handed to init.
zombies() {
    local ours
    ours=" $(run_processes | tr '\n' ' ') "
    ps -eo pid=,ppid=,stat=,comm= | awk -v ours="$ours" '$3 ~ /^Z/ &&
        (index(ours, " " $2 " ") || ($2 == 1 && $4 ~ /^(squall|warm-app|qemu-system)/)) { print $1, $2, $4 }'
}

# Everything the run left behind once all it started was stopped, written to $1 (one line
# each); prints a one-line summary ("none", or counts). $2: the runtime directory to find
# empty (but for the runtime directories of forkd hosts a and b in it); $3: a listing of
# /dev/shm taken before the run (a new RAM file counts if its name carries the pid of one of
# the run's processes, as forkd names them); $4: a network-namespace prefix.
leftovers() {
    local file=$1 dir=$2 shm_before=$3 ns_prefix=${4:-} pid
    : >"$file"
    local procs=0 qemus=0 zombie_count=0 files=0 shm=0 netns=0
    for pid in $(run_processes); do
        local line
        line="process $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-200)"
        echo "$line" >>"$file"
        if [[ "$line" == *qemu-system* ]]; then qemus=$((qemus + 1)); else procs=$((procs + 1)); fi
    done
    # A zombie handed to init is init's to reap; give it ZOMBIE_GRACE s (10) before it counts.
    local waited=0 handed
    handed=$(zombies | awk '$2 == 1' | wc -l)
    while [ "$(zombies | wc -l)" -gt 0 ] && [ $waited -lt "${ZOMBIE_GRACE:-10}" ]; do
        sleep 1
        waited=$((waited + 1))
    done
    while read -r line; do
        [ -n "$line" ] || continue
        echo "zombie (pid ppid name): $line" >>"$file"
        zombie_count=$((zombie_count + 1))
    done < <(zombies)
    if [ "$handed" -gt 0 ]; then
        echo "note: $handed zombie(s) of the run's programs were handed to init (pid 1);" \
            "$((handed - $(zombies | awk '$2 == 1' | wc -l))) reaped by it within $waited s" >>"$file"
    fi
    if [ -d "$dir" ]; then
        while read -r line; do
            [ -n "$line" ] || continue
            echo "file: $line" >>"$file"
            files=$((files + 1))
        done < <(find "$dir" -mindepth 1 2>/dev/null | grep -vxF -e "$dir/a" -e "$dir/b")
    fi
    while read -r line; do
        [ -n "$line" ] || continue
        echo "file: /dev/shm/$line (new since the case began)" >>"$file"
        shm=$((shm + 1))
    done < <(comm -13 "$shm_before" <(find /dev/shm -mindepth 1 -maxdepth 1 -printf '%f\n' | sort) |
        grep -E "^squall-.*-($(IFS='|'; echo "${pids[*]}"))-[0-9]+\.ram$" || true)
    if [ -n "$ns_prefix" ]; then
        while read -r line; do
            [ -n "$line" ] || continue
            echo "network namespace: $line" >>"$file"
            netns=$((netns + 1))
        done < <(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$ns_prefix" || true)
    fi
    local parts=()
    [ $procs -gt 0 ] && parts+=("$procs proc")
    [ $qemus -gt 0 ] && parts+=("$qemus qemu")
    [ $zombie_count -gt 0 ] && parts+=("$zombie_count zombie")
    [ $((files + shm)) -gt 0 ] && parts+=("$((files + shm)) file")
    [ $netns -gt 0 ] && parts+=("$netns netns")
    if [ ${#parts[@]} -eq 0 ]; then echo none; else (IFS=,; echo "${parts[*]}"); fi
}
