#!/usr/bin/env bash
# Interop: petrel against clients it did not write, for MQTT 3.1, 3.1.1 and 5.0.
#
#   1. the mosquitto command-line clients (mosquitto_pub / mosquitto_sub), per protocol
#      version: QoS 0/1/2, retained messages, wildcards, wills, persistent sessions, and one
#      fan-out across versions;
#   2. logins against a password file and topic rules (ACL), on a second broker;
#   3. paho-mqtt for Python (tests/interop/test_paho.py, and test_paho_v5.py for MQTT 5 features).
#
# Usage: tests/interop/run.sh [--release] [--port N]
#   (no option)  install missing clients, build petrel (debug), start it on a free loopback port
#                with a temporary config, run every check, stop it with SIGTERM.
#   --release    build and run the release binary instead.
#   --port N     run the checks against a broker already listening on 127.0.0.1:N; nothing is
#                built or started. Handy to compare with another broker.
#
# Prints one line per check, then "N passed, M failed"; exits 1 if any check failed. Every wait
# is bounded; a full run takes well under a minute.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HOST=127.0.0.1
PORT=""
PROFILE=debug
# Seconds any one wait may take: a subscription, a delivery, a client's exit.
WAIT=5

while [[ $# -gt 0 ]]; do
    case "$1" in
    --port)
        PORT="${2:?--port needs a number}"
        shift 2
        ;;
    --release)
        PROFILE=release
        shift
        ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "run.sh: unknown argument '$1' (try --help)" >&2
        exit 2
        ;;
    esac
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/petrel-interop.XXXXXX")"
BROKER_PID=""
BG_PIDS=()

cleanup() {
    local pid
    for pid in ${BG_PIDS[@]+"${BG_PIDS[@]}"}; do
        kill -9 "$pid" 2>/dev/null || true
    done
    if [[ -n $BROKER_PID ]] && kill -0 "$BROKER_PID" 2>/dev/null; then
        kill -9 "$BROKER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- what the checks need ------------------------------------------------------------------------

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

if ! command -v mosquitto_pub >/dev/null || ! command -v mosquitto_sub >/dev/null ||
    ! command -v openssl >/dev/null; then
    echo "installing mosquitto-clients and openssl"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto-clients openssl \
        >/dev/null
fi

paho_ok() {
    python3 -c 'import sys, paho.mqtt; sys.exit(int(paho.mqtt.__version__.split(".")[0]) < 2)' \
        2>/dev/null
}
if ! paho_ok; then
    echo "installing paho-mqtt"
    req="$ROOT/tests/interop/requirements.txt"
    # A distribution's Python may refuse a plain install (PEP 668); the user site is then fine
    # for a test dependency.
    python3 -m pip install -q -r "$req" ||
        python3 -m pip install -q --user --break-system-packages -r "$req"
    paho_ok || { echo "run.sh: paho-mqtt 2.x still not importable" >&2; exit 1; }
fi

# --- the broker ----------------------------------------------------------------------------------

wait_listening() {
    local deadline=$((SECONDS + 10))
    until (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; do
        if [[ -n $BROKER_PID ]] && ! kill -0 "$BROKER_PID" 2>/dev/null; then
            echo "run.sh: petrel exited at start:" >&2
            cat "$WORK/petrel.log" >&2
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            echo "run.sh: nothing listens on $HOST:$PORT after 10 s" >&2
            exit 1
        fi
        sleep 0.05
    done
}

if [[ -z $PORT ]]; then
    # Debug by default: with a warm cache it builds in seconds, while the release profile's LTO
    # costs minutes, and this traffic is far too small for the broker's speed to matter.
    build=(cargo build --quiet -p petrel-server --bin petrel)
    [[ $PROFILE == release ]] && build+=(--release)
    (cd "$ROOT" && "${build[@]}")
    target_dir="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
    PETREL="$target_dir/$PROFILE/petrel"

    free_port() {
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    }
    PORT="$(free_port)"
    TLS_PORT="$(free_port)"
    MTLS_PORT="$(free_port)"
    WS_PORT="$(free_port)"
    # Certificates for the TLS checks, made now: a CA, an RSA server certificate for
    # localhost / 127.0.0.1 and an ECDSA client certificate.
    (
        cd "$WORK"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
            -keyout ca.key -out ca.pem -subj "/CN=petrel interop CA" 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
            -subj "/CN=localhost" 2>/dev/null
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -out server.pem -extfile server.ext 2>/dev/null
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout client.key -out client.csr -subj "/CN=interop-device" 2>/dev/null
        printf 'extendedKeyUsage=clientAuth\n' >client.ext
        openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -out client.pem -extfile client.ext 2>/dev/null
    ) || { echo "run.sh: could not make test certificates with openssl" >&2; exit 1; }
    cat >"$WORK/petrel.toml" <<EOF
[[listeners]]
bind = "$HOST:$PORT"
connect_timeout = "5s"

[[listeners]]
protocol = "tls"
bind = "$HOST:$TLS_PORT"
cert = "$WORK/server.pem"
key = "$WORK/server.key"

[[listeners]]
protocol = "tls"
bind = "$HOST:$MTLS_PORT"
cert = "$WORK/server.pem"
key = "$WORK/server.key"
client_ca = "$WORK/ca.pem"
require_client_cert = true

[[listeners]]
protocol = "ws"
bind = "$HOST:$WS_PORT"

[storage]
dir = "$WORK/data"
EOF
    RUST_LOG="${RUST_LOG:-info}" "$PETREL" --config "$WORK/petrel.toml" 2>"$WORK/petrel.log" &
    BROKER_PID=$!
    echo "petrel ($PROFILE) pid $BROKER_PID on $HOST:$PORT"

    # A second broker with logins and topic rules: a password file made with `petrel passwd`
    # and an ACL file.
    AUTH_PORT="$(free_port)"
    printf 'alice-pw\n' | "$PETREL" passwd "$WORK/passwords" alice --stdin 2>/dev/null
    printf 'bob-pw\n' | "$PETREL" passwd "$WORK/passwords" bob --stdin 2>/dev/null
    cat >"$WORK/acl.toml" <<EOF
[[rules]]
user = "alice"
access = "both"
topics = ["home/%u/#"]

[[rules]]
user = "bob"
access = "publish"
topics = ["home/alice/inbox"]
EOF
    cat >"$WORK/secure.toml" <<EOF
[[listeners]]
bind = "$HOST:$AUTH_PORT"

[auth]
allow_anonymous = false
password_file = "$WORK/passwords"
acl_file = "$WORK/acl.toml"

[storage]
mode = "memory"
EOF
    "$PETREL" --config "$WORK/secure.toml" 2>"$WORK/secure.log" &
    AUTH_PID=$!
    BG_PIDS+=("$AUTH_PID")
    # Killed at exit with the other background processes; no "Killed" line for it.
    disown "$AUTH_PID"
else
    echo "using the broker on $HOST:$PORT"
fi
wait_listening
if [[ -n ${AUTH_PORT:-} ]]; then
    deadline=$((SECONDS + 10))
    until (exec 3<>"/dev/tcp/$HOST/$AUTH_PORT") 2>/dev/null; do
        if ! kill -0 "$AUTH_PID" 2>/dev/null || ((SECONDS >= deadline)); then
            echo "run.sh: the broker with logins did not start:" >&2
            cat "$WORK/secure.log" >&2
            exit 1
        fi
        sleep 0.05
    done
fi

# --- client helpers ------------------------------------------------------------------------------
# Each check is a function that returns non-zero on failure, printing why. Checks run in an `if`,
# where `set -e` does not apply, so every step says `|| return 1` itself.

declare -A SUB_PID=()
# One line per message: MSG topic qos retain payload.
FORMAT='MSG %t %q %r %p'

# Starts `mosquitto_sub -d ARGS` in the background, output in $WORK/NAME.out, and waits until its
# subscriptions are acknowledged. Give it -W so that it also ends by itself.
sub_start() {
    local name=$1
    shift
    # Line-buffered: a pipe or file would otherwise get the SUBACK line only at exit.
    stdbuf -oL mosquitto_sub -d -h "$HOST" -p "$PORT" -F "$FORMAT" "$@" >"$WORK/$name.out" 2>&1 &
    SUB_PID[$name]=$!
    BG_PIDS+=("$!")
    # Out of the job table: bash still reaps it, but prints no "Killed" line when a check
    # kills it on purpose. sub_wait therefore polls instead of calling `wait`.
    disown "$!"
    local deadline=$((SECONDS + WAIT))
    until grep -q '^Subscribed (mid' "$WORK/$name.out"; do
        if ! kill -0 "${SUB_PID[$name]}" 2>/dev/null || ((SECONDS >= deadline)); then
            echo "subscriber '$name' was not subscribed within ${WAIT}s:"
            sed 's/^/  | /' "$WORK/$name.out"
            kill -9 "${SUB_PID[$name]}" 2>/dev/null
            return 1
        fi
        sleep 0.02
    done
}

# Waits for a background subscriber to end (its -C count or -W timeout), killing it after WAIT+2 s.
sub_wait() {
    local name=$1 pid=${SUB_PID[$1]}
    local deadline=$((SECONDS + WAIT + 2))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            kill -9 "$pid" 2>/dev/null
            break
        fi
        sleep 0.02
    done
}

# Runs `mosquitto_sub -d ARGS` to its end in the foreground, output in $WORK/NAME.out.
sub_run() {
    local name=$1
    shift
    timeout -k 1 $((WAIT + 2)) mosquitto_sub -d -h "$HOST" -p "$PORT" -F "$FORMAT" "$@" \
        >"$WORK/$name.out" 2>&1 || true
}

pub() {
    timeout -k 1 "$WAIT" mosquitto_pub -h "$HOST" -p "$PORT" "$@" || {
        echo "mosquitto_pub $* failed (exit $?)"
        return 1
    }
}

# Compares the messages subscriber NAME printed with the expected lines, in order.
expect_msgs() {
    local name=$1
    shift
    local want got
    want="$(printf '%s\n' "$@")"
    got="$(grep '^MSG ' "$WORK/$name.out" || true)"
    if [[ $got != "$want" ]]; then
        echo "subscriber '$name' expected:"
        printf '%s\n' "$want" | sed 's/^/  + /'
        echo "but printed:"
        sed 's/^/  | /' "$WORK/$name.out"
        return 1
    fi
}

# --- checks --------------------------------------------------------------------------------------

# Topics are unique per run, so a broker reused with --port holds nothing that interferes.
BASE="interop/$$"

check_qos() {
    local v=$1 qos=$2 t="$BASE/$1/qos$2"
    sub_start "q$qos-$v" -V "$v" -q 2 -t "$t" -C 1 -W "$WAIT" || return 1
    pub -V "$v" -q "$qos" -t "$t" -m "payload at qos $qos" || return 1
    sub_wait "q$qos-$v"
    expect_msgs "q$qos-$v" "MSG $t $qos 0 payload at qos $qos"
}

check_qos_downgrade() {
    local v=$1 t="$BASE/$1/downgrade"
    sub_start "down-$v" -V "$v" -q 1 -t "$t" -C 1 -W "$WAIT" || return 1
    pub -V "$v" -q 2 -t "$t" -m "sent at 2" || return 1
    sub_wait "down-$v"
    expect_msgs "down-$v" "MSG $t 1 0 sent at 2"
}

check_retained() {
    local v=$1 t="$BASE/$1/retained"
    pub -V "$v" -q 1 -r -t "$t" -m "kept-$v" || return 1
    # A later subscriber, through a wildcard, gets it with the retain flag set.
    sub_run "ret-$v" -V "$v" -q 1 -t "$BASE/$v/+" -C 1 -W "$WAIT"
    expect_msgs "ret-$v" "MSG $t 1 1 kept-$v" || return 1
    # An empty retained message deletes it [MQTT-3.3.1-10].
    pub -V "$v" -q 1 -r -n -t "$t" || return 1
    # After deletion a new subscriber gets nothing retained: publish a non-retained marker after
    # its SUBACK; the marker must be the first message it sees.
    sub_start "ret2-$v" -V "$v" -q 1 -t "$t" -t "$BASE/$v/marker" -C 1 -W "$WAIT" || return 1
    pub -V "$v" -q 1 -t "$BASE/$v/marker" -m marker || return 1
    sub_wait "ret2-$v"
    expect_msgs "ret2-$v" "MSG $BASE/$v/marker 1 0 marker"
}

check_wildcards() {
    local v=$1 w="$BASE/$1/wild"
    sub_start "plus-$v" -V "$v" -q 1 -t "$w/+/temp" -C 2 -W "$WAIT" || return 1
    sub_start "hash-$v" -V "$v" -q 1 -t "$w/#" -C 4 -W "$WAIT" || return 1
    # QoS 1 from one publisher at a time: each is acknowledged before the next is sent, so the
    # order of arrival is fixed.
    pub -V "$v" -q 1 -t "$w/a/temp" -m one || return 1
    pub -V "$v" -q 1 -t "$w/a/hum" -m two || return 1
    pub -V "$v" -q 1 -t "$w/b/temp" -m three || return 1
    # "#" also matches its parent level [MQTT-4.7.1-2].
    pub -V "$v" -q 1 -t "$w" -m four || return 1
    sub_wait "plus-$v"
    sub_wait "hash-$v"
    expect_msgs "plus-$v" "MSG $w/a/temp 1 0 one" "MSG $w/b/temp 1 0 three" || return 1
    expect_msgs "hash-$v" "MSG $w/a/temp 1 0 one" "MSG $w/a/hum 1 0 two" \
        "MSG $w/b/temp 1 0 three" "MSG $w 1 0 four"
}

check_will() {
    local v=$1 t="$BASE/$1/will"
    sub_start "watch-$v" -V "$v" -q 1 -t "$t" -C 1 -W "$WAIT" || return 1
    # A client that disconnects normally: its will is discarded [MQTT-3.1.2-10]. -E makes it
    # send DISCONNECT right after its SUBACK.
    sub_run "polite-$v" -V "$v" -t "$BASE/$v/unused" -E \
        --will-topic "$t" --will-payload "polite-$v" --will-qos 1
    # A client killed with SIGKILL: the broker sees the socket close and publishes the will.
    sub_start "dying-$v" -V "$v" -t "$BASE/$v/unused" -W 30 \
        --will-topic "$t" --will-payload "gone-$v" --will-qos 1 || return 1
    kill -9 "${SUB_PID[dying-$v]}"
    sub_wait "watch-$v"
    expect_msgs "watch-$v" "MSG $t 1 0 gone-$v"
}

check_persistent_session() {
    local v=$1 t="$BASE/$1/session" id="ps-$1-$$"
    id="${id:0:23}" # MQTT 3.1 allows at most 23 characters
    # Subscribe with a persistent session, then leave.
    sub_run "ps1-$v" -V "$v" -c -i "$id" -q 1 -t "$t" -E
    grep -q '^Subscribed (mid' "$WORK/ps1-$v.out" || {
        echo "first connection did not subscribe:"
        sed 's/^/  | /' "$WORK/ps1-$v.out"
        return 1
    }
    pub -V "$v" -q 1 -t "$t" -m "offline-1" || return 1
    pub -V "$v" -q 1 -t "$t" -m "offline-2" || return 1
    # Back with the same id and no clean session: both are delivered.
    sub_run "ps2-$v" -V "$v" -c -i "$id" -q 1 -t "$t" -C 2 -W "$WAIT"
    local ok=0
    expect_msgs "ps2-$v" "MSG $t 1 0 offline-1" "MSG $t 1 0 offline-2" || ok=1
    # Discard the session: a clean connection with the same id.
    sub_run "ps3-$v" -V "$v" -i "$id" -t "$t" -E
    return $ok
}

check_cross_version() {
    local t="$BASE/cross" v
    for v in mqttv31 mqttv311 mqttv5; do
        sub_start "cross-$v" -V "$v" -q 1 -t "$t" -C 3 -W "$WAIT" || return 1
    done
    for v in mqttv31 mqttv311 mqttv5; do
        pub -V "$v" -q 1 -t "$t" -m "from $v" || return 1
    done
    local failed=0
    for v in mqttv31 mqttv311 mqttv5; do
        sub_wait "cross-$v"
        expect_msgs "cross-$v" "MSG $t 1 0 from mqttv31" "MSG $t 1 0 from mqttv311" \
            "MSG $t 1 0 from mqttv5" || failed=1
    done
    return $failed
}

# MQTT 5 properties pass through, and the message expiry interval is forwarded.
check_v5_properties() {
    local t="$BASE/v5/props"
    sub_start "v5props" -V mqttv5 -q 1 -t "$t" -C 1 -W "$WAIT" \
        -F 'MSG %t %q %r %p C=%C R=%R P=%P E=%E F=%F' || return 1
    pub -V mqttv5 -q 1 -t "$t" -m "with props" -D publish content-type text/plain \
        -D publish response-topic "$t/reply" -D publish user-property k v \
        -D publish message-expiry-interval 60 -D publish payload-format-indicator 1 || return 1
    sub_wait "v5props"
    expect_msgs "v5props" "MSG $t 1 0 with props C=text/plain R=$t/reply P=k:v E=60 F=1"
}

check_v5_subscription_identifier() {
    local t="$BASE/v5/sid"
    sub_start "v5sid" -V mqttv5 -q 0 -t "$t/+" -D subscribe subscription-identifier 7 \
        -C 1 -W "$WAIT" -F 'MSG %t %q %r %p S=%S' || return 1
    pub -V mqttv5 -t "$t/a" -m x || return 1
    sub_wait "v5sid"
    expect_msgs "v5sid" "MSG $t/a 0 0 x S=7"
}

# Two members of one share group take turns; each message reaches exactly one of them.
check_v5_shared() {
    local t="$BASE/v5/shared" m
    for m in a b; do
        sub_start "shared-$m" -V mqttv5 -q 1 -t "\$share/g/$t" -C 2 -W "$WAIT" || return 1
    done
    for m in 1 2 3 4; do
        pub -V mqttv5 -q 1 -t "$t" -m "m$m" || return 1
    done
    sub_wait "shared-a"
    sub_wait "shared-b"
    local a b all
    a="$(grep -c '^MSG ' "$WORK/shared-a.out" || true)"
    b="$(grep -c '^MSG ' "$WORK/shared-b.out" || true)"
    all="$(cat "$WORK/shared-a.out" "$WORK/shared-b.out" | grep '^MSG ' | awk '{print $5}' | sort | tr '\n' ' ')"
    if [[ $a != 2 || $b != 2 || $all != "m1 m2 m3 m4 " ]]; then
        echo "expected 2 + 2 messages, m1-m4 once each; got $a + $b: $all"
        return 1
    fi
}

# A session with a 1 s expiry interval is gone 2 s after its client left: a message published
# meanwhile is not delivered on reconnect, only the marker sent after it.
check_v5_session_expiry() {
    local t="$BASE/v5/expiry" id="exp-$$"
    sub_run "exp1" -V mqttv5 -c -i "$id" -x 1 -q 1 -t "$t" -W 1
    sleep 2
    pub -V mqttv5 -q 1 -t "$t" -m lost || return 1
    sub_start "exp2" -V mqttv5 -c -i "$id" -x 1 -q 1 -t "$t" -C 1 -W "$WAIT" || return 1
    pub -V mqttv5 -q 1 -t "$t" -m marker || return 1
    sub_wait "exp2"
    expect_msgs "exp2" "MSG $t 1 0 marker"
}

# TLS with mosquitto's clients: server certificate checked against the CA, and a client
# certificate on the listener that requires one.
check_tls() {
    local v=$1 t="$BASE/$1/tls"
    sub_start "tls-$v" -V "$v" -p "$TLS_PORT" --cafile "$WORK/ca.pem" -q 1 -t "$t" -C 1 \
        -W "$WAIT" || return 1
    pub -V "$v" -p "$TLS_PORT" --cafile "$WORK/ca.pem" -q 1 -t "$t" -m "over tls" || return 1
    sub_wait "tls-$v"
    expect_msgs "tls-$v" "MSG $t 1 0 over tls"
}

check_mtls() {
    local t="$BASE/mtls"
    local tls=(--cafile "$WORK/ca.pem" --cert "$WORK/client.pem" --key "$WORK/client.key")
    sub_start "mtls" -V mqttv311 -p "$MTLS_PORT" "${tls[@]}" -q 1 -t "$t" -C 1 -W "$WAIT" ||
        return 1
    pub -V mqttv311 -p "$MTLS_PORT" "${tls[@]}" -q 1 -t "$t" -m "with a client cert" || return 1
    sub_wait "mtls"
    expect_msgs "mtls" "MSG $t 1 0 with a client cert" || return 1
    # Without a client certificate: no connection at all.
    if timeout -k 1 "$WAIT" mosquitto_pub -h "$HOST" -p "$MTLS_PORT" --cafile "$WORK/ca.pem" \
        -q 1 -t "$t" -m "no cert" 2>/dev/null; then
        echo "a client without a certificate could publish on the mutual-TLS listener"
        return 1
    fi
}

# Logins against the password file.
check_login() {
    local v=$1 t=home/alice/login
    sub_start "login-$v" -V "$v" -p "$AUTH_PORT" -u alice -P alice-pw -q 1 -t "$t" -C 1 \
        -W "$WAIT" || return 1
    pub -V "$v" -p "$AUTH_PORT" -u alice -P alice-pw -q 1 -t "$t" -m "logged in" || return 1
    sub_wait "login-$v"
    expect_msgs "login-$v" "MSG $t 1 0 logged in" || return 1
    local out
    if out=$(timeout -k 1 "$WAIT" mosquitto_pub -h "$HOST" -p "$AUTH_PORT" -V "$v" -u alice \
        -P wrong -t "$t" -m x 2>&1); then
        echo "a wrong password was accepted"
        return 1
    fi
    grep -qi -E 'not authori[sz]ed|bad user name or password' <<<"$out" || {
        echo "unexpected refusal: $out"
        return 1
    }
}

# Topic rules: what alice may not read is refused at SUBSCRIBE; what bob may not publish does
# not reach her; what he may publish does.
check_acl() {
    local v=$1 denied
    [[ $v == mqttv5 ]] && denied=135 || denied=128
    sub_start "acl-$v" -V "$v" -p "$AUTH_PORT" -u alice -P alice-pw -q 1 -t 'home/#' \
        -t 'home/bob/#' -C 1 -W "$WAIT" || return 1
    grep -q "Subscribed (mid: [0-9]*): 1, $denied" "$WORK/acl-$v.out" || {
        echo "expected SUBACK 1, $denied:"
        sed 's/^/  | /' "$WORK/acl-$v.out"
        return 1
    }
    # bob may not publish to alice's light (3.1.1: acknowledged and dropped; 5: refused).
    timeout -k 1 "$WAIT" mosquitto_pub -h "$HOST" -p "$AUTH_PORT" -V "$v" -u bob -P bob-pw \
        -q 1 -t home/alice/light -m forged >/dev/null 2>&1 || true
    pub -V "$v" -p "$AUTH_PORT" -u bob -P bob-pw -q 1 -t home/alice/inbox -m "hello alice" ||
        return 1
    sub_wait "acl-$v"
    expect_msgs "acl-$v" "MSG home/alice/inbox 1 0 hello alice"
}

PASSED=0
FAILED=0
FAILED_NAMES=()

record() {
    local name=$1 status=$2
    if [[ $status == PASS ]]; then
        PASSED=$((PASSED + 1))
    else
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=("$name")
    fi
}

# check NAME FUNCTION ARGS...: runs one check and prints its summary line (and, on failure, why).
check() {
    local name=$1
    shift
    local started=$SECONDS
    if "$@" >"$WORK/check.log" 2>&1; then
        record "$name" PASS
        printf 'PASS  %-40s %ds\n' "$name" $((SECONDS - started))
    else
        record "$name" FAIL
        printf 'FAIL  %-40s %ds\n' "$name" $((SECONDS - started))
        sed 's/^/      /' "$WORK/check.log"
    fi
}

echo "== mosquitto clients ($(mosquitto_pub --help | sed -n 's/.*version \([0-9.]*\).*/\1/p' | head -1))"
for v in mqttv31 mqttv311 mqttv5; do
    for qos in 0 1 2; do
        check "$v qos$qos publish/subscribe" check_qos "$v" "$qos"
    done
    check "$v qos2 to a qos1 subscription" check_qos_downgrade "$v"
    check "$v retained" check_retained "$v"
    check "$v wildcards + and #" check_wildcards "$v"
    check "$v will on SIGKILL, not on DISCONNECT" check_will "$v"
    check "$v persistent session (-c -i)" check_persistent_session "$v"
done
check "v3.1 + v3.1.1 + v5 fan-out" check_cross_version
check "mqttv5 properties and message expiry forwarded" check_v5_properties
check "mqttv5 subscription identifier" check_v5_subscription_identifier
check "mqttv5 shared subscription" check_v5_shared
check "mqttv5 session expiry interval" check_v5_session_expiry
if [[ -n ${TLS_PORT:-} ]]; then
    for v in mqttv311 mqttv5; do
        check "$v over TLS (--cafile, RSA server certificate)" check_tls "$v"
    done
    check "mutual TLS (--cert/--key), refused without a certificate" check_mtls
fi
if [[ -n ${AUTH_PORT:-} ]]; then
    for v in mqttv311 mqttv5; do
        check "$v password file login, wrong password refused" check_login "$v"
        check "$v ACL: denied subscription, forged publish dropped" check_acl "$v"
    done
fi

echo "== paho-mqtt $(python3 -c 'import paho.mqtt; print(paho.mqtt.__version__)')"
for script in test_paho.py test_paho_v5.py test_paho_transports.py; do
    extra=()
    if [[ $script == test_paho_transports.py ]]; then
        [[ -n ${TLS_PORT:-} ]] || continue
        extra=(--tls-port "$TLS_PORT" --ws-port "$WS_PORT" --cafile "$WORK/ca.pem")
    fi
    paho_status=0
    timeout -k 2 60 python3 "$ROOT/tests/interop/$script" --host "$HOST" --port "$PORT" \
        "${extra[@]}" >"$WORK/paho.log" 2>&1 || paho_status=$?
    while IFS= read -r line; do
        read -r status rest <<<"$line" || true
        case "$status" in
        PASS | FAIL) record "paho $rest" "$status" ;;
        esac
        printf '%s\n' "$line"
    done <"$WORK/paho.log"
    # A crash or a timeout prints no FAIL line of its own.
    if ((paho_status != 0)) && ! grep -q '^FAIL' "$WORK/paho.log"; then
        record "paho $script (exit $paho_status)" FAIL
        printf 'FAIL  %s exited %d\n' "$script" "$paho_status"
    fi
done

echo "== broker"
if [[ -n $BROKER_PID ]]; then
    broker_alive() { kill -0 "$BROKER_PID" 2>/dev/null; }
    check "broker still running" broker_alive
    no_panic() { ! grep -n -i -E 'panicked|thread .* panicked' "$WORK/petrel.log" "$WORK"/secure.log; }
    check "no panic in the broker log" no_panic
    stop_broker() {
        kill -TERM "$BROKER_PID" || return 1
        local deadline=$((SECONDS + WAIT)) status=0
        while kill -0 "$BROKER_PID" 2>/dev/null; do
            if ((SECONDS >= deadline)); then
                echo "still running ${WAIT}s after SIGTERM"
                return 1
            fi
            sleep 0.05
        done
        wait "$BROKER_PID" || status=$?
        BROKER_PID=""
        [[ $status -eq 0 ]] || { echo "exit status $status"; return 1; }
    }
    check "SIGTERM: broker exits 0" stop_broker
    if ((FAILED > 0)); then
        echo "-- last lines of the broker log:"
        tail -n 30 "$WORK/petrel.log" | sed 's/^/   | /'
    fi
fi

echo
if ((FAILED > 0)); then
    echo "failed:"
    printf '  %s\n' "${FAILED_NAMES[@]}"
fi
echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
