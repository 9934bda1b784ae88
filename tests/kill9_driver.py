# Drives writes and flushes into a thinlayer export through libnbd (a real NBD client) until
# the server dies, logging what was sent and what was acknowledged, for tests/kill9.rs.
#   B seq offset nblocks   a write is about to be sent (it may land or not)
#   A seq                  that write was acknowledged
#   F seq                  a FLUSH was acknowledged: every write with a smaller seq is durable
#   C                      connected (the test kills the server only after this)
import random
import sys

import nbd

uri, log_path, seed, blocks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
# How often a FLUSH, and a write with FUA, come (a kill then finds less acknowledged and
# unflushed): the rounds with the keeper flush rarely, so most kills leave a journal to replay.
flushes = float(sys.argv[5]) if len(sys.argv) > 5 else 0.08
fuas = float(sys.argv[6]) if len(sys.argv) > 6 else 0.1
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
log = open(log_path, "w", buffering=1)
log.write("C\n")
seq = 0
try:
    while True:
        if rng.random() < flushes:
            h.flush()
            log.write(f"F {seq}\n")
            continue
        n = rng.randint(1, 16)
        off = rng.randrange(0, blocks - n) * 4096
        tag = f"r{seed}w{seq}".encode().ljust(16, b".")
        log.write(f"B {seq} {off} {n}\n")
        if rng.random() < fuas:
            h.pwrite(tag * (256 * n), off, nbd.CMD_FLAG_FUA)
            log.write(f"A {seq}\nF {seq + 1}\n")
        else:
            h.pwrite(tag * (256 * n), off)
            log.write(f"A {seq}\n")
        seq += 1
except nbd.Error:
    pass  # the server was killed under us
