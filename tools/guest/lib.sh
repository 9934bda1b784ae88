# Sourced by guest scripts (`. /lib/guest.sh`): attaching thinlayer exports with the kernel's NBD
# driver through the virtio-serial ports tools/guest/run sets up, and small checks.
#
# The host's thinlayer socket is reached as /run/nbd.sock: socat listens there and hands each
# connection to nbd-port, which puts it on a free port. QEMU connected every port to the server
# at boot, so the server may drop an idle connection after its handshake timeout and QEMU
# reconnects a second later (reconnect=1); an attach that meets that moment fails and is tried
# again, and only after NBD_ATTACH_SECONDS of failures is it an error.

NBD_SOCK=/run/nbd.sock
NBD_ATTACH_SECONDS=${NBD_ATTACH_SECONDS:-30}

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

nbd_relay() {
    [ -S "$NBD_SOCK" ] && return
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
    deadline=$(($(date +%s) + NBD_ATTACH_SECONDS))
    while :; do
        if nbd-client -unix "$NBD_SOCK" -N "$export_name" "$dev" "$@" >/tmp/attach.out 2>&1; then
            [ "$(cat "/sys/block/${dev##*/}/size")" -gt 0 ] && return 0
        fi
        [ "$(date +%s)" -lt "$deadline" ] || {
            cat /tmp/attach.out
            fail "nbd-client could not attach $export_name to $dev for ${NBD_ATTACH_SECONDS}s"
        }
        sleep 1
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
