/*
 * The compiled load generator of benchmarks/raw_capacity.py, and a trivial
 * AoE echo target to measure the generator's own ceiling.
 *
 *   loadgen gen  --iface IF --rows seq:1:read,rand:max:write,... [--server-pid PID]
 *                [--duration S] [--warmup S] [--window N] [--initiators K]
 *                [--disk-sectors N] [--shelf N] [--slot N] [--spin N] [--rx mmsg|ring]
 *   loadgen echo --iface IF [--shelf N] [--slot N] [--bufcnt N] [--spin N] [--rx mmsg|ring]
 *
 * gen does what raw_capacity.py's Python --generator does: it discovers
 * e<shelf>.<slot> with a broadcast config query, then for each row keeps a
 * window of requests in flight (the target's advertised buffer count per
 * initiator, or --window) built from 2048 pre-built request frames reused
 * round robin (only the tag is patched in), matches replies by tag, and prints
 * one JSON line per row: IOPS, MB/s, p50/p99 latency of every request, its own
 * CPU and the server's (from /proc, the server and its children).  Unlike the
 * Python one it pays no system call per frame: it receives up to 256 frames
 * per recvmmsg() and sends each batch of new requests with one sendmmsg() that
 * bypasses the qdisc, and it sets PACKET_IGNORE_OUTGOING so its own requests
 * are not looped back to it.  Random LBAs come from a seeded xorshift
 * generator (the Python one uses random.Random: the same distribution, not
 * the same sequence).
 *
 * --rx ring receives through a PACKET_MMAP (TPACKET_V2) RX ring instead: no
 * system call at all while frames arrive, but on veth the copy into the ring
 * happens in the *sender's* softirq, so the server under test is charged for
 * copying its replies into the generator's ring (17-sector reads at MTU 9000
 * lost vblade up to half its MB/s that way).  recvmmsg, the default, leaves
 * that copy with the receiver, as a plain socket (vblade, the Python
 * generator) does, at about the same ceiling.
 *
 * echo answers every AoE ATA request for its shelf.slot with a correct reply
 * header (status DRDY, LBA and count echoed), reads with zeroed data and
 * writes with the header alone, and config queries with --bufcnt; no disk.
 * It is the server with (almost) no cost of its own, so what the generator
 * reaches against it is the generator's (and the machine's) ceiling.
 *
 * Both modes poll() only when nothing is waiting (after --spin empty looks,
 * default 0), so their CPU use says how busy they are.
 *
 * Built by benchcommon.loadgen_binary() with `cc -O2`; Linux only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <math.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef PACKET_QDISC_BYPASS
#define PACKET_QDISC_BYPASS 20
#endif
#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif

#define ETHERTYPE_AOE 0x88A2
#define SECTOR 512
#define AOE_HDR 24          /* Ethernet (14) + AoE (10) */
#define ATA_HDR 36          /* + ATA argument (12) */
#define TEMPLATES 2048      /* pre-built request frames per row */
#define MAX_BATCH 1024      /* sendmmsg vlen limit (UIO_MAXIOV) */
#define RX_BATCH 256        /* frames per recvmmsg (--rx mmsg) */
#define FLAG_RESPONSE 0x08
#define FLAG_ERROR 0x04
#define READ_EXT 0x24
#define WRITE_EXT 0x34
#define AFLAG_E 0x40
#define AFLAG_W 0x01

static void die(const char *what)
{
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void fail(const char *msg)
{
    fprintf(stderr, "loadgen: %s\n", msg);
    exit(2);
}

static inline double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static void own_cpu(double *user, double *sys)
{
    struct timespec ts;
    /* Split user/system from /proc/self/stat; the total from the precise clock. */
    FILE *f = fopen("/proc/self/stat", "r");
    unsigned long ut = 0, st = 0;
    if (f) {
        char buf[1024];
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        buf[n] = 0;
        fclose(f);
        char *p = strrchr(buf, ')');
        if (p)
            sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st);
    }
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    double total = ts.tv_sec + ts.tv_nsec * 1e-9;
    double tck = sysconf(_SC_CLK_TCK);
    *sys = st / tck;
    *user = total - *sys;
    (void)ut;
}

/* (user, system) CPU seconds of pid and its live children (the workers), like benchcommon. */
static void cpu_split(int pid, double *user, double *sys)
{
    char path[128], buf[2048];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = 0;
    fclose(f);
    char *p = strrchr(buf, ')');
    unsigned long ut = 0, st = 0;
    if (p && sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) == 2) {
        double tck = sysconf(_SC_CLK_TCK);
        *user += ut / tck;
        *sys += st / tck;
    }
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    DIR *d = opendir(path);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char cpath[300];
        snprintf(cpath, sizeof cpath, "/proc/%d/task/%s/children", pid, e->d_name);
        FILE *c = fopen(cpath, "r");
        if (!c)
            continue;
        int child;
        while (fscanf(c, "%d", &child) == 1)
            cpu_split(child, user, sys);
        fclose(c);
    }
    closedir(d);
}

/* ------------------------------------------------------------------------ */
/* The socket: a TPACKET_V2 RX ring, sendmmsg for sending                    */

struct sock {
    int fd;
    int ifindex;
    int mtu;
    uint8_t mac[6];
    uint8_t *ring; /* NULL: receive with recvmmsg into bufs instead */
    unsigned frame_size, frame_nr, head;
    uint64_t ring_bytes;
    uint8_t *bufs;
    size_t buf_size;
    unsigned ridx, rcount;
    struct mmsghdr rmsgs[RX_BATCH];
    struct iovec riov[RX_BATCH];
};

static void sock_open(struct sock *s, const char *iface, int use_ring)
{
    memset(s, 0, sizeof *s);
    s->fd = socket(AF_PACKET, SOCK_RAW, htons(ETHERTYPE_AOE));
    if (s->fd < 0)
        die("socket(AF_PACKET)");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", iface);
    if (ioctl(s->fd, SIOCGIFINDEX, &ifr) < 0)
        die(iface);
    s->ifindex = ifr.ifr_ifindex;
    if (ioctl(s->fd, SIOCGIFMTU, &ifr) < 0)
        die("SIOCGIFMTU");
    s->mtu = ifr.ifr_mtu;
    if (ioctl(s->fd, SIOCGIFHWADDR, &ifr) < 0)
        die("SIOCGIFHWADDR");
    memcpy(s->mac, ifr.ifr_hwaddr.sa_data, 6);

    if (!use_ring) {
        /* recvmmsg: the kernel queues the skbs; we copy them out in our own system call. */
        int rcvbuf = 8 << 20;
        if (setsockopt(s->fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) < 0)
            setsockopt(s->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
        s->buf_size = (14 + (size_t)s->mtu + 64 + 63) & ~(size_t)63;
        s->bufs = malloc(RX_BATCH * s->buf_size);
        if (!s->bufs)
            fail("out of memory");
        for (unsigned i = 0; i < RX_BATCH; i++) {
            s->riov[i].iov_base = s->bufs + i * s->buf_size;
            s->riov[i].iov_len = s->buf_size;
            s->rmsgs[i].msg_hdr.msg_iov = &s->riov[i];
            s->rmsgs[i].msg_hdr.msg_iovlen = 1;
        }
        goto options;
    }
    int v = TPACKET_V2;
    if (setsockopt(s->fd, SOL_PACKET, PACKET_VERSION, &v, sizeof v) < 0)
        die("PACKET_VERSION");
    /* A slot holds the tpacket header, padding and a full frame: 2 KiB at 1500, 16 KiB at 9000. */
    unsigned need = TPACKET2_HDRLEN + 16 + 14 + s->mtu + 64;
    unsigned fs = 2048;
    while (fs < need)
        fs <<= 1;
    unsigned block = fs > 65536 ? fs : 65536;
    unsigned total = 16u << 20; /* 16 MiB: thousands of frames in flight without loss */
    struct tpacket_req req = {
        .tp_block_size = block,
        .tp_block_nr = total / block,
        .tp_frame_size = fs,
        .tp_frame_nr = (total / block) * (block / fs),
    };
    if (setsockopt(s->fd, SOL_PACKET, PACKET_RX_RING, &req, sizeof req) < 0)
        die("PACKET_RX_RING");
    s->frame_size = fs;
    s->frame_nr = req.tp_frame_nr;
    s->ring_bytes = (uint64_t)req.tp_block_size * req.tp_block_nr;
    s->ring = mmap(NULL, s->ring_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   s->fd, 0);
    if (s->ring == MAP_FAILED)
        die("mmap(ring)");
options:;
    int one = 1;
    /* Best effort: not every kernel has them; the generator still works without. */
    setsockopt(s->fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one);
    setsockopt(s->fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one);
    int sndbuf = 8 << 20;
    setsockopt(s->fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    struct sockaddr_ll sll = {
        .sll_family = AF_PACKET,
        .sll_protocol = htons(ETHERTYPE_AOE),
        .sll_ifindex = s->ifindex,
    };
    if (bind(s->fd, (struct sockaddr *)&sll, sizeof sll) < 0)
        die("bind");
}

/* The next received frame (data, length), or NULL if none is waiting. */
static inline uint8_t *ring_peek(struct sock *s, unsigned *len, int *truncated)
{
    if (!s->ring) {
        if (s->ridx == s->rcount) {
            /* The headers were set up once (sock_open); the kernel only writes lengths and flags. */
            int r = recvmmsg(s->fd, s->rmsgs, RX_BATCH, MSG_DONTWAIT | MSG_TRUNC, NULL);
            if (r <= 0) {
                if (r < 0 && errno != EAGAIN && errno != EINTR)
                    die("recvmmsg");
                return NULL;
            }
            s->ridx = 0;
            s->rcount = r;
        }
        struct mmsghdr *m = &s->rmsgs[s->ridx];
        *len = m->msg_len;
        *truncated = (m->msg_hdr.msg_flags & MSG_TRUNC) || m->msg_len > s->buf_size;
        if (*len > s->buf_size)
            *len = s->buf_size;
        return s->bufs + (size_t)s->ridx * s->buf_size;
    }
    struct tpacket2_hdr *h = (struct tpacket2_hdr *)(s->ring + (uint64_t)s->head * s->frame_size);
    uint32_t status = __atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE);
    if (!(status & TP_STATUS_USER))
        return NULL;
    *len = h->tp_snaplen;
    *truncated = h->tp_snaplen < h->tp_len;
    return (uint8_t *)h + h->tp_mac;
}

/* Frames the kernel dropped (ring or queue full) since the last call (PACKET_STATISTICS). */
static unsigned ring_drops(struct sock *s)
{
    struct tpacket_stats st = {0};
    socklen_t len = sizeof st;
    if (getsockopt(s->fd, SOL_PACKET, PACKET_STATISTICS, &st, &len) < 0)
        return 0;
    return st.tp_drops;
}

static inline void ring_release(struct sock *s)
{
    if (!s->ring) {
        s->ridx++;
        return;
    }
    struct tpacket2_hdr *h = (struct tpacket2_hdr *)(s->ring + (uint64_t)s->head * s->frame_size);
    __atomic_store_n(&h->tp_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
    s->head = s->head + 1 == s->frame_nr ? 0 : s->head + 1;
}

/*
 * Wait up to timeout_ms for the ring to hold a frame; 0 on timeout.  A socket
 * error (the interface went away: its namespace was deleted) ends the program
 * rather than spinning on a poll() that returns POLLERR at once forever.
 */
static int ring_wait(struct sock *s, int timeout_ms)
{
    struct pollfd p = {.fd = s->fd, .events = POLLIN};
    for (;;) {
        int r = poll(&p, 1, timeout_ms);
        if (r < 0) {
            if (errno == EINTR)
                return 0;
            die("poll");
        }
        if (r > 0 && (p.revents & (POLLERR | POLLHUP | POLLNVAL))) {
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            errno = err ? err : EIO;
            die("socket error (interface gone?)");
        }
        return r;
    }
}

struct batch {
    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iov[MAX_BATCH];
    unsigned n;
};

static void batch_flush(struct sock *s, struct batch *b)
{
    unsigned done = 0;
    while (done < b->n) {
        int r = sendmmsg(s->fd, b->msgs + done, b->n - done, 0);
        if (r < 0) {
            if (errno == EINTR || errno == ENOBUFS || errno == EAGAIN)
                continue;
            die("sendmmsg");
        }
        if (r == 0) {
            errno = EIO;
            die("sendmmsg sent nothing");
        }
        done += r;
    }
    b->n = 0;
}

static inline void batch_add(struct sock *s, struct batch *b, void *frame, size_t len)
{
    if (b->n == MAX_BATCH)
        batch_flush(s, b);
    b->iov[b->n].iov_base = frame;
    b->iov[b->n].iov_len = len;
    memset(&b->msgs[b->n].msg_hdr, 0, sizeof b->msgs[b->n].msg_hdr);
    b->msgs[b->n].msg_hdr.msg_iov = &b->iov[b->n];
    b->msgs[b->n].msg_hdr.msg_iovlen = 1;
    b->n++;
}

static inline uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24;
    p[1] = v >> 16;
    p[2] = v >> 8;
    p[3] = v;
}

static void aoe_header(uint8_t *f, const uint8_t *dst, const uint8_t *src, int shelf, int slot,
                       int cmd, uint32_t tag)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    f[12] = ETHERTYPE_AOE >> 8;
    f[13] = ETHERTYPE_AOE & 0xff;
    f[14] = 0x10; /* version 1, no flags */
    f[15] = 0;
    f[16] = shelf >> 8;
    f[17] = shelf & 0xff;
    f[18] = slot;
    f[19] = cmd;
    put_be32(f + 20, tag);
}

/* ------------------------------------------------------------------------ */
/* Options                                                                  */

struct opts {
    const char *iface, *rows;
    int server_pid, window, initiators, shelf, slot, bufcnt, spin, ring;
    long disk_sectors;
    double duration, warmup;
};

static void parse(int argc, char **argv, struct opts *o)
{
    *o = (struct opts){.duration = 3, .warmup = 0.5, .initiators = 1, .slot = 1,
                       .bufcnt = 64, .disk_sectors = (64 << 20) / SECTOR};
    for (int i = 2; i < argc; i++) {
        const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            fail("option without a value");
        i++;
        if (!strcmp(k, "--iface")) o->iface = v;
        else if (!strcmp(k, "--rows")) o->rows = v;
        else if (!strcmp(k, "--server-pid")) o->server_pid = atoi(v);
        else if (!strcmp(k, "--window")) o->window = atoi(v);
        else if (!strcmp(k, "--initiators")) o->initiators = atoi(v);
        else if (!strcmp(k, "--shelf")) o->shelf = atoi(v);
        else if (!strcmp(k, "--slot")) o->slot = atoi(v);
        else if (!strcmp(k, "--bufcnt")) o->bufcnt = atoi(v);
        else if (!strcmp(k, "--spin")) o->spin = atoi(v);
        else if (!strcmp(k, "--rx")) {
            if (strcmp(v, "ring") && strcmp(v, "mmsg"))
                fail("--rx: ring or mmsg");
            o->ring = !strcmp(v, "ring");
        }
        else if (!strcmp(k, "--disk-sectors")) o->disk_sectors = atol(v);
        else if (!strcmp(k, "--duration")) o->duration = atof(v);
        else if (!strcmp(k, "--warmup")) o->warmup = atof(v);
        else {
            fprintf(stderr, "loadgen: unknown option %s\n", k);
            exit(2);
        }
    }
    if (!o->iface)
        fail("--iface is required");
    if (o->initiators < 1 || o->initiators > 250)
        fail("--initiators must be 1-250");
}

/* ------------------------------------------------------------------------ */
/* The generator                                                            */

static uint64_t rng_state;

static inline uint64_t rng_next(void)
{
    uint64_t x = rng_state; /* xorshift64* */
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static inline uint64_t rng_below(uint64_t n)
{
    return rng_next() % n;
}

struct target {
    uint8_t mac[6];
    int bufcnt, scnt;
};

static void discover(struct sock *s, const struct opts *o, struct target *t)
{
    uint8_t q[60] = {0};
    static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    aoe_header(q, bcast, s->mac, 0xFFFF, 0xFF, 1, 0x5A5A);
    double deadline = now_s() + 30;
    while (now_s() < deadline) {
        if (send(s->fd, q, sizeof q, 0) < 0)
            die("send(config query)");
        double end = now_s() + 0.2;
        while (now_s() < end) {
            unsigned len;
            int trunc;
            uint8_t *f = ring_peek(s, &len, &trunc);
            if (!f) {
                int left = (int)((end - now_s()) * 1000) + 1;
                if (!ring_wait(s, left))
                    break;
                continue;
            }
            int ok = len >= 32 && f[12] == 0x88 && f[13] == 0xa2 && (f[14] & FLAG_RESPONSE) &&
                     f[19] == 1 && (f[16] << 8 | f[17]) == o->shelf && f[18] == o->slot;
            if (ok) {
                memcpy(t->mac, f + 6, 6);
                t->bufcnt = f[24] << 8 | f[25];
                t->scnt = f[28];
            }
            ring_release(s);
            if (ok)
                return;
        }
    }
    fprintf(stderr, "generator: e%d.%d did not answer a config query in 30 s\n", o->shelf, o->slot);
    exit(1);
}

struct slot {
    uint32_t tag; /* 0: free */
    uint32_t tmpl;
    uint64_t sent_ns;
};

struct result {
    double iops, mbps, p50_us, p99_us, gen_cpu, gen_sys, server_cpu, server_sys;
    uint64_t requests, errors, retransmits, stray, ring_drops;
};

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static void drive(struct sock *s, const struct opts *o, const struct target *t, uint8_t *frames,
                  size_t fstride, size_t flen, int window, int sectors, struct result *res)
{
    /* Tags: the low 16 bits are the slot in flight, the rest a sequence number. */
    unsigned nslots = 1;
    while (nslots < (unsigned)window)
        nslots <<= 1;
    struct slot *slots = calloc(nslots, sizeof *slots);
    unsigned *freelist = malloc(nslots * sizeof *freelist);
    unsigned nfree = 0;
    for (unsigned i = nslots; i-- > 0;)
        freelist[nfree++] = i;
    size_t lat_cap = 1 << 20, lat_n = 0;
    uint32_t *lat = malloc(lat_cap * sizeof *lat);
    static struct batch b;
    b.n = 0;
    unsigned pending[MAX_BATCH]; /* slots queued in the batch, stamped at flush */
    unsigned npending = 0;
    uint32_t seq = 1;
    unsigned nxt = 0;
    int inflight = 0;
    uint64_t errors = 0, retransmits = 0, stray = 0;
    int measuring = 0, sending = 1;
    uint64_t t0 = now_ns();
    uint64_t measure_from = t0 + (uint64_t)(o->warmup * 1e9);
    uint64_t stop_at = measure_from + (uint64_t)(o->duration * 1e9);
    uint64_t m_start = 0, m_end = 0;
    double cu0 = 0, cs0 = 0, cu1 = 0, cs1 = 0, su0 = 0, ss0 = 0, su1 = 0, ss1 = 0;
    int spins = 0;

#define FLUSH()                                                              \
    do {                                                                     \
        uint64_t ts_ = now_ns();                                             \
        for (unsigned k_ = 0; k_ < npending; k_++)                           \
            slots[pending[k_]].sent_ns = ts_;                                \
        npending = 0;                                                        \
        batch_flush(s, &b);                                                  \
    } while (0)

#define ISSUE()                                                              \
    do {                                                                     \
        unsigned sl_ = freelist[--nfree];                                    \
        uint8_t *f_ = frames + (size_t)nxt * fstride;                        \
        uint32_t tag_ = ((seq++ << 16) | sl_) & 0x7FFFFFFF;                  \
        if (!(tag_ >> 16)) tag_ = ((seq++ << 16) | sl_) & 0x7FFFFFFF;        \
        put_be32(f_ + 20, tag_);                                             \
        slots[sl_].tag = tag_;                                               \
        slots[sl_].tmpl = nxt;                                               \
        nxt = nxt + 1 == TEMPLATES ? 0 : nxt + 1;                            \
        if (b.n == MAX_BATCH) FLUSH();                                       \
        pending[npending++] = sl_;                                           \
        batch_add(s, &b, f_, flen);                                          \
        inflight++;                                                          \
    } while (0)

    ring_drops(s); /* reset the kernel's counter */
    for (int i = 0; i < window; i++)
        ISSUE();
    FLUSH();
    while (inflight > 0) {
        unsigned len;
        int trunc;
        uint8_t *f = ring_peek(s, &len, &trunc);
        if (!f) {
            if (b.n)
                FLUSH();
            if (spins < o->spin) {
                spins++;
                continue;
            }
            spins = 0;
            if (!ring_wait(s, 250)) {
                /* Nothing for 250 ms: something was lost; send what is outstanding again. */
                for (unsigned k = 0; k < nslots; k++) {
                    if (!slots[k].tag)
                        continue;
                    uint8_t *tf = frames + (size_t)slots[k].tmpl * fstride;
                    put_be32(tf + 20, slots[k].tag);
                    retransmits++;
                    if (send(s->fd, tf, flen, 0) < 0 && errno != ENOBUFS)
                        die("send(retransmit)");
                }
                if (now_ns() > stop_at + 5000000000ULL)
                    break;
            }
            continue;
        }
        spins = 0;
        if (trunc || len < 28 || !(f[14] & FLAG_RESPONSE) || memcmp(f + 6, t->mac, 6)) {
            stray++;
            ring_release(s);
            continue;
        }
        uint32_t tag = get_be32(f + 20);
        struct slot *sl = &slots[tag & (nslots - 1)];
        if (!sl->tag || sl->tag != tag) {
            ring_release(s);
            continue;
        }
        int err = (len >= 28 && (f[27] & 0x01)) || (f[14] & FLAG_ERROR);
        ring_release(s);
        uint64_t now = now_ns();
        if (measuring) {
            if (lat_n == lat_cap) {
                lat_cap *= 2;
                lat = realloc(lat, lat_cap * sizeof *lat);
                if (!lat)
                    fail("out of memory");
            }
            uint64_t d = now - sl->sent_ns;
            lat[lat_n++] = d > 0xFFFFFFFFu ? 0xFFFFFFFFu : (uint32_t)d;
            errors += err;
            if (now >= stop_at) {
                measuring = 0;
                sending = 0;
                m_end = now;
                own_cpu(&cu1, &cs1);
                if (o->server_pid)
                    cpu_split(o->server_pid, &su1, &ss1);
            }
        } else if (sending && now >= measure_from) {
            measuring = 1;
            m_start = now;
            own_cpu(&cu0, &cs0);
            if (o->server_pid)
                cpu_split(o->server_pid, &su0, &ss0);
        }
        sl->tag = 0;
        freelist[nfree++] = (unsigned)(sl - slots);
        inflight--;
        if (sending)
            ISSUE();
    }
    if (b.n)
        FLUSH();
#undef ISSUE
#undef FLUSH
    double wall = (m_end - m_start) * 1e-9;
    if (wall < 1e-9)
        wall = 1e-9;
    qsort(lat, lat_n, sizeof *lat, cmp_u32);
    res->requests = lat_n;
    res->iops = lat_n / wall;
    res->mbps = lat_n * (double)sectors * SECTOR / wall / 1e6;
    res->p50_us = lat_n ? lat[lat_n / 2] / 1e3 : NAN;
    size_t i99 = lat_n * 99 / 100;
    if (lat_n && i99 > lat_n - 1)
        i99 = lat_n - 1;
    res->p99_us = lat_n ? lat[i99] / 1e3 : NAN;
    res->gen_cpu = ((cu1 + cs1) - (cu0 + cs0)) / wall;
    res->gen_sys = (cs1 - cs0) / wall;
    res->server_cpu = ((su1 + ss1) - (su0 + ss0)) / wall;
    res->server_sys = (ss1 - ss0) / wall;
    res->errors = errors;
    res->retransmits = retransmits;
    res->stray = stray;
    res->ring_drops = ring_drops(s);
    free(lat);
    free(slots);
    free(freelist);
}

static void json_num(const char *key, double v, int last)
{
    if (isnan(v))
        printf("\"%s\": NaN%s", key, last ? "" : ", ");
    else
        printf("\"%s\": %.17g%s", key, v, last ? "" : ", ");
}

static int generator(const struct opts *o)
{
    struct sock s;
    sock_open(&s, o->iface, o->ring);
    struct target t;
    discover(&s, o, &t);
    uint8_t sources[250][6];
    memcpy(sources[0], s.mac, 6);
    for (int n = 1; n < o->initiators; n++) {
        const uint8_t m[6] = {0x02, 0xA0, 0xE0, 0, 0, (uint8_t)n};
        memcpy(sources[n], m, 6);
    }
    int window = o->window ? o->window : t.bufcnt * o->initiators;
    if (window < 1 || window > TEMPLATES)
        fail("the window must be 1-2048 (the pre-built frames per row)");
    if (!o->rows)
        fail("--rows is required");
    char *rows = strdup(o->rows);
    char *save = NULL;
    int index = 0;
    for (char *row = strtok_r(rows, ",", &save); row; row = strtok_r(NULL, ",", &save), index++) {
        char pattern[16], size[16], op[16];
        if (sscanf(row, "%15[^:]:%15[^:]:%15s", pattern, size, op) != 3)
            fail("--rows: want pattern:size:op,...");
        int count = !strcmp(size, "1") ? 1 : t.scnt;
        if (count < 1)
            fail("the target advertises 0 sectors per request");
        int write = !strcmp(op, "write");
        size_t flen = ATA_HDR + (write ? (size_t)count * SECTOR : 0);
        if (flen < 60)
            flen = 60;
        size_t stride = (flen + 63) & ~(size_t)63;
        uint8_t *frames = calloc(TEMPLATES, stride);
        rng_state = 0x9E3779B97F4A7C15ULL * (index + 1);
        long nslots = o->disk_sectors / count;
        long start = rng_below(nslots);
        for (int i = 0; i < TEMPLATES; i++) {
            uint8_t *f = frames + (size_t)i * stride;
            long n = !strcmp(pattern, "rand") ? (long)rng_below(nslots) : (start + i) % nslots;
            uint64_t lba = (uint64_t)n * count;
            aoe_header(f, t.mac, sources[i % o->initiators], o->shelf, o->slot, 0, 0);
            f[24] = AFLAG_E | (write ? AFLAG_W : 0);
            f[25] = 0;
            f[26] = count;
            f[27] = write ? WRITE_EXT : READ_EXT;
            for (int k = 0; k < 6; k++)
                f[28 + k] = lba >> (8 * k);
            if (write)
                memset(f + ATA_HDR, 0xA5, (size_t)count * SECTOR);
        }
        struct result r;
        drive(&s, o, &t, frames, stride, flen, window, count, &r);
        free(frames);
        printf("{");
        json_num("iops", r.iops, 0);
        json_num("mbps", r.mbps, 0);
        json_num("p50_us", r.p50_us, 0);
        json_num("p99_us", r.p99_us, 0);
        json_num("gen_cpu", r.gen_cpu, 0);
        json_num("gen_sys", r.gen_sys, 0);
        json_num("server_cpu", r.server_cpu, 0);
        json_num("server_sys", r.server_sys, 0);
        printf("\"requests\": %llu, \"errors\": %llu, \"retransmits\": %llu, \"stray\": %llu, "
               "\"ring_drops\": %llu, ",
               (unsigned long long)r.requests, (unsigned long long)r.errors,
               (unsigned long long)r.retransmits, (unsigned long long)r.stray,
               (unsigned long long)r.ring_drops);
        printf("\"row\": [\"%s\", \"%s\", \"%s\"], \"sectors\": %d, \"window\": %d, "
               "\"bufcnt\": %d, \"generator\": \"c\", \"rx\": \"%s\"}\n",
               pattern, size, op, count, window, t.bufcnt, o->ring ? "ring" : "mmsg");
        fflush(stdout);
    }
    free(rows);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* The echo target                                                          */

static volatile sig_atomic_t stopping;

static void on_signal(int sig)
{
    (void)sig;
    stopping = 1;
}

static int echo(const struct opts *o)
{
    struct sock s;
    sock_open(&s, o->iface, o->ring);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    int scnt = (s.mtu - (ATA_HDR - 14)) / SECTOR; /* sectors a frame of the MTU holds */
    if (scnt > 255)
        scnt = 255;
    size_t maxlen = 14 + (size_t)s.mtu;
    size_t stride = (maxlen + 63) & ~(size_t)63;
    /* Reply buffers, zeroed once: only the first 36 bytes are ever written, so data stays 0. */
    uint8_t *out = calloc(MAX_BATCH, stride);
    static struct batch b;
    unsigned used = 0;
    int spins = 0;
    fprintf(stderr, "echo: e%d.%d on %s, MTU %d, %d sectors per request, buffer count %d\n",
            o->shelf, o->slot, o->iface, s.mtu, scnt, o->bufcnt);
    while (!stopping) {
        unsigned len;
        int trunc;
        uint8_t *f = ring_peek(&s, &len, &trunc);
        if (!f) {
            if (b.n) {
                batch_flush(&s, &b);
                used = 0;
            }
            if (spins < o->spin) {
                spins++;
                continue;
            }
            spins = 0;
            ring_wait(&s, 1000);
            continue;
        }
        spins = 0;
        int major = len >= AOE_HDR ? f[16] << 8 | f[17] : -1;
        int ours = len >= AOE_HDR && !trunc && !(f[14] & FLAG_RESPONSE) &&
                   (major == o->shelf || major == 0xFFFF) && (f[18] == o->slot || f[18] == 0xFF);
        if (ours && (f[19] == 0 || f[19] == 1)) {
            if (used == MAX_BATCH) {
                batch_flush(&s, &b);
                used = 0;
            }
            uint8_t *r = out + (size_t)used++ * stride;
            aoe_header(r, f + 6, s.mac, o->shelf, o->slot, f[19], get_be32(f + 20));
            r[14] = 0x10 | FLAG_RESPONSE;
            size_t rlen;
            if (f[19] == 1) { /* config query: buffer count, firmware, sectors, version */
                r[24] = o->bufcnt >> 8;
                r[25] = o->bufcnt & 0xff;
                r[26] = 0x40;
                r[27] = 0x19;
                r[28] = scnt;
                r[29] = 0x10;
                r[30] = r[31] = 0;
                rlen = 32;
            } else if (len < ATA_HDR) {
                r[14] |= FLAG_ERROR;
                r[15] = 2; /* bad argument */
                rlen = AOE_HDR;
            } else {
                unsigned count = f[26];
                int write = f[24] & AFLAG_W;
                memcpy(r + 24, f + 24, 12); /* aflags, feature, count, cmd, LBA, reserved */
                r[25] = 0;                  /* error */
                r[27] = 0x40;               /* status: DRDY */
                rlen = ATA_HDR + (write ? 0 : (size_t)count * SECTOR);
                if (rlen > maxlen || (write && len < ATA_HDR + (size_t)count * SECTOR)) {
                    r[25] = 0x04; /* ABRT */
                    r[27] = 0x41; /* DRDY | ERR */
                    rlen = ATA_HDR;
                }
            }
            batch_add(&s, &b, r, rlen < 60 ? 60 : rlen);
        }
        ring_release(&s);
    }
    if (b.n)
        batch_flush(&s, &b);
    fprintf(stderr, "echo: stopped; %u frames dropped (receive ring or queue full)\n", ring_drops(&s));
    free(out);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2 || (strcmp(argv[1], "gen") && strcmp(argv[1], "echo"))) {
        fprintf(stderr, "usage: loadgen gen|echo --iface IF [options] (see the source)\n");
        return 2;
    }
    struct opts o;
    parse(argc, argv, &o);
    setvbuf(stdout, NULL, _IOLBF, 0);
    return !strcmp(argv[1], "gen") ? generator(&o) : echo(&o);
}
