#!/usr/bin/env bash
# Compares kvfeed's change feed with etcd's watch: the same `kvfeed bench`
# runs against both, on one machine, over loopback, with the same
# durability, then a side-by-side table with ratios.
#
# What it does:
#   1. installs Debian's etcd-server if no etcd is found (apt-get; sudo when
#      not root);
#   2. builds kvfeed with the `etcd` feature (cargo build --release);
#   3. starts etcd and `kvfeed serve` in the background, each on loopback
#      with a fresh data directory and its default durability: etcd fsyncs
#      its write-ahead log before acknowledging a put, kvfeed fsyncs each
#      commit group (`sync-on-commit` true); both group concurrent writes
#      into one fsync;
#   4. runs the matrix against both, one system after the other for each
#      row: feed 4 writers x 1 watcher, 4 x 64, 1000 puts/s x 64 (128-byte
#      values), churn, churn of half-closed calls, idle;
#   5. writes the raw output, one JSON line per run (results.jsonl) and the
#      table (table.txt) to the output directory, prints the table, and
#      stops both servers by pid (also on Ctrl-C or an error).
#
# Settings (environment variables, defaults in brackets):
#   DURATION           feed runs [10s]
#   DRAIN_TIMEOUT      feed runs: wait for the watchers after the writers [30s]
#   CHURN_DURATION     churn runs [10s]
#   CHURN_CLIENTS      churn client loops [16]
#   CHURN_PRELOAD      keys each churned call replays [256]
#   IDLE_CONNECTIONS   idle connections [1000]
#   OUT_DIR            output directory [$TMPDIR/kvfeed-compare-etcd-<UTC time>]
#   KVFEED_PORT        kvfeed gRPC port [23160]
#   KVFEED_STATUS_PORT kvfeed status port [23180]
#   ETCD_CLIENT_PORT   etcd client port [23379]
#   ETCD_PEER_PORT     etcd peer port [23380]
#   ETCD_BIN           etcd binary [etcd on PATH, installed if missing]
#   KVFEED_BIN         a kvfeed built with `--features etcd` [built here]
#   KEEP_DATA          1: keep the servers' data directories [0]
#   TABLE_ONLY         1: only print the table of the results in OUT_DIR [0]
#
# The exit status is 1 if any run failed its own correctness checks (lost
# or duplicated events, gauges not back); the table is printed anyway.

set -euo pipefail

DURATION=${DURATION:-10s}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-30s}
CHURN_DURATION=${CHURN_DURATION:-10s}
CHURN_CLIENTS=${CHURN_CLIENTS:-16}
CHURN_PRELOAD=${CHURN_PRELOAD:-256}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-1000}
KVFEED_PORT=${KVFEED_PORT:-23160}
KVFEED_STATUS_PORT=${KVFEED_STATUS_PORT:-23180}
ETCD_CLIENT_PORT=${ETCD_CLIENT_PORT:-23379}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-23380}
KEEP_DATA=${KEEP_DATA:-0}
TABLE_ONLY=${TABLE_ONLY:-0}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT_DIR:-${TMPDIR:-/tmp}/kvfeed-compare-etcd-$(date -u +%Y%m%dT%H%M%SZ)}

say() { printf 'compare-etcd: %s\n' "$*" >&2; }
die() {
    say "$*"
    exit 2
}

# --- etcd ------------------------------------------------------------------

find_etcd() {
    if [[ -n ${ETCD_BIN:-} ]]; then
        [[ -x $ETCD_BIN ]] || die "ETCD_BIN=$ETCD_BIN is not an executable"
        return
    fi
    if ! command -v etcd >/dev/null 2>&1; then
        say "etcd not found; installing Debian's etcd-server"
        local sudo=()
        if [[ $(id -u) -ne 0 ]]; then
            command -v sudo >/dev/null 2>&1 || die "etcd is missing and installing it needs root or sudo"
            sudo=(sudo)
        fi
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server ||
            die "cannot install etcd-server; install etcd and set ETCD_BIN"
    fi
    ETCD_BIN=$(command -v etcd) || die "etcd is still not on PATH"
}

# --- kvfeed ----------------------------------------------------------------

build_kvfeed() {
    if [[ -n ${KVFEED_BIN:-} ]]; then
        [[ -x $KVFEED_BIN ]] || die "KVFEED_BIN=$KVFEED_BIN is not an executable"
        return
    fi
    say "building kvfeed with the etcd feature (cargo build --release --features etcd)"
    (cd "$root" && cargo build --release --features etcd -p kvfeed)
    KVFEED_BIN=${CARGO_TARGET_DIR:-$root/target}/release/kvfeed
    [[ -x $KVFEED_BIN ]] || die "no binary at $KVFEED_BIN after the build"
}

# --- servers ---------------------------------------------------------------

etcd_pid=""
kvfeed_pid=""
data_dir=""

stop_pid() {
    local name=$1 pid=$2
    [[ -n $pid ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    say "$name (pid $pid) did not stop within 10 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    stop_pid kvfeed "$kvfeed_pid"
    stop_pid etcd "$etcd_pid"
    if [[ -n $data_dir && $KEEP_DATA != 1 ]]; then
        rm -rf "$data_dir"
    fi
}

# Waits until `curl URL` succeeds, while process PID lives, for 60 s at most.
wait_ready() {
    local name=$1 pid=$2 url=$3 log=$4
    for _ in $(seq 300); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$log" >&2 || true
            die "$name exited during start-up (log: $log)"
        fi
        if curl -fsS --max-time 2 "$url" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    die "$name was not ready at $url within 60 s (log: $log)"
}

start_servers() {
    data_dir=$(mktemp -d "${TMPDIR:-/tmp}/kvfeed-compare-etcd.XXXXXX")
    local etcd_url="http://127.0.0.1:$ETCD_CLIENT_PORT"
    local peer_url="http://127.0.0.1:$ETCD_PEER_PORT"
    # etcd with its default durability: the WAL is fsynced before a put is
    # acknowledged (and never `--unsafe-no-fsync`).
    "$ETCD_BIN" --name compare \
        --data-dir "$data_dir/etcd" \
        --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
        --listen-peer-urls "$peer_url" --initial-advertise-peer-urls "$peer_url" \
        --initial-cluster "compare=$peer_url" \
        >"$OUT_DIR/etcd.log" 2>&1 &
    etcd_pid=$!
    # kvfeed with its defaults: sync-on-commit true (an fsync per commit group).
    "$KVFEED_BIN" serve --data-dir "$data_dir/kvfeed" \
        --addr "127.0.0.1:$KVFEED_PORT" --status-addr "127.0.0.1:$KVFEED_STATUS_PORT" \
        >"$OUT_DIR/kvfeed.log" 2>&1 &
    kvfeed_pid=$!
    say "etcd pid $etcd_pid on $etcd_url, kvfeed pid $kvfeed_pid on 127.0.0.1:$KVFEED_PORT"
    wait_ready etcd "$etcd_pid" "$etcd_url/health" "$OUT_DIR/etcd.log"
    wait_ready kvfeed "$kvfeed_pid" "http://127.0.0.1:$KVFEED_STATUS_PORT/healthz" "$OUT_DIR/kvfeed.log"
}

# --- the matrix ------------------------------------------------------------

failed_runs=0

# run NAME SYSTEM SUBCOMMAND ARGS...: one bench run; its JSON line goes to
# results.jsonl as {"run":NAME,"system":SYSTEM,"exit":CODE,"result":{...}}.
run() {
    local name=$1 system=$2 sub=$3
    shift 3
    local target=(--pd "127.0.0.1:$KVFEED_PORT" --status "127.0.0.1:$KVFEED_STATUS_PORT")
    if [[ $system == etcd ]]; then
        target=(--target "etcd://127.0.0.1:$ETCD_CLIENT_PORT")
    fi
    local raw="$OUT_DIR/raw/$name.$system.txt"
    say "$name on $system: kvfeed bench $sub $*"
    local code=0
    "$KVFEED_BIN" bench "$sub" "${target[@]}" "$@" >"$raw" 2>"$raw.stderr" || code=$?
    local json
    json=$(grep '^{' "$raw" | tail -n 1 || true)
    if [[ -z $json ]]; then
        json=null
        say "$name on $system produced no result (exit $code): $(tail -n 1 "$raw.stderr")"
    fi
    if [[ $code -ne 0 ]]; then
        failed_runs=$((failed_runs + 1))
        say "$name on $system failed (exit $code); see $raw"
    fi
    printf '{"run":"%s","system":"%s","exit":%d,"result":%s}\n' \
        "$name" "$system" "$code" "$json" >>"$OUT_DIR/results.jsonl"
}

# Each row runs on kvfeed, then on etcd, so both see the same machine.
both() {
    run "$1" kvfeed "${@:2}"
    run "$1" etcd "${@:2}"
}

run_matrix() {
    local feed=(--value-size 128 --duration "$DURATION" --drain-timeout "$DRAIN_TIMEOUT")
    both feed-4x1 feed --writers 4 --watchers 1 "${feed[@]}"
    both feed-4x64 feed --writers 4 --watchers 64 "${feed[@]}"
    both feed-1000x64 feed --rate 1000 --writers 4 --watchers 64 "${feed[@]}"
    # The stages both systems end the same way; half-close separately,
    # because etcd keeps a half-closed Watch call open (see the table).
    both churn churn --clients "$CHURN_CLIENTS" --duration "$CHURN_DURATION" \
        --preload "$CHURN_PRELOAD" --stages before_request,after_register,mid_stream,drop
    both churn-half-close churn --clients "$CHURN_CLIENTS" --duration "$CHURN_DURATION" \
        --preload "$CHURN_PRELOAD" --stages half_close
    both idle idle --connections "$IDLE_CONNECTIONS" --batch 100
}

# --- the table -------------------------------------------------------------

print_table() {
    python3 - "$OUT_DIR/results.jsonl" <<'PY'
import json
import sys

runs = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if line:
        r = json.loads(line)
        runs[(r["run"], r["system"])] = r

def value(run, system, key):
    r = runs.get((run, system))
    if not r or not r["result"]:
        return None
    v = r["result"].get(key)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

def status(run, system):
    r = runs.get((run, system))
    if not r:
        return "not run"
    if not r["result"]:
        return "no result"
    return "ok" if r["result"].get("ok") else "FAILED"

def fmt(v, scale=1.0, digits=2):
    if v is None:
        return "n/a"
    v = v * scale
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"

MIB = 1 / (1024 * 1024)
# (run, label, key, scale, digits, better): better is "higher" or "lower".
rows = {
    "feed-4x1": ("feed 4 writers x 1 watcher", [
        ("puts/s", "puts_per_sec", 1, 0, "higher"),
        ("events/s", "events_per_sec", 1, 0, "higher"),
        ("put p99 (ms)", "put_p99_ms", 1, 2, "lower"),
        ("put->event p50 (ms)", "latency_p50_ms", 1, 2, "lower"),
        ("put->event p99 (ms)", "latency_p99_ms", 1, 2, "lower"),
        ("put->event p99.9 (ms)", "latency_p999_ms", 1, 2, "lower"),
        ("server CPU (cores)", "server_cpu_cores", 1, 2, "lower"),
        ("server RSS peak (MiB)", "server_rss_peak_bytes", MIB, 1, "lower"),
        ("events lost", "lost", 1, 0, "lower"),
        ("events duplicated", "duplicated", 1, 0, "lower"),
    ]),
    "feed-4x64": ("feed 4 writers x 64 watchers", None),
    "feed-1000x64": ("feed 1000 puts/s x 64 watchers", None),
    "churn": ("churn (all stages but half_close)", [
        ("connections/s", "connections_per_sec", 1, 0, "higher"),
        ("errors", "errors", 1, 0, "lower"),
        ("time to settle (s)", "settle_seconds", 1, 2, "lower"),
        ("server RSS growth (%)", "server_rss_growth_pct", 1, 1, "lower"),
    ]),
    "churn-half-close": ("churn, half_close only", [
        ("connections/s", "connections_per_sec", 1, 0, "higher"),
        ("calls the server kept open", "half_close_left_open", 1, 0, "lower"),
        ("errors", "errors", 1, 0, "lower"),
    ]),
    "idle": ("idle connections", [
        ("opened per second", "open_per_sec", 1, 0, "higher"),
        ("server RSS per connection (KiB)", "rss_per_connection_kib", 1, 1, "lower"),
        ("server RSS with all open (MiB)", "server_rss_open_bytes", MIB, 1, "lower"),
    ]),
}
rows["feed-4x64"] = (rows["feed-4x64"][0], rows["feed-4x1"][1])
rows["feed-1000x64"] = (rows["feed-1000x64"][0], rows["feed-4x1"][1])

out = []
out.append("kvfeed vs etcd (same machine, loopback; ratio = kvfeed / etcd)")
out.append("")
header = f"{'':34} {'kvfeed':>12} {'etcd':>12} {'ratio':>8}  better"
for run, (title, metrics) in rows.items():
    out.append(f"{title}  [kvfeed {status(run, 'kvfeed')}, etcd {status(run, 'etcd')}]")
    out.append(header)
    for label, key, scale, digits, better in metrics:
        k, e = value(run, "kvfeed", key), value(run, "etcd", key)
        # A ratio of counts that may be 0, or of a change that may be
        # negative, means nothing: both figures are shown instead.
        ratio = "n/a" if k is None or e is None or e <= 0 or k < 0 else f"{k / e:.2f}"
        out.append(f"  {label:32} {fmt(k, scale, digits):>12} {fmt(e, scale, digits):>12} "
                   f"{ratio:>8}  {better}")
    out.append("")

def target(label, run, key, test, wanted):
    k, e = value(run, "kvfeed", key), value(run, "etcd", key)
    ok_runs = status(run, "kvfeed") == "ok" and status(run, "etcd") == "ok"
    if k is None or e is None or not ok_runs:
        verdict = "not measured"
    else:
        verdict = "met" if test(k, e) else "not met"
    out.append(f"  {label:56} {wanted:>10} -> {verdict}")

out.append("Targets")
target("feed 4x64: events/s", "feed-4x64", "events_per_sec",
       lambda k, e: k >= 3 * e, ">= 3x etcd")
target("feed 4x64: put->event p99", "feed-4x64", "latency_p99_ms",
       lambda k, e: k <= e, "<= etcd")
target("feed 1000 puts/s x 64: put->event p99", "feed-1000x64", "latency_p99_ms",
       lambda k, e: k <= e / 2, "<= 1/2 etcd")
print("\n".join(out))
PY
}

# --- main ------------------------------------------------------------------

main() {
    command -v python3 >/dev/null 2>&1 || die "python3 is needed for the table"
    if [[ $TABLE_ONLY == 1 ]]; then
        [[ -f $OUT_DIR/results.jsonl ]] || die "no results.jsonl in OUT_DIR=$OUT_DIR"
        print_table
        return
    fi
    command -v curl >/dev/null 2>&1 || die "curl is needed to wait for the servers"
    mkdir -p "$OUT_DIR/raw"
    : >"$OUT_DIR/results.jsonl"
    find_etcd
    build_kvfeed
    # Idle connections need a descriptor each in the bench and the server.
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "kvfeed: $("$KVFEED_BIN" --version) ($(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
        echo "etcd: $("$ETCD_BIN" --version | head -n 1)"
        echo "cpus: $(nproc)"
        echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)"
        echo "open files limit: $(ulimit -n)"
        echo "DURATION=$DURATION CHURN_DURATION=$CHURN_DURATION CHURN_CLIENTS=$CHURN_CLIENTS" \
            "CHURN_PRELOAD=$CHURN_PRELOAD IDLE_CONNECTIONS=$IDLE_CONNECTIONS"
    } >"$OUT_DIR/env.txt"
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    start_servers
    run_matrix
    echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)" >>"$OUT_DIR/env.txt"
    print_table | tee "$OUT_DIR/table.txt"
    say "raw output, results.jsonl and table.txt are in $OUT_DIR"
    if [[ $failed_runs -gt 0 ]]; then
        say "$failed_runs run(s) failed their correctness checks"
        exit 1
    fi
}

main "$@"
