/*
 * nbd-reconnect: attaches an NBD export to a kernel nbd device and keeps it attached across a
 * restart of the server, which nbd-client 3.24 does not do.
 *
 *   nbd-reconnect SOCKET EXPORT /dev/nbdN
 *
 * Connects to the Unix socket SOCKET, negotiates EXPORT (fixed newstyle, NBD_OPT_EXPORT_NAME),
 * and configures the device over the nbd generic netlink family (NBD_CMD_CONNECT) with a
 * dead-connection timeout: when the connection dies, the kernel keeps the device and holds its
 * requests for up to DEAD_CONN_SECONDS instead of failing them. Prints "ATTACHED /dev/nbdN" and
 * stays running; when the connection ends (its copy of the socket sees the peer hang up or
 * the kernel shut it down, or the kernel sends the NBD_CMD_LINK_DEAD multicast), it connects again with back-off, negotiates again and hands the new socket to the device with
 * NBD_CMD_RECONFIGURE. Each reconnection prints "RECONNECTED /dev/nbdN after N attempt(s), T ms"
 * (T: from noticing the dead connection to the kernel taking the new one).
 *
 * Requests the kernel had sent on the dead connection are sent again only when their timeout
 * (NBD_ATTR_TIMEOUT, IO_TIMEOUT_SECONDS) expires: with one connection and no timeout the kernel
 * would wait for their replies forever.
 *
 * Exits 1 with a message when the first attach fails or no reconnection succeeds within
 * DEAD_CONN_SECONDS. Built by tools/guest/build for the test guest; the kernel ABI is
 * include/uapi/linux/nbd-netlink.h and nbd.h, spelled out below (the guest has no headers).
 */
#define _GNU_SOURCE /* POLLRDHUP */
#include <errno.h>
#include <fcntl.h>
#include <linux/genetlink.h>
#include <linux/netlink.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <endian.h>

/* include/uapi/linux/nbd-netlink.h */
enum { NBD_ATTR_INDEX = 1, NBD_ATTR_SIZE_BYTES, NBD_ATTR_BLOCK_SIZE_BYTES, NBD_ATTR_TIMEOUT,
       NBD_ATTR_SERVER_FLAGS, NBD_ATTR_CLIENT_FLAGS, NBD_ATTR_SOCKETS, NBD_ATTR_DEAD_CONN_TIMEOUT };
enum { NBD_SOCK_ITEM = 1 };
enum { NBD_SOCK_FD = 1 };
enum { NBD_CMD_CONNECT = 1, NBD_CMD_DISCONNECT, NBD_CMD_RECONFIGURE, NBD_CMD_LINK_DEAD };
#define NBD_GENL_VERSION 1

#define DEAD_CONN_SECONDS 120
#define IO_TIMEOUT_SECONDS 10
#define NEGOTIATION_SECONDS 5

static const char *sock_path, *export_name, *dev;
static unsigned index_;

static void die(const char *what)
{
    fprintf(stderr, "nbd-reconnect %s: %s: %s\n", dev, what, errno ? strerror(errno) : "failed");
    exit(1);
}

static int read_all(int fd, void *buf, size_t len)
{
    for (size_t got = 0; got < len;) {
        ssize_t n = read(fd, (char *)buf + got, len - got);
        if (n <= 0)
            return -1;
        got += n;
    }
    return 0;
}

static int write_all(int fd, const void *buf, size_t len)
{
    return write(fd, buf, len) == (ssize_t)len ? 0 : -1;
}

/* A connected, negotiated socket, or -1 (errno set, or 0 for a protocol error). */
static int nbd_connect(uint64_t *size, uint16_t *flags)
{
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    strncpy(a.sun_path, sock_path, sizeof a.sun_path - 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
        goto fail;
    /* A negotiation that hangs (a relay whose far side never answers) is one failed attempt,
     * not the end of the reconnection: the next attempt gets another connection. */
    struct timeval limit = { .tv_sec = NEGOTIATION_SECONDS };
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit) < 0)
        goto fail;
    char hello[18];
    errno = 0;
    if (read_all(fd, hello, 18) || memcmp(hello, "NBDMAGICIHAVEOPT", 16))
        goto fail;
    uint16_t sflags = be16toh(*(uint16_t *)(hello + 16));
    uint32_t cflags = htobe32(sflags & 3); /* FIXED_NEWSTYLE, NO_ZEROES as offered */
    uint32_t nlen = strlen(export_name);
    struct __attribute__((packed)) { uint64_t magic; uint32_t opt, len; } o = {
        htobe64(0x49484156454F5054ULL), htobe32(1 /* NBD_OPT_EXPORT_NAME */), htobe32(nlen) };
    if (write_all(fd, &cflags, 4) || write_all(fd, &o, sizeof o) || write_all(fd, export_name, nlen))
        goto fail;
    char reply[10 + 124];
    if (read_all(fd, reply, (sflags & 2) ? 10 : sizeof reply))
        goto fail;
    *size = be64toh(*(uint64_t *)reply);
    *flags = be16toh(*(uint16_t *)(reply + 8));
    /* The kernel reads this socket from now on, and a receive timeout would fail its reads
     * of replies that are merely slow. */
    limit.tv_sec = 0;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit) < 0)
        goto fail;
    return fd;
fail:
    if (fd >= 0)
        close(fd);
    return -1;
}

/* Generic netlink: one message built in a buffer, attributes appended. */
struct msg { char buf[512]; size_t len; };

static void msg_init(struct msg *m, uint16_t type, uint8_t cmd, uint8_t version)
{
    memset(m, 0, sizeof *m);
    struct nlmsghdr *h = (void *)m->buf;
    h->nlmsg_type = type;
    h->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
    struct genlmsghdr *g = (void *)(m->buf + NLMSG_HDRLEN);
    g->cmd = cmd;
    g->version = version;
    m->len = NLMSG_HDRLEN + GENL_HDRLEN;
}

static struct nlattr *attr(struct msg *m, uint16_t type, const void *data, size_t len)
{
    struct nlattr *a = (void *)(m->buf + m->len);
    a->nla_type = type;
    a->nla_len = NLA_HDRLEN + len;
    if (data)
        memcpy((char *)a + NLA_HDRLEN, data, len);
    m->len += NLA_ALIGN(a->nla_len);
    return a;
}

static void attr_u32(struct msg *m, uint16_t t, uint32_t v) { attr(m, t, &v, 4); }
static void attr_u64(struct msg *m, uint16_t t, uint64_t v) { attr(m, t, &v, 8); }

/* Nested NBD_ATTR_SOCKETS { NBD_SOCK_ITEM { NBD_SOCK_FD } }. */
static void attr_socket(struct msg *m, int fd)
{
    struct nlattr *socks = attr(m, NBD_ATTR_SOCKETS | NLA_F_NESTED, NULL, 0);
    struct nlattr *item = attr(m, NBD_SOCK_ITEM | NLA_F_NESTED, NULL, 0);
    attr_u32(m, NBD_SOCK_FD, fd);
    item->nla_len = m->buf + m->len - (char *)item;
    socks->nla_len = m->buf + m->len - (char *)socks;
}

/* Sends the message and reads the answer into r; returns 0 or the kernel's negative errno. */
static int request(int nl, struct msg *m, struct msg *r)
{
    ((struct nlmsghdr *)m->buf)->nlmsg_len = m->len;
    if (send(nl, m->buf, m->len, 0) < 0)
        return -errno;
    for (;;) {
        ssize_t n = recv(nl, r->buf, sizeof r->buf, 0);
        if (n < 0)
            return -errno;
        for (struct nlmsghdr *h = (void *)r->buf; NLMSG_OK(h, n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_type == NLMSG_ERROR)
                return ((struct nlmsgerr *)NLMSG_DATA(h))->error;
            if (r != m) {
                memmove(r->buf, h, h->nlmsg_len);
                r->len = h->nlmsg_len;
                /* The ACK follows; read it too. */
                r = m;
            }
        }
    }
}

/* The attribute of type t among those starting at p (len bytes), or NULL. */
static struct nlattr *find(void *p, size_t len, uint16_t t)
{
    for (struct nlattr *a = p; len >= NLA_HDRLEN && a->nla_len >= NLA_HDRLEN && a->nla_len <= len;
         len -= NLA_ALIGN(a->nla_len), a = (void *)((char *)a + NLA_ALIGN(a->nla_len)))
        if ((a->nla_type & NLA_TYPE_MASK) == t)
            return a;
    return NULL;
}
#define ATTR_DATA(a) ((char *)(a) + NLA_HDRLEN)
#define ATTR_LEN(a) ((a)->nla_len - NLA_HDRLEN)

/* The nbd family's id, and the id of its multicast group in *group. */
static uint16_t nbd_family(int nl, uint32_t *group)
{
    struct msg m, r;
    msg_init(&m, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
    attr(&m, CTRL_ATTR_FAMILY_NAME, "nbd", 4);
    int e = request(nl, &m, &r);
    if (e) {
        errno = -e;
        die("no nbd generic netlink family (is the nbd module loaded?)");
    }
    char *attrs = r.buf + NLMSG_HDRLEN + GENL_HDRLEN;
    size_t alen = r.len - NLMSG_HDRLEN - GENL_HDRLEN;
    struct nlattr *id = find(attrs, alen, CTRL_ATTR_FAMILY_ID);
    struct nlattr *groups = find(attrs, alen, CTRL_ATTR_MCAST_GROUPS);
    struct nlattr *g = groups ? find(ATTR_DATA(groups), ATTR_LEN(groups), 1) : NULL;
    struct nlattr *gid = g ? find(ATTR_DATA(g), ATTR_LEN(g), CTRL_ATTR_MCAST_GRP_ID) : NULL;
    errno = 0;
    if (!id || !gid)
        die("the nbd family has no id or multicast group");
    *group = *(uint32_t *)ATTR_DATA(gid);
    return *(uint16_t *)ATTR_DATA(id);
}

static int link_dead_for_us(struct msg *r, uint16_t family)
{
    struct nlmsghdr *h = (void *)r->buf;
    if (h->nlmsg_type != family)
        return 0;
    struct genlmsghdr *g = NLMSG_DATA(h);
    if (g->cmd != NBD_CMD_LINK_DEAD)
        return 0;
    struct nlattr *i = find(r->buf + NLMSG_HDRLEN + GENL_HDRLEN,
                            h->nlmsg_len - NLMSG_HDRLEN - GENL_HDRLEN, NBD_ATTR_INDEX);
    return i && *(uint32_t *)ATTR_DATA(i) == index_;
}

int main(int argc, char **argv)
{
    if (argc != 4 || sscanf(argv[3], "/dev/nbd%u", &index_) != 1) {
        fprintf(stderr, "usage: nbd-reconnect SOCKET EXPORT /dev/nbdN\n");
        return 2;
    }
    sock_path = argv[1], export_name = argv[2], dev = argv[3];
    setvbuf(stdout, NULL, _IOLBF, 0);

    int nl = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
    if (nl < 0)
        die("netlink socket");
    uint32_t group;
    uint16_t family = nbd_family(nl, &group);
    /* Events on a socket of their own, so they never mix with the answers to requests. */
    int ev = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
    if (ev < 0 || setsockopt(ev, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group, sizeof group) < 0)
        die("joining the nbd multicast group");

    uint64_t size;
    uint16_t flags;
    int fd = nbd_connect(&size, &flags);
    if (fd < 0)
        die("connecting and negotiating");
    struct msg m, r;
    msg_init(&m, family, NBD_CMD_CONNECT, NBD_GENL_VERSION);
    attr_u32(&m, NBD_ATTR_INDEX, index_);
    attr_u64(&m, NBD_ATTR_SIZE_BYTES, size);
    attr_u64(&m, NBD_ATTR_BLOCK_SIZE_BYTES, 4096);
    attr_u64(&m, NBD_ATTR_SERVER_FLAGS, flags);
    attr_u64(&m, NBD_ATTR_TIMEOUT, IO_TIMEOUT_SECONDS);
    attr_u64(&m, NBD_ATTR_DEAD_CONN_TIMEOUT, DEAD_CONN_SECONDS);
    attr_socket(&m, fd);
    int e = request(nl, &m, &r);
    if (e) {
        errno = -e;
        die("NBD_CMD_CONNECT");
    }
    /* Our copy of the socket tells when the connection ends (the peer closed it, or the kernel
     * shut it down), besides the kernel's NBD_CMD_LINK_DEAD event. */
    printf("ATTACHED %s\n", dev);

    for (;;) {
        struct pollfd p[2] = { { ev, POLLIN, 0 }, { fd, POLLRDHUP, 0 } };
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        int dead = p[1].revents & (POLLRDHUP | POLLHUP | POLLERR);
        if (p[0].revents & POLLIN) {
            ssize_t n = recv(ev, r.buf, sizeof r.buf, MSG_DONTWAIT);
            if (n > 0 && link_dead_for_us(&r, family))
                dead = 1;
        }
        if (!dead)
            continue;
        close(fd);
        /* Back-off from 100 ms to 2 s; the server is back within the dead-connection timeout
         * or the device fails its requests anyway. */
        struct timespec start, now;
        clock_gettime(CLOCK_MONOTONIC, &start);
        long delay_ms = 100;
        for (int attempt = 1;; attempt++) {
            uint64_t s2;
            uint16_t f2;
            fd = nbd_connect(&s2, &f2);
            if (fd < 0)
                fprintf(stderr, "nbd-reconnect %s: attempt %d: connecting and negotiating: %s\n",
                        dev, attempt, errno ? strerror(errno) : "closed");
            if (fd >= 0) {
                msg_init(&m, family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION);
                attr_u32(&m, NBD_ATTR_INDEX, index_);
                attr_socket(&m, fd);
                e = request(nl, &m, &r);
                if (!e) {
                    clock_gettime(CLOCK_MONOTONIC, &now);
                    printf("RECONNECTED %s after %d attempt(s), %ld ms\n", dev, attempt,
                           (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000);
                    break;
                }
                fprintf(stderr, "nbd-reconnect %s: NBD_CMD_RECONFIGURE: %s\n", dev, strerror(-e));
                close(fd);
            }
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (now.tv_sec - start.tv_sec > DEAD_CONN_SECONDS) {
                errno = 0;
                die("no reconnection within the dead-connection timeout");
            }
            usleep(delay_ms * 1000);
            if (delay_ms < 2000)
                delay_ms *= 2;
        }
    }
}
