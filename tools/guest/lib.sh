# Sourced by guest scripts (`. /lib/guest.sh`): attaching thinlayer exports with the kernel's NBD
# driver through the virtio-serial ports tools/guest/run sets up, and small checks.
#
# The host's thinlayer socket is reached as /run/nbd.sock: socat listens there and hands each
# connection to nbd-port, which puts it on a free port. A port is no socket: QEMU connects it to
# the server at boot and again a second after the server drops it (reconnect=1), whether or not
# the guest has it open, and the guest closing it closes nothing on the host. So:
#   - the server drops an idle port's connection after its handshake timeout; an attach that
#     meets that moment fails and is tried again (NBD_ATTACH_SECONDS in all; a retried attach
#     prints a RETRY line, which the host test counts and shows);
#   - a port whose connection ended without NBD_CMD_DISC (the kernel shut its socket down) has
#     a connection still open on the server, mid-stream: nbd-port marks it spent, in
#     $SPENT_PORTS, and no one uses it again;
#   - an attach waits until enough ports are free (not open, not spent, connected on the host).
#     Waiting is no failed attempt: after a connection ends (a detach, a server restarted) QEMU
#     connects the port again only a second later, so an attach right after one found no free
#     port twice and counted each as a retry (every run showed two); now only an nbd-client
#     that fails counts, with its message.

NBD_SOCK=/run/nbd.sock
NBD_ATTACH_SECONDS=${NBD_ATTACH_SECONDS:-30}
SPENT_PORTS=/run/spent-ports

# port_field PORT KEY: a field (guest_connected, host_connected, ...) of the port's state.
port_field() {
    while read -r key value; do
        [ "$key" = "$2:" ] && { echo "$value"; return; }
    done <"/sys/kernel/debug/virtio-ports/$(basename "$(readlink "$1")")"
}

# How many ports a new connection could take now.
free_ports() {
    n=0
    for p in /dev/virtio-ports/nbdport*; do
        [ -e "$SPENT_PORTS/${p##*/}" ] && continue
        [ "$(port_field "$p" guest_connected)" = 0 ] && [ "$(port_field "$p" host_connected)" = 1 ] &&
            n=$((n + 1))
    done
    echo $n
}

fail() {
    echo "GUEST FAIL: $*"
    exit 1
}

# Runs a command, failing the script (with its output) when it fails.
must() {
    "$@" >/tmp/must.out 2>&1
    rc=$?
    cat /tmp/must.out
    [ $rc = 0 ] || fail "$* (exit $rc)"
}

# nbd_net: /run/nbd-net.sock reaches the host's socket over the network (run --net-socket), one
# fresh host connection per guest connection: what a client that reconnects needs, where a
# virtio-serial port may still carry its previous user's connection.
NBD_NET_SOCK=/run/nbd-net.sock
nbd_net() {
    [ -S "$NBD_NET_SOCK" ] && return
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 || fail "no network (run with --net-socket)"
    socat UNIX-LISTEN:"$NBD_NET_SOCK",fork TCP:10.0.2.100:10809 &
    for _ in $(seq 50); do [ -S "$NBD_NET_SOCK" ] && return; sleep 0.1; done
    fail "socat never listened on $NBD_NET_SOCK"
}

nbd_relay() {
    [ -S "$NBD_SOCK" ] && return
    mkdir -p "$SPENT_PORTS"
    ls /dev/virtio-ports/nbdport* >/dev/null 2>&1 || fail "no nbdport virtio ports (run with --socket)"
    socat UNIX-LISTEN:"$NBD_SOCK",fork,unlink-early EXEC:/bin/nbd-port,nofork &
    for _ in $(seq 50); do [ -S "$NBD_SOCK" ] && return; sleep 0.1; done
    fail "socat never listened on $NBD_SOCK"
}

# nbd_attach EXPORT DEVICE [NBD-CLIENT OPTIONS...]: e.g. nbd_attach box /dev/nbd0 -C 4
nbd_attach() {
    export_name=$1 dev=$2
    shift 2
    nbd_relay
    conns=1 prev=
    for a in "$@"; do
        [ "$prev" = -C ] && conns=$a
        prev=$a
    done
    deadline=$(($(date +%s) + NBD_ATTACH_SECONDS))
    tries=0
    while :; do
        # Waiting for ports is no failed attempt: after a connection ends (a detach, or the
        # server restarting), QEMU connects its port again only a second later (reconnect=1).
        until [ "$(free_ports)" -ge "$conns" ]; do
            [ "$(date +%s)" -lt "$deadline" ] ||
                fail "no free port for $export_name on $dev in ${NBD_ATTACH_SECONDS}s ($conns wanted)"
            sleep 0.1
        done
        tries=$((tries + 1))
        if nbd-client -unix "$NBD_SOCK" -N "$export_name" "$dev" "$@" >/tmp/attach.out 2>&1; then
            if [ "$(cat "/sys/block/${dev##*/}/size")" -gt 0 ]; then
                # The host counts and prints these (tests/guest_common: note_retry).
                [ $tries = 1 ] ||
                    echo "RETRY nbd_attach $export_name $dev: attached on attempt $tries"
                return 0
            fi
        fi
        echo "RETRY nbd_attach $export_name $dev: attempt $tries failed: $(tr '\n' ' ' </tmp/attach.out)"
        [ "$(date +%s)" -lt "$deadline" ] || {
            cat /tmp/attach.out
            fail "nbd-client could not attach $export_name to $dev for ${NBD_ATTACH_SECONDS}s"
        }
        sleep 0.5
    done
}

nbd_detach() {
    must nbd-client -d "$1"
}

# wait_host WORD: blocks until the host writes the line WORD to the control socket (run
# --control); the host writes it after doing what the guest announced with `step`.
# The port stays open (fd 5): a port's unread data is dropped when it is closed. Until the host
# has connected, reads return end-of-file.
wait_host() {
    if ! [ -e /proc/self/fd/5 ]; then
        [ -e /dev/virtio-ports/control ] || fail "no control port (run with --control)"
        exec 5</dev/virtio-ports/control
    fi
    until read -r got <&5; do
        [ -n "$got" ] && break
        sleep 0.2
    done
    [ "$got" = "$1" ] || fail "the host said '$got', expected '$1'"
}

# step NAME: tells the host the script reached NAME.
step() {
    echo "STEP $1"
}

# Prints NAME=VALUE on a line of its own for the host to read.
report() {
    echo "REPORT $1=$2"
}
