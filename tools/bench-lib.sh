# bench-lib.sh: shell helpers shared by the tools/bench-* scripts (sourced, not run).
#
# A script sets BENCH (its name) and sources this file; `bench_workdir` then makes the scratch
# directory WORK and arranges that on exit every mount made with `do_mount`/`attach_file` is
# unmounted (innermost first) and every process started with `bg_start` is stopped by PID —
# never by name, since other engineers' servers run on the same machine.

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
skip() { log "skipped: $*"; echo "$BENCH skipped: $*"; exit 0; }
need() { # tool...
    local t
    for t in "$@"; do command -v "$t" >/dev/null || die "$t is not installed"; done
}

now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$(now) - $1:.3f}')"; }
on_disk() { du -B1 -s -c "$@" | tail -1 | cut -f1; }   # allocated bytes, sparse-aware
settle() { sync; sleep 1; }   # nothing dirty, pending discards done, before a timed step

PIDS=()     # background processes, by PID
MOUNTS=()   # mount points, unmounted innermost first
bench_workdir() { # sets WORK under $WORKDIR (default /tmp), removed on exit unless KEEP=1
    WORK=$(mktemp -d "${WORKDIR:-/tmp}/$BENCH.XXXXXX")
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}
bench_cleanup() {
    local i p m
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        m=${MOUNTS[i]}
        [[ -n $m ]] && mountpoint -q "$m" || continue
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do [[ -n $p ]] && kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do [[ -n $p ]] && wait "$p" 2>/dev/null || true; done
    if [[ ${KEEP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}

BG=
bg_start() { # log-file command... ; sets BG to the PID
    local out=$1; shift
    "$@" >"$out" 2>&1 &
    BG=$!
    PIDS+=("$BG")
}
forget_pid() {
    local keep=() q
    for q in "${PIDS[@]}"; do [[ $q == "$1" ]] || keep+=("$q"); done
    PIDS=("${keep[@]}")
}
bg_stop() { # pid [strict]: TERM, wait; strict = it must exit 0
    local p=$1 rc=0
    kill -TERM "$p" 2>/dev/null || true
    wait "$p" || rc=$?
    forget_pid "$p"
    if [[ ${2:-} == strict && $rc != 0 ]]; then die "process $p exited $rc"; fi
}
wait_for() { # test-flag path [tries of 50 ms]
    local i
    for i in $(seq "${3:-200}"); do [ "$1" "$2" ] && return 0; sleep 0.05; done
    die "timed out waiting for $2"
}
uri() { echo "nbd+unix:///$2?socket=$1"; }   # socket export

do_mount() { # mount args... (the last is the mount point)
    mount "$@"
    MOUNTS+=("${!#}")
}
do_umount() {
    local m=$1 keep=() q
    umount "$m"
    for q in "${MOUNTS[@]}"; do [[ $q == "$m" ]] || keep+=("$q"); done
    MOUNTS=("${keep[@]}")
}

# An NBD export as a file: nbdfuse makes DIR/fuse/disk (the kernel nbd module is absent here).
# Sets FUSE_PID.
FUSE_PID=
nbd_file() { # uri dir
    mkdir -p "$2/fuse"
    bg_start "$2/nbdfuse.log" nbdfuse "$2/fuse/disk" "$1"
    FUSE_PID=$BG
    MOUNTS+=("$2/fuse")
    wait_for -f "$2/fuse/disk"
}
nbd_file_close() { # dir
    do_umount "$1/fuse"
    wait "$FUSE_PID" || true
    forget_pid "$FUSE_PID"
}
# The block device exported at URI as an ext4 mount at DIR/mnt (nbdfuse, then a loop mount).
attach() { # uri dir
    nbd_file "$1" "$2"
    mkdir -p "$2/mnt"
    do_mount -o loop,noatime "$2/fuse/disk" "$2/mnt"
}
detach() { # dir
    do_umount "$1/mnt"
    nbd_file_close "$1"
}
# A live file (thinlayer serve --files) as an ext4 mount at DIR/mnt: a loop mount, no NBD hop.
live_attach() { # file dir [dio]
    mkdir -p "$2/mnt"
    do_mount -o loop,noatime "$1" "$2/mnt"
    # dio: the loop device reads and writes the file with O_DIRECT (LOOP_SET_DIRECT_IO), so it
    # keeps several requests in flight instead of one buffered request at a time.
    if [[ ${3:-} == dio ]]; then losetup --direct-io=on "$(findmnt -no SOURCE "$2/mnt")"; fi
}

# nbdkit's cow filter keeps its overlay in an unlinked file under TMPDIR: its allocated bytes,
# found through the server's open descriptors.
cow_bytes() { # nbdkit-pid tmpdir
    local fd total=0
    for fd in /proc/"$1"/fd/*; do
        [[ $(readlink "$fd") == "$2/"* ]] || continue
        total=$((total + $(stat -L -c '%b * %B' "$fd")))
    done
    echo "$total"
}

# Results: `add KEY VALUE` appends one sample; `save_results` writes KEY=v1 v2 ... lines to
# WORK/results for the table script, which reports medians.
declare -A R
add() { R[$1]="${R[$1]:-} $2"; }
save_results() {
    local k
    for k in "${!R[@]}"; do printf '%s=%s\n' "$k" "${R[$k]}"; done >"$WORK/results"
}

# --- thinlayer binaries ---------------------------------------------------------------------
# `--binary [LABEL=]PATH` (repeatable) goes to binary_arg; binaries_ready then checks them
# (default: target/release/thinlayer, built if missing) and sets TLS, one target key tl:LABEL per
# binary, BIN[key] its path. Each binary gets its own pool WORK/pool-LABEL: an old and a new
# binary may not share an on-disk format.
BINS=() LABELS=() TLS=()
declare -A BIN SERVER_NICE
binary_arg() {
    BINS+=("${1#*=}")
    if [[ $1 == *=* ]]; then LABELS+=("${1%%=*}"); else LABELS+=(""); fi
}
binaries_ready() { # repository root
    local i
    if ((${#BINS[@]} == 0)); then
        BINS=("$1/target/release/thinlayer") LABELS=(thinlayer)
        if [[ ! -x ${BINS[0]} ]]; then
            log "building thinlayer"
            (cd "$1" && cargo build --release >&2)
        fi
    fi
    for i in "${!BINS[@]}"; do
        [[ -x ${BINS[i]} ]] || die "no thinlayer binary at ${BINS[i]}"
        [[ -n ${LABELS[i]} ]] || LABELS[i]=tl$((i + 1))
        [[ ${LABELS[i]} =~ ^[A-Za-z0-9_-]+$ ]] || die "label ${LABELS[i]}: letters, digits, - and _ only"
        TLS+=("tl:${LABELS[i]}")
        BIN[tl:${LABELS[i]}]=$(realpath "${BINS[i]}")
    done
}
# tl_on TARGET ARGS...: the target's binary on its pool; any transport of binary LABEL (tl:LABEL,
# tlf:LABEL) shares that binary's pool.
tl_on() { "${BIN[tl:${1#*:}]}" --pool "$WORK/pool-${1#*:}" "${@:2}"; }

# --- containers -----------------------------------------------------------------------------
# ct_up TARGET IMAGE NAME: a fresh writable container on an image, served on a Unix socket.
# IMAGE names WORK/IMAGE.raw, imported beforehand as layer IMAGE into every thinlayer pool.
#   tl:LABEL  a child layer NAME of IMAGE, `thinlayer serve --export NAME`;
#   qemu      a qcow2 overlay over the raw file, qemu-nbd --cache=$QCACHE (default writeback:
#             FLUSH becomes fdatasync of the overlay);
#   nbdkit    nbdkit --filter=cow file (its overlay is a temporary file, its FLUSH syncs nothing).
# Sets SRV (server PID), URI and CUR (what holds the container's data). ct_space TARGET: bytes
# the container holds now (while it is up); ct_down TARGET: stop the server, drop the container.
QCACHE=${QCACHE:-writeback}
SRV= URI= CUR=
ct_up() {
    local t=$1 image=$2 name=$3 sock=$WORK/${1/:/-}.sock
    rm -f "$sock"
    case $t in
    tl:*)
        CUR=$name
        tl_on "$t" create "$CUR" --parent "$image" >/dev/null
        bg_start "$WORK/${t/:/-}-serve.log" "${BIN[$t]}" --pool "$WORK/pool-${t#tl:}" serve \
            --socket "$sock" --export "$CUR"
        URI=$(uri "$sock" "$CUR") ;;
    tlf:* | tlfd:* | tlfs:*)
        # Live files: the server's own FUSE file for the layer (`serve --files`); URI is the
        # file's path, for a loop mount (live_attach; tlfd: the loop device switched to
        # direct I/O by losetup, tlfs: by the server, `serve --loop-direct-io`).
        CUR=$name
        tl_on "$t" create "$CUR" --parent "$image" >/dev/null
        local more=() pre=()
        [[ $t == tlfs:* ]] && more=(--loop-direct-io)
        # SERVER_NICE[label]: the server's niceness, whatever the caller's (a node's daemon is
        # not niced with the workload).
        [[ -n ${SERVER_NICE[${t#*:}]:-} ]] && pre=(nice -n $((SERVER_NICE[${t#*:}] - $(nice))))
        bg_start "$WORK/${t/:/-}-serve.log" "${pre[@]}" "${BIN[tl:${t#*:}]}" \
            --pool "$WORK/pool-${t#*:}" serve --socket "$sock" --files "$WORK/${t/:/-}-files" \
            "${more[@]}"
        wait_for -S "$WORK/pool-${t#*:}.ctl"
        URI=$(tl_on "$t" attach "$CUR") ;;
    qemu)
        CUR=$WORK/$name.qcow2
        qemu-img create -q -f qcow2 -b "$WORK/$image.raw" -F raw "$CUR"
        bg_start "$WORK/qemu-nbd.log" qemu-nbd --persistent --shared=4 --format=qcow2 \
            --cache="$QCACHE" --aio=threads --socket="$sock" --export-name=c "$CUR"
        URI=$(uri "$sock" c) ;;
    nbdkit)
        CUR=$WORK/cowtmp
        mkdir -p "$CUR"
        TMPDIR=$CUR bg_start "$WORK/nbdkit.log" nbdkit --foreground --unix "$sock" \
            --filter=cow file "$WORK/$image.raw"
        URI=$(uri "$sock" "") ;;
    *) die "unknown target $t" ;;
    esac
    SRV=$BG
    wait_for -S "$sock"
}
ct_space() {
    case $1 in
    tl:* | tlf:* | tlfd:* | tlfs:*) tl_on "$1" ls --json | jq ".[] | select(.name == \"$CUR\") | .size" ;;
    qemu) on_disk "$CUR" ;;
    nbdkit) cow_bytes "$SRV" "$CUR" ;;
    esac
}
ct_down() {
    case $1 in
    tl:*)
        bg_stop "$SRV" strict
        tl_on "$1" rm "$CUR" >/dev/null ;;
    tlf:* | tlfd:* | tlfs:*)
        tl_on "$1" detach "$CUR" >/dev/null
        bg_stop "$SRV" strict
        tl_on "$1" rm "$CUR" >/dev/null ;;
    qemu) bg_stop "$SRV"; rm -f "$CUR" ;;
    nbdkit) bg_stop "$SRV"; rm -rf "$CUR" ;;
    esac
}
ct_label() {
    case $1 in
    tl:*) echo "${1#tl:}" ;;
    tlf:*) echo "${1#tlf:} (live file)" ;;
    tlfd:*) echo "${1#tlfd:} (live file, loop dio)" ;;
    tlfs:*) echo "${1#tlfs:} (live file, --loop-direct-io)" ;;
    qemu) echo "qemu-nbd qcow2 ($QCACHE)" ;;
    nbdkit) echo "nbdkit cow" ;;
    *) echo "$1" ;;
    esac
}
rotated() { # round target...: the targets rotated by round, so none always goes first
    local r=$1 n i
    shift
    n=$#
    local all=("$@")
    for ((i = 0; i < n; i++)); do echo "${all[(i + r) % n]}"; done
}
