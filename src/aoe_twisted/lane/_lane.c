/*
 * aoe_twisted.lane._lane: the compiled data lane.
 *
 * What it does, and only that: walk a PACKET_MMAP receive ring, answer the
 * plain ATA READ/WRITE SECTORS (EXT) frames that aoe_twisted.core.fastpath
 * answers (the same frames, the same reply bytes, the same counters), with
 * pread/pwrite (or a copy: for a memory disk, and for writes to a file or
 * block disk the table maps) straight between the ring slots and the disk,
 * the reply written into a transmit ring slot and queued.
 * Every other frame is handed back to Python untouched: the lane stops at it
 * and says so, and the Python path (the reference) decides about it.
 *
 * A packet parser is a remote attack surface: every length and offset read
 * from a frame or a ring slot is checked against what holds it before use.
 *
 * Three types:
 *   Tally  one target's counters the lane adds to, and the initiators it has
 *          seen with their latest tags (shared with the Python path, which
 *          calls Tally.seen, so a retransmission is recognised whichever
 *          path saw the first copy).
 *   Table  the targets the lane may answer for, by shelf.slot, each with its
 *          disk (a descriptor, perhaps mapped for writes, or a buffer) and
 *          its Tally.
 *   Lane   one port's rings: drain() walks them; answer() is the same
 *          decision for one frame and one reply buffer (tests, fuzzing).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>

/* -- the wire ------------------------------------------------------------ */

#define HEADER_SIZE 36      /* Ethernet 14, AoE 10, ATA 12 */
#define MIN_FRAME 60
#define SECTOR 512
#define ETHERTYPE_AOE 0x88A2
#define REQUEST_VERFLAGS 0x10
#define REPLY_VERFLAGS 0x18
#define ECHOED_AFLAGS (0x40 | 0x10 | 0x02 | 0x01)
#define AFLAG_WRITE 0x01
#define AFLAG_EXTENDED 0x40
#define DRDY 0x40
#define ERR_DRDY 0x41
#define ERROR_ABRT 0x04
#define ERROR_UNC 0x40
#define MASK28 ((UINT64_C(1) << 28) - 1)
#define MASK48 ((UINT64_C(1) << 48) - 1)

/* -- the rings (linux/if_packet.h, TPACKET_V2) ----------------------------- */

#define TP_STATUS_KERNEL 0
#define TP_STATUS_USER 1
#define TP_STATUS_AVAILABLE 0
#define TP_STATUS_SEND_REQUEST 1
/* Ours: a reply written and held for group commit; the kernel sends only SEND_REQUEST. */
#define TP_STATUS_HELD (1u << 30)
#define TX_DATA_AT 32
#define RX_PKTTYPE_AT 42
/* tp_sec: the second (CLOCK_REALTIME) the kernel received the frame. */
#define RX_SEC_AT 16
#define PACKET_OTHERHOST 3
#define PACKET_OUTGOING 4

/* -- the counters ------------------------------------------------------- */

#define BUCKETS 22          /* 21 powers of two of microseconds, then +Inf */
#define RECENT_TAGS 1024    /* aoe_twisted.core.stats.RECENT_TAGS */

typedef struct {
    uint64_t *slots;        /* tag | 1 << 32, or 0 for an empty slot */
    uint32_t capacity;      /* a power of two, or 0 before the first tag */
    uint32_t count;
} TagSet;

typedef struct {
    uint64_t mac;
    uint64_t frames;
    TagSet newer;
    TagSet older;
} Peer;

typedef struct {
    PyObject_HEAD
    uint64_t read, write, read_bytes, write_bytes, ata_errors, retransmits;
    uint64_t buckets[BUCKETS];
    double seconds;
    Peer *peers;
    uint32_t peer_count, peer_capacity;
    int32_t *peer_index;    /* open addressing: MAC -> index in peers, -1 empty */
    uint32_t index_capacity;
    uint32_t last;          /* the peer seen last: most frames come from it again */
    PyObject *failures;     /* [(operation, errno)], taken by take() */
} Tally;

static uint64_t
hash64(uint64_t x)
{
    x ^= x >> 33;
    x *= UINT64_C(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x *= UINT64_C(0xc4ceb9fe1a85ec53);
    x ^= x >> 33;
    return x;
}

static int
tagset_contains(const TagSet *set, uint32_t tag)
{
    if (set->capacity == 0)
        return 0;
    uint64_t want = (uint64_t)tag | (UINT64_C(1) << 32);
    uint32_t mask = set->capacity - 1;
    for (uint32_t i = (uint32_t)hash64(tag) & mask;; i = (i + 1) & mask) {
        uint64_t slot = set->slots[i];
        if (slot == 0)
            return 0;
        if (slot == want)
            return 1;
    }
}

static int tagset_add(TagSet *set, uint32_t tag);

static int
tagset_grow(TagSet *set)
{
    uint32_t capacity = set->capacity ? set->capacity * 2 : 16;
    uint64_t *old = set->slots;
    uint32_t old_capacity = set->capacity;
    set->slots = calloc(capacity, sizeof(uint64_t));
    if (set->slots == NULL) {
        set->slots = old;
        return -1;
    }
    set->capacity = capacity;
    set->count = 0;
    for (uint32_t i = 0; i < old_capacity; i++) {
        if (old[i])
            tagset_add(set, (uint32_t)old[i]);
    }
    free(old);
    return 0;
}

/* Add a tag known to be absent; -1 (and nothing added) without memory. */
static int
tagset_add(TagSet *set, uint32_t tag)
{
    if ((set->count + 1) * 2 > set->capacity && tagset_grow(set) < 0)
        return -1;
    uint32_t mask = set->capacity - 1;
    uint32_t i = (uint32_t)hash64(tag) & mask;
    while (set->slots[i])
        i = (i + 1) & mask;
    set->slots[i] = (uint64_t)tag | (UINT64_C(1) << 32);
    set->count++;
    return 0;
}

static void
tagset_clear(TagSet *set)
{
    if (set->slots)
        memset(set->slots, 0, set->capacity * sizeof(uint64_t));
    set->count = 0;
}

static uint64_t
mac48(const uint8_t *m)
{
    return ((uint64_t)m[0] << 40) | ((uint64_t)m[1] << 32) | ((uint64_t)m[2] << 24)
        | ((uint64_t)m[3] << 16) | ((uint64_t)m[4] << 8) | (uint64_t)m[5];
}

static int
tally_rehash(Tally *t, uint32_t capacity)
{
    int32_t *index = malloc(capacity * sizeof(int32_t));
    if (index == NULL)
        return -1;
    memset(index, 0xff, capacity * sizeof(int32_t));
    uint32_t mask = capacity - 1;
    for (uint32_t p = 0; p < t->peer_count; p++) {
        uint32_t i = (uint32_t)hash64(t->peers[p].mac) & mask;
        while (index[i] >= 0)
            i = (i + 1) & mask;
        index[i] = (int32_t)p;
    }
    free(t->peer_index);
    t->peer_index = index;
    t->index_capacity = capacity;
    return 0;
}

/* The peer with this MAC, added if new; NULL without memory. */
static Peer *
tally_peer(Tally *t, uint64_t mac)
{
    if (t->peer_count && t->peers[t->last].mac == mac)
        return &t->peers[t->last];
    if (t->index_capacity) {
        uint32_t mask = t->index_capacity - 1;
        for (uint32_t i = (uint32_t)hash64(mac) & mask; t->peer_index[i] >= 0;
             i = (i + 1) & mask) {
            if (t->peers[t->peer_index[i]].mac == mac) {
                t->last = (uint32_t)t->peer_index[i];
                return &t->peers[t->last];
            }
        }
    }
    if (t->peer_count == INT32_MAX)
        return NULL;
    if (t->peer_count == t->peer_capacity) {
        uint32_t capacity = t->peer_capacity ? t->peer_capacity * 2 : 4;
        Peer *peers = realloc(t->peers, capacity * sizeof(Peer));
        if (peers == NULL)
            return NULL;
        t->peers = peers;
        t->peer_capacity = capacity;
    }
    if ((t->peer_count + 1) * 2 > t->index_capacity
        && tally_rehash(t, t->index_capacity ? t->index_capacity * 2 : 8) < 0)
        return NULL;
    Peer *peer = &t->peers[t->peer_count];
    memset(peer, 0, sizeof(Peer));
    peer->mac = mac;
    uint32_t mask = t->index_capacity - 1;
    uint32_t i = (uint32_t)hash64(mac) & mask;
    while (t->peer_index[i] >= 0)
        i = (i + 1) & mask;
    t->peer_index[i] = (int32_t)t->peer_count;
    t->last = t->peer_count++;
    return peer;
}

/*
 * Count a request from src with tag: 1 if the tag is among the initiator's
 * latest (a retransmission), 0 if not, -1 without memory (nothing counted).
 * TargetStats.seen, for the same sequence, gives the same answers.
 */
static int
tally_seen(Tally *t, const uint8_t *src, uint32_t tag)
{
    Peer *peer = tally_peer(t, mac48(src));
    if (peer == NULL)
        return -1;
    peer->frames++;
    if (tagset_contains(&peer->newer, tag) || tagset_contains(&peer->older, tag))
        return 1;
    if (tagset_add(&peer->newer, tag) < 0) {
        peer->frames--;
        return -1;
    }
    if (peer->newer.count >= RECENT_TAGS) {
        TagSet swap = peer->older;
        peer->older = peer->newer;
        peer->newer = swap;
        tagset_clear(&peer->newer);
    }
    return 0;
}

static void
tally_served(Tally *t, double elapsed)
{
    uint64_t micros = elapsed > 0 ? (uint64_t)(elapsed * 1000000.0) : 0;
    int bucket = micros ? 64 - __builtin_clzll(micros) : 0;
    t->buckets[bucket < BUCKETS - 1 ? bucket : BUCKETS - 1]++;
    t->seconds += elapsed;
}

static void
tally_failed(Tally *t, const char *operation, int error)
{
    /* Counted on the error path only; a failure to note it loses the words, not the count. */
    PyObject *item = Py_BuildValue("(si)", operation, error);
    if (item == NULL || PyList_Append(t->failures, item) < 0)
        PyErr_Clear();
    Py_XDECREF(item);
}

static PyObject *
Tally_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if (!PyArg_ParseTuple(args, ":Tally"))
        return NULL;
    Tally *t = (Tally *)type->tp_alloc(type, 0);
    if (t == NULL)
        return NULL;
    t->failures = PyList_New(0);
    if (t->failures == NULL) {
        Py_DECREF(t);
        return NULL;
    }
    return (PyObject *)t;
}

static void
Tally_dealloc(Tally *t)
{
    for (uint32_t p = 0; p < t->peer_count; p++) {
        free(t->peers[p].newer.slots);
        free(t->peers[p].older.slots);
    }
    free(t->peers);
    free(t->peer_index);
    Py_XDECREF(t->failures);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *
Tally_seen(Tally *t, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer src, tag;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "seen(src, tag) takes two arguments");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &src, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &tag, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    int result = -2;
    if (src.len == 6 && tag.len == 4) {
        const uint8_t *b = tag.buf;
        result = tally_seen(t, src.buf, ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16)
                                            | ((uint32_t)b[2] << 8) | b[3]);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&tag);
    if (result == -2) {
        PyErr_SetString(PyExc_ValueError, "seen: a 6-byte MAC and a 4-byte tag");
        return NULL;
    }
    if (result < 0)
        return PyErr_NoMemory();
    return PyBool_FromLong(result);
}

static PyObject *
Tally_take(Tally *t, PyObject *unused)
{
    PyObject *buckets = PyTuple_New(BUCKETS);
    if (buckets == NULL)
        return NULL;
    for (int i = 0; i < BUCKETS; i++) {
        PyObject *n = PyLong_FromUnsignedLongLong(t->buckets[i]);
        if (n == NULL) {
            Py_DECREF(buckets);
            return NULL;
        }
        PyTuple_SET_ITEM(buckets, i, n);
    }
    PyObject *failures = PyList_New(0);
    if (failures == NULL) {
        Py_DECREF(buckets);
        return NULL;
    }
    PyObject *result = Py_BuildValue(
        "(KKKKKKdOO)", (unsigned long long)t->read, (unsigned long long)t->write,
        (unsigned long long)t->read_bytes, (unsigned long long)t->write_bytes,
        (unsigned long long)t->ata_errors, (unsigned long long)t->retransmits, t->seconds,
        buckets, t->failures);
    Py_DECREF(buckets);
    if (result == NULL) {
        Py_DECREF(failures);
        return NULL;
    }
    Py_SETREF(t->failures, failures);  /* the result holds the old list */
    t->read = t->write = t->read_bytes = t->write_bytes = t->ata_errors = t->retransmits = 0;
    memset(t->buckets, 0, sizeof(t->buckets));
    t->seconds = 0.0;
    return result;
}

static PyObject *
Tally_peers(Tally *t, PyObject *unused)
{
    PyObject *list = PyList_New(t->peer_count);
    if (list == NULL)
        return NULL;
    for (uint32_t p = 0; p < t->peer_count; p++) {
        uint8_t mac[6];
        for (int i = 0; i < 6; i++)
            mac[i] = (uint8_t)(t->peers[p].mac >> (40 - 8 * i));
        PyObject *item = Py_BuildValue("(y#K)", (const char *)mac, (Py_ssize_t)6,
                                       (unsigned long long)t->peers[p].frames);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, p, item);
    }
    return list;
}

static PyMethodDef Tally_methods[] = {
    {"seen", (PyCFunction)(void (*)(void))Tally_seen, METH_FASTCALL,
     "seen(src, tag) -> bool: count a request; True if its tag was among the latest."},
    {"take", (PyCFunction)Tally_take, METH_NOARGS,
     "take() -> (read, write, read_bytes, write_bytes, ata_errors, retransmits, seconds, "
     "buckets, failures): what the lane counted since the last take, zeroed."},
    {"peers", (PyCFunction)Tally_peers, METH_NOARGS,
     "peers() -> [(mac, frames)]: every initiator seen, in the order first seen."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TallyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aoe_twisted.lane._lane.Tally",
    .tp_basicsize = sizeof(Tally),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One target's lane counters and the initiators it has seen, with their tags.",
    .tp_new = Tally_new,
    .tp_dealloc = (destructor)Tally_dealloc,
    .tp_methods = Tally_methods,
};

/* -- mapped writes: copies that survive SIGBUS ----------------------------- */

/*
 * A writable file or block disk may be written through a shared mapping of
 * it that the table makes (mmap, MADV_RANDOM: a fault reads the one page it
 * needs, never a read-ahead window): one copy from the RX slot into the page
 * cache, where pwrite is a system call and, for less than a page, the
 * filesystem's per-call work.  Reads stay pread (the kernel's read-ahead,
 * exact I/O for pages not cached).
 *
 * A copy into a mapping faults with SIGBUS where pwrite would return an
 * error: the file was truncated, the device failed, a sparse file's
 * filesystem is full.  The copy is guarded: the handler jumps back to it if
 * the fault is in the range it writes, in the thread that runs it, and the
 * write is then done with pwrite, which gives the errno (or succeeds).  Any
 * other SIGBUS is given back to the disposition that was there before (the
 * handler is taken out and the signal happens again); if that one brings it
 * back to us, the process ends with SIGBUS, as it would have.  An "action
 * optional" memory error (BUS_MCEERR_AO, sent only with early kill) is
 * ignored wherever it is: the kernel has dealt with the page, and a copy
 * that meets it faults again, guarded.
 */
static sigjmp_buf *volatile copy_guard;
static pthread_t guard_thread;
static const uint8_t *volatile guard_from, *volatile guard_to;
static struct sigaction sigbus_before;
static volatile sig_atomic_t sigbus_passed;
static volatile sig_atomic_t sigbus_installed;

static void
on_sigbus(int sig, siginfo_t *info, void *context)
{
    if (info->si_code > 0 && info->si_code < SI_KERNEL) {     /* a fault, not a sent signal */
        sigjmp_buf *guard = copy_guard;
        const uint8_t *at = (const uint8_t *)info->si_addr;
        if (guard != NULL && pthread_equal(pthread_self(), guard_thread) && at >= guard_from
            && at < guard_to) {
            copy_guard = NULL;
            siglongjmp(*guard, 1);
        }
#ifdef BUS_MCEERR_AO
        if (info->si_code == BUS_MCEERR_AO)
            return;
#endif
    }
    if (sigbus_passed) {
        /* Handed on once and back to us: end as the default disposition would. */
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    sigbus_passed = 1;
    sigbus_installed = 0;
    sigaction(sig, &sigbus_before, NULL);
    if (info->si_code <= 0 || info->si_code >= SI_KERNEL)
        raise(sig);     /* sent, not a fault: send it to that disposition */
    /* A fault: returning runs the faulting instruction again, under that disposition. */
}

/*
 * Install on_sigbus unless it is the handler now: when a table with a mapped
 * disk is made and before each write through a mapping (a sigaction call,
 * about 0.1 us), so that a handler installed since (faulthandler.enable(),
 * signal.signal, by any thread, or by Python code the walk ran) or a SIGBUS
 * handed on never leaves a guarded copy without its handler.
 */
static int
guard_sigbus(void)
{
    struct sigaction now, ours;
    if (sigaction(SIGBUS, NULL, &now) < 0)
        goto fail;
    if ((now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_sigbus && sigbus_installed)
        return 0;
    memset(&ours, 0, sizeof(ours));
    ours.sa_sigaction = on_sigbus;
    /* SA_NODEFER: a jump out of the handler leaves SIGBUS unblocked (sigsetjmp(, 0)). */
    ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&ours.sa_mask);
    /* SIGBUS blocked while the one before is noted, so it never meets a half-made note. */
    sigset_t bus, was;
    sigemptyset(&bus);
    sigaddset(&bus, SIGBUS);
    pthread_sigmask(SIG_BLOCK, &bus, &was);
    struct sigaction before;
    int failed = sigaction(SIGBUS, &ours, &before) < 0;
    /* Ours already (handed on, then put back by the one it went to): keep the one before. */
    if (!failed && !((before.sa_flags & SA_SIGINFO) && before.sa_sigaction == on_sigbus))
        sigbus_before = before;
    if (!failed) {
        sigbus_passed = 0;
        sigbus_installed = 1;
    }
    pthread_sigmask(SIG_SETMASK, &was, NULL);
    if (failed)
        goto fail;
    return 0;
fail:
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

/* memcpy into the mapped bytes at to, 0; or EIO if they faulted (SIGBUS). */
static int
guarded_copy(uint8_t *to, const uint8_t *from, size_t length)
{
    sigjmp_buf here;
    if (sigsetjmp(here, 0)) {
        /* The handler cleared copy_guard; some of the bytes may have been copied. */
        return EIO;
    }
    guard_from = to;
    guard_to = to + length;
    guard_thread = pthread_self();
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    copy_guard = &here;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    memcpy(to, from, length);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    copy_guard = NULL;
    return 0;
}

/*
 * A mapping's page tables grow with the part of the disk written through it
 * and are freed only when it is unmapped: a table maps each disk afresh (and
 * unmaps the old mapping) once writes have touched MAP_REGIONS regions of
 * 2 MiB (what one page of page table maps on x86-64) since it was mapped,
 * so a process holds at most about 2 x MAP_REGIONS x 4 KiB of them per disk
 * (16 MiB) however large the disk is.
 */
#define MAP_REGION_SHIFT 21
#define MAP_REGIONS 2048
/* A disk of more regions than this (256 TiB) is not mapped (the bitmap would be 16 MiB). */
#define MAP_MAX_REGIONS (1ULL << 27)

/* -- the table ---------------------------------------------------------- */

enum { WRITES_DECLINED = 0, WRITES_SENT = 1, WRITES_HELD = 2 };

typedef struct {
    uint32_t key;           /* shelf << 8 | slot */
    uint32_t max_sectors;
    uint64_t sectors;       /* the disk's size in sectors */
    int fd;                 /* -1: the disk is the buffer */
    int direct;             /* O_DIRECT: whole aligned blocks through the bounce buffer */
    uint32_t alignment;
    uint64_t base;          /* the disk's first byte in the descriptor or buffer */
    Py_buffer memory;       /* the buffer, when fd is -1 */
    /* Writes through a mapping of fd (asked for with True in place of a buffer): */
    int map_asked;
    int map_error;          /* the errno of the last mmap that failed, 0 if none */
    uint8_t *map;           /* NULL: written with pwrite */
    size_t map_length;
    uint64_t map_start;     /* the offset in fd mapped from: base rounded down to a page */
    int sized;              /* a regular file or block device: its size is looked at after each write */
    uint8_t *regions;       /* bitmap: the 2 MiB regions of the mapping written since made */
    uint64_t region_bits;
    uint32_t regions_touched;
    int writes;             /* WRITES_DECLINED, WRITES_SENT or WRITES_HELD (group commit) */
    PyObject *target;       /* the Target: its acl and backend are read per frame */
    PyObject *backend;      /* the backend the table was built for */
    Tally *tally;
} Entry;

typedef struct {
    PyObject_HEAD
    Entry *entries;
    Py_ssize_t count;
    int32_t *index;         /* open addressing: key -> entry, -1 empty */
    uint32_t index_capacity;
    uint8_t *bounce;        /* page-aligned, for O_DIRECT disks */
    size_t bounce_size;
} Table;

/* map_error: the file is shorter than the disk (not an errno). */
#define MAP_SHORT (-1)

/* Where the entry's disk ends in its descriptor: what a mapped file must still reach. */
static uint64_t
entry_end(const Entry *e)
{
    return e->base + e->sectors * SECTOR;
}

/*
 * Map the entry's disk (again): a new mapping, then the old one unmapped, so
 * a failure leaves the old one; -1 with map_error set if it cannot be made.
 * A file (or block device) shorter than the disk is not mapped: a write past its end
 * but inside its last page would not fault, and the kernel would drop it.
 */
static int
entry_map(Entry *e)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t end = entry_end(e);
    uint64_t start = e->base - e->base % page;
    if (e->sectors == 0 || end - start > SIZE_MAX || end - start > (uint64_t)INT64_MAX) {
        e->map_error = EFBIG;
        return -1;
    }
    size_t length = (size_t)(end - start);
    uint64_t bits = (length >> MAP_REGION_SHIFT) + 2;   /* the mapping's start may be mid-region */
    if (bits > MAP_MAX_REGIONS) {
        e->map_error = EFBIG;
        return -1;
    }
    if (e->regions == NULL) {
        e->regions = calloc((size_t)((bits + 7) / 8), 1);
        if (e->regions == NULL) {
            e->map_error = ENOMEM;
            return -1;
        }
        e->region_bits = bits;
    }
    struct stat st;
    if (fstat(e->fd, &st) < 0) {
        e->map_error = errno;
        return -1;
    }
    e->sized = S_ISREG(st.st_mode) || S_ISBLK(st.st_mode);
    off_t size = e->sized ? lseek(e->fd, 0, SEEK_END) : -1;
    if (e->sized && size >= 0 && (uint64_t)size < end) {
        e->map_error = MAP_SHORT;
        return -1;
    }
    void *m = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, e->fd, (off_t)start);
    if (m == MAP_FAILED) {
        e->map_error = errno;
        return -1;
    }
    madvise(m, length, MADV_RANDOM);
    if (e->map != NULL)
        munmap(e->map, e->map_length);
    e->map = (uint8_t *)m;
    e->map_length = length;
    e->map_start = start;
    memset(e->regions, 0, (size_t)((e->region_bits + 7) / 8));
    e->regions_touched = 0;
    return 0;
}

/* Note the regions [to, to + length) of the mapping lie in; map again after MAP_REGIONS. */
static void
note_written(Entry *e, const uint8_t *to, size_t length)
{
    uintptr_t first = ((uintptr_t)to >> MAP_REGION_SHIFT) - ((uintptr_t)e->map >> MAP_REGION_SHIFT);
    uintptr_t last = (((uintptr_t)to + length - 1) >> MAP_REGION_SHIFT)
                     - ((uintptr_t)e->map >> MAP_REGION_SHIFT);
    for (uintptr_t r = first; r <= last && r < e->region_bits; r++) {
        if (!(e->regions[r / 8] & (1u << (r % 8)))) {
            e->regions[r / 8] |= (uint8_t)(1u << (r % 8));
            e->regions_touched++;
        }
    }
    if (e->regions_touched >= MAP_REGIONS && entry_map(e) < 0) {
        /* Kept as it is; try again after as many regions more. */
        memset(e->regions, 0, (size_t)((e->region_bits + 7) / 8));
        e->regions_touched = 0;
    }
}

/*
 * After a copy into the mapping of a file or block device: is it still as long
 * as the disk?  A write past the end of a file but inside its last page does
 * not fault, and the kernel drops it; so a write that ends past the file's
 * end (truncated under the server, even during the copy) is done again with
 * pwrite, which extends the file, and the mapping goes: the disk is written
 * with pwrite from then on.  The same for a block device that shrinks.  1 if
 * the copy stands; 0 if it must be done with pwrite (the mapping is gone).
 */
static int
entry_still_long(Entry *e)
{
    /*
     * lseek(SEEK_END) rather than fstat: it gives the size with nothing but the
     * system call (about 0.1 us here, fstat about 0.8).  It moves the
     * descriptor's offset, which nothing uses: every read and write of a disk
     * is pread/pwrite.
     */
    if (!e->sized)
        return 1;
    off_t size = lseek(e->fd, 0, SEEK_END);
    if (size >= 0 && (uint64_t)size >= entry_end(e))
        return 1;
    munmap(e->map, e->map_length);
    e->map = NULL;
    e->map_error = MAP_SHORT;
    return 0;
}

static PyObject *s_acl, *s_backend, *s_mask_list, *s_reserve_list, *s_read_only, *s_sync;

static void
Table_dealloc(Table *t)
{
    for (Py_ssize_t i = 0; i < t->count; i++) {
        Entry *e = &t->entries[i];
        if (e->memory.obj != NULL)
            PyBuffer_Release(&e->memory);
        if (e->map != NULL)
            munmap(e->map, e->map_length);
        free(e->regions);
        Py_XDECREF(e->target);
        Py_XDECREF(e->backend);
        Py_XDECREF((PyObject *)e->tally);
    }
    free(t->entries);
    free(t->index);
    free(t->bounce);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static Entry *
table_find(const Table *t, uint32_t key)
{
    if (t->index_capacity == 0)
        return NULL;
    uint32_t mask = t->index_capacity - 1;
    for (uint32_t i = (uint32_t)hash64(key) & mask; t->index[i] >= 0; i = (i + 1) & mask) {
        if (t->entries[t->index[i]].key == key)
            return &t->entries[t->index[i]];
    }
    return NULL;
}

/*
 * Table(entries): each entry a tuple
 *   (shelf, slot, max_sectors, sectors, fd, buffer, base, direct, alignment, writes,
 *    target, backend, tally)
 * with fd -1 and a writable buffer for a memory disk, or fd >= 0 and None
 * (read with pread, written with pwrite) or True (read with pread, written
 * through a mapping the table makes, or with pwrite if it cannot be made:
 * see unmapped());
 * writes 0 (declined), 1 (answered at once) or 2 (answered, the reply held
 * for group commit until Lane.release).
 */
static PyObject *
Table_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *items;
    if (!PyArg_ParseTuple(args, "O:Table", &items))
        return NULL;
    PyObject *seq = PySequence_Fast(items, "Table: a sequence of entries");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Table *t = (Table *)type->tp_alloc(type, 0);
    if (t == NULL)
        goto fail;
    t->entries = calloc(n ? n : 1, sizeof(Entry));
    uint32_t capacity = 8;
    while (capacity < (uint64_t)n * 2)
        capacity *= 2;
    t->index = malloc(capacity * sizeof(int32_t));
    if (t->entries == NULL || t->index == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    memset(t->index, 0xff, capacity * sizeof(int32_t));
    t->index_capacity = capacity;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t shelf, slot, max_sectors, alignment, sectors_n, base_n;
        unsigned long long sectors, base;
        int fd, direct, writes;
        PyObject *buffer, *target, *backend, *tally;
        Entry *e = &t->entries[i];
        PyObject *item = PySequence_Fast_ITEMS(seq)[i];
        if (!PyTuple_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "Table: each entry is a tuple");
            goto fail;
        }
        /* "n": Python ints past Py_ssize_t raise OverflowError, never wrap. */
        if (!PyArg_ParseTuple(item, "nnnniOnpniOOO!:Table entry", &shelf, &slot, &max_sectors,
                              &sectors_n, &fd, &buffer, &base_n, &direct, &alignment, &writes,
                              &target, &backend, &TallyType, &tally))
            goto fail;
        if (shelf < 0 || shelf > 0xFFFE || slot < 0 || slot > 0xFE || max_sectors <= 0
            || max_sectors > 255 || sectors_n < 0 || base_n < 0 || alignment <= 0
            || (alignment & (alignment - 1)) || alignment > (1 << 20)
            || writes < WRITES_DECLINED || writes > WRITES_HELD) {
            PyErr_SetString(PyExc_ValueError,
                            "Table entry: bad address, max_sectors, alignment or writes");
            goto fail;
        }
        sectors = (unsigned long long)sectors_n;
        base = (unsigned long long)base_n;
        e->key = (uint32_t)(shelf << 8 | slot);
        if (table_find(t, e->key) != NULL) {
            PyErr_SetString(PyExc_ValueError, "Table: two entries at one address");
            goto fail;
        }
        e->max_sectors = (uint32_t)max_sectors;
        e->sectors = sectors;
        e->fd = fd;
        e->direct = direct;
        e->alignment = (uint32_t)alignment;
        e->base = base;
        e->writes = writes;
        if (fd >= 0 && buffer != Py_None) {
            if (buffer != Py_True) {
                PyErr_SetString(PyExc_TypeError,
                                "Table entry: a disk with a descriptor has None, or True to be "
                                "written through a mapping");
                goto fail;
            }
            if (direct) {
                PyErr_SetString(PyExc_ValueError, "Table entry: an O_DIRECT disk is not mapped");
                goto fail;
            }
            e->map_asked = 1;
        }
        if (fd < 0) {
            e->fd = -1;
            if (PyObject_GetBuffer(buffer, &e->memory, PyBUF_WRITABLE) < 0)
                goto fail;
            if (base > (unsigned long long)e->memory.len
                || sectors > ((unsigned long long)e->memory.len - base) / SECTOR) {
                PyErr_SetString(PyExc_ValueError, "Table entry: the disk overruns its buffer");
                PyBuffer_Release(&e->memory);  /* not counted yet: dealloc skips it */
                goto fail;
            }
        }
        Py_INCREF(target);
        e->target = target;
        Py_INCREF(backend);
        e->backend = backend;
        Py_INCREF(tally);
        e->tally = (Tally *)tally;
        t->count = i + 1;
        if (e->map_asked && entry_map(e) == 0 && guard_sigbus() < 0)
            PyErr_Clear();  /* then every write checks again, and uses pwrite while it fails */
        uint32_t mask = capacity - 1;
        uint32_t j = (uint32_t)hash64(e->key) & mask;
        while (t->index[j] >= 0)
            j = (j + 1) & mask;
        t->index[j] = (int32_t)i;
    }
    Py_DECREF(seq);
    return (PyObject *)t;
fail:
    Py_DECREF(seq);
    Py_XDECREF(t);
    return NULL;
}

/* unmapped() -> [(target, errno)]: the disks asked to be written through a mapping that is not. */
static PyObject *
Table_unmapped(Table *t, PyObject *unused)
{
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < t->count; i++) {
        Entry *e = &t->entries[i];
        if (!e->map_asked || e->map != NULL)
            continue;
        PyObject *item = Py_BuildValue("(Oi)", e->target, e->map_error);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return out;
}

/* mapped() -> int: how many disks are written through a mapping now. */
static PyObject *
Table_mapped(Table *t, PyObject *unused)
{
    Py_ssize_t n = 0;
    for (Py_ssize_t i = 0; i < t->count; i++)
        n += t->entries[i].map != NULL;
    return PyLong_FromSsize_t(n);
}

static PyMethodDef Table_methods[] = {
    {"unmapped", (PyCFunction)Table_unmapped, METH_NOARGS,
     "unmapped() -> [(target, errno)]: disks asked to be written through a mapping that "
     "could not be made (they are written with pwrite)."},
    {"mapped", (PyCFunction)Table_mapped, METH_NOARGS,
     "mapped() -> how many disks are written through a mapping."},
    {NULL, NULL, 0, NULL},
};

static Py_ssize_t
Table_length(Table *t)
{
    return t->count;
}

static PySequenceMethods Table_as_sequence = {
    .sq_length = (lenfunc)Table_length,
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aoe_twisted.lane._lane.Table",
    .tp_basicsize = sizeof(Table),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The targets the lane answers for, by shelf.slot, with their disks.",
    .tp_new = Table_new,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_as_sequence = &Table_as_sequence,
    .tp_methods = Table_methods,
};

/* -- the disk ----------------------------------------------------------- */

static uint8_t *
bounce(Table *t, size_t size)
{
    if (t->bounce_size >= size)
        return t->bounce;
    size_t want = size < 262144 ? 262144 : size;
    void *p = NULL;
    if (posix_memalign(&p, 4096, want) != 0)
        return NULL;
    free(t->bounce);
    t->bounce = p;
    t->bounce_size = want;
    return t->bounce;
}

/*
 * Read (write 0) or write (write 1) all of buf at offset, looping on short
 * transfers and EINTR: 0, or an errno (EIO when the file ends or takes nothing).
 */
static int
transfer_all(int fd, uint8_t *buf, size_t length, uint64_t offset, int write)
{
    size_t done = 0;
    while (done < length) {
        off_t at = (off_t)(offset + done);
        ssize_t n = write ? pwrite(fd, buf + done, length - done, at)
                          : pread(fd, buf + done, length - done, at);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)
            return EIO;
        done += (size_t)n;
    }
    return 0;
}

/* One pread of exactly length bytes (O_DIRECT: a short one is the end of the disk). */
static int
pread_exact(int fd, uint8_t *buf, size_t length, uint64_t offset)
{
    for (;;) {
        ssize_t got = pread(fd, buf, length, (off_t)offset);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            return errno;
        return (size_t)got == length ? 0 : EIO;
    }
}

static int
disk_read(Table *t, Entry *e, uint64_t offset, uint8_t *into, size_t length)
{
    if (e->fd < 0) {
        memcpy(into, (uint8_t *)e->memory.buf + e->base + offset, length);
        return 0;
    }
    offset += e->base;
    if (!e->direct)
        return transfer_all(e->fd, into, length, offset, 0);
    uint64_t a = e->alignment;
    uint64_t start = offset - offset % a;
    uint64_t end = (offset + length + a - 1) / a * a;
    uint8_t *b = bounce(t, end - start);
    if (b == NULL)
        return ENOMEM;
    int error = pread_exact(e->fd, b, end - start, start);
    if (error)
        return error;
    memcpy(into, b + (offset - start), length);
    return 0;
}

static int
disk_write(Table *t, Entry *e, uint64_t offset, const uint8_t *data, size_t length)
{
    if (e->fd < 0) {
        memcpy((uint8_t *)e->memory.buf + e->base + offset, data, length);
        return 0;
    }
    if (e->map != NULL) {
        uint8_t *to = e->map + (e->base - e->map_start) + offset;
        if (guard_sigbus() < 0)
            PyErr_Clear();      /* no handler, no copy: pwrite */
        else if (guarded_copy(to, data, length) == 0) {
            if (entry_still_long(e)) {
                note_written(e, to, length);
                return 0;
            }
            /* The file is shorter than the disk: the copy may be dropped; pwrite it. */
        }
        /* The mapping faulted: pwrite says why (no space, say), or writes it if it can. */
    }
    offset += e->base;
    if (!e->direct)
        return transfer_all(e->fd, (uint8_t *)data, length, offset, 1);
    /* Whole blocks: a partial block at either edge is read first (read-modify-write). */
    uint64_t a = e->alignment;
    uint64_t start = offset - offset % a;
    uint64_t end = (offset + length + a - 1) / a * a;
    uint8_t *b = bounce(t, end - start);
    if (b == NULL)
        return ENOMEM;
    int error;
    int head_partial = offset != start;
    if (head_partial && (error = pread_exact(e->fd, b, a, start)))
        return error;
    if (offset + length != end && !(head_partial && end - a == start)
        && (error = pread_exact(e->fd, b + (end - start - a), a, end - a)))
        return error;
    memcpy(b + (offset - start), data, length);
    for (;;) {
        ssize_t put = pwrite(e->fd, b, end - start, (off_t)start);
        if (put < 0 && errno == EINTR)
            continue;
        if (put < 0)
            return errno;
        return (uint64_t)put == end - start ? 0 : EIO;
    }
}

/* -- the decision ------------------------------------------------------- */

static double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Whether src is admitted by the list attribute name of acl (empty: everyone); -1 on error. */
static int
admits(PyObject *acl, PyObject *name, const uint8_t *src)
{
    PyObject *list = PyObject_GetAttr(acl, name);
    if (list == NULL)
        return -1;
    int result;
    if (PyTuple_CheckExact(list)) {
        Py_ssize_t n = PyTuple_GET_SIZE(list);
        result = n == 0;
        for (Py_ssize_t i = 0; i < n && !result; i++) {
            PyObject *mac = PyTuple_GET_ITEM(list, i);
            if (PyBytes_CheckExact(mac) && PyBytes_GET_SIZE(mac) == 6
                && memcmp(PyBytes_AS_STRING(mac), src, 6) == 0)
                result = 1;
        }
    } else {
        /* Not a tuple of bytes: leave the frame to the Python path, which knows. */
        result = 0;
    }
    Py_DECREF(list);
    return result;
}

/* Whether attribute name of obj is true: 1, 0, or -1 with a Python exception. */
static int
attribute_true(PyObject *obj, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL)
        return -1;
    int result = PyObject_IsTrue(value);
    Py_DECREF(value);
    return result;
}

static void
reply_header(uint8_t *r, const uint8_t *f, const uint8_t *mac, uint8_t error, uint8_t count)
{
    memcpy(r, f + 6, 6);                    /* to the initiator */
    memcpy(r + 6, mac, 6);                  /* from us */
    r[12] = ETHERTYPE_AOE >> 8;
    r[13] = ETHERTYPE_AOE & 0xff;
    r[14] = REPLY_VERFLAGS;
    r[15] = 0;
    memcpy(r + 16, f + 16, 3);              /* shelf.slot: the target's own */
    r[19] = 0;
    memcpy(r + 20, f + 20, 4);              /* the tag */
    r[24] = f[24] & ECHOED_AFLAGS;
    r[25] = error;
    r[26] = error ? count : 0;
    r[27] = error ? ERR_DRDY : DRDY;
    memcpy(r + 28, f + 28, 6);              /* the LBA as sent */
    r[34] = r[35] = 0;
}

/*
 * Answer frame (flen bytes) into reply (capacity bytes) from the interface
 * mac: the reply's length, 0 if the lane does not answer it (nothing done,
 * nothing counted), -1 with a Python exception.  fastpath.fast_reply_into,
 * with writes the table's per-target mode; *held says the reply acknowledges
 * a write that must wait for group commit (WRITES_HELD), and then *target is
 * the Target written (a borrowed reference).
 */
static Py_ssize_t
answer(Table *t, const uint8_t *f, Py_ssize_t flen, uint8_t *reply, Py_ssize_t capacity,
       const uint8_t *mac, int *held, PyObject **written)
{
    *held = 0;
    if (flen < HEADER_SIZE)
        return 0;
    if (f[12] != (ETHERTYPE_AOE >> 8) || f[13] != (ETHERTYPE_AOE & 0xff)
        || f[14] != REQUEST_VERFLAGS || f[15] != 0 || f[19] != 0 || f[34] != 0 || f[35] != 0
        || (f[6] & 1))
        return 0;
    uint8_t aflags = f[24], count = f[26], cmd = f[27];
    int write;
    uint64_t lba_mask;
    switch (cmd) {
    case 0x20: write = 0; lba_mask = MASK28; break;
    case 0x24: write = 0; lba_mask = (aflags & AFLAG_EXTENDED) ? MASK48 : MASK28; break;
    case 0x30: write = 1; lba_mask = MASK28; break;
    case 0x34: write = 1; lba_mask = (aflags & AFLAG_EXTENDED) ? MASK48 : MASK28; break;
    default: return 0;
    }
    if (write != ((aflags & AFLAG_WRITE) != 0))
        return 0;
    Entry *e = table_find(t, ((uint32_t)f[16] << 16) | ((uint32_t)f[17] << 8) | f[18]);
    if (e == NULL)
        return 0;
    if (count == 0 || count > e->max_sectors)
        return 0;
    const uint8_t *src = f + 6;
    /* The target as it is now: a backend swapped in place leaves the lane. */
    PyObject *backend = PyObject_GetAttr(e->target, s_backend);
    if (backend == NULL)
        return -1;
    Py_DECREF(backend);  /* still held by the target; only its identity is compared */
    if (backend != e->backend)
        return 0;
    PyObject *acl = PyObject_GetAttr(e->target, s_acl);
    if (acl == NULL)
        return -1;
    int ok = admits(acl, s_mask_list, src);
    if (ok > 0)
        ok = admits(acl, s_reserve_list, src);
    Py_DECREF(acl);
    if (ok <= 0)
        return ok;
    uint64_t lba = (uint64_t)f[28] | ((uint64_t)f[29] << 8) | ((uint64_t)f[30] << 16)
        | ((uint64_t)f[31] << 24) | ((uint64_t)f[32] << 32) | ((uint64_t)f[33] << 40);
    uint64_t first = lba & lba_mask;
    if (first + count > e->sectors)
        return 0;
    uint32_t tag = ((uint32_t)f[20] << 24) | ((uint32_t)f[21] << 16) | ((uint32_t)f[22] << 8)
        | f[23];
    size_t length = (size_t)count * SECTOR;
    if (write) {
        if (e->writes == WRITES_DECLINED || flen < (Py_ssize_t)(HEADER_SIZE + length)
            || capacity < MIN_FRAME)
            return 0;
        /* A target made sync in place: its writes now wait, which this table does not do. */
        int no = e->writes == WRITES_SENT ? attribute_true(e->target, s_sync) : 0;
        if (no == 0)
            no = attribute_true(backend, s_read_only);
        if (no != 0)
            return no < 0 ? -1 : 0;
    } else if (capacity < (Py_ssize_t)(HEADER_SIZE + length)) {
        return 0;
    }
    /* Answered from here on: counted as TargetStats counts it, whatever the disk says. */
    Tally *tally = e->tally;
    int seen = tally_seen(tally, src, tag);
    if (seen < 0) {
        PyErr_NoMemory();
        return -1;
    }
    tally->retransmits += seen;
    double started = now();
    int error;
    if (write) {
        tally->write++;
        error = disk_write(t, e, first * SECTOR, f + HEADER_SIZE, length);
    } else {
        tally->read++;
        error = disk_read(t, e, first * SECTOR, reply + HEADER_SIZE, length);
    }
    tally_served(tally, now() - started);
    if (error) {
        /* A failed write is ABRT (never tried again), a failed read UNC, as the ATA engine. */
        tally->ata_errors++;
        tally_failed(tally, write ? "write" : "read", error);
        reply_header(reply, f, mac, write ? ERROR_ABRT : ERROR_UNC, count);
        memset(reply + HEADER_SIZE, 0, MIN_FRAME - HEADER_SIZE);
        return MIN_FRAME;
    }
    reply_header(reply, f, mac, 0, count);
    if (!write) {
        tally->read_bytes += length;
        return (Py_ssize_t)(HEADER_SIZE + length);
    }
    tally->write_bytes += length;
    if (e->writes == WRITES_HELD) {
        *held = 1;
        *written = e->target;
    }
    memset(reply + HEADER_SIZE, 0, MIN_FRAME - HEADER_SIZE);
    return MIN_FRAME;
}

/* -- the lane ----------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Py_buffer ring;
    uint64_t *rx, *tx;      /* slot offsets in ring order */
    uint32_t rx_count, tx_count;
    uint32_t rx_slot, tx_slot;  /* slot sizes: what a frame may occupy */
    uint8_t mac[6];
    uint32_t max_frame;
    int accept_other;
    /* Replies held for group commit: their TX slots, targets (owned) and sector counts. */
    uint32_t *held_slot;
    PyObject **held_target;
    uint8_t *held_count;
    uint32_t held, held_capacity;
    /*
     * A frame that waited in the RX ring more than stale_after seconds (by its
     * kernel receive time, tp_sec) is dropped unanswered, and counted in stale
     * and in the walk's ignored; 0 never drops.  See AoEPort.stale_after.
     */
    uint32_t stale_after;
    Py_ssize_t stale;
} Lane;

static void
Lane_dealloc(Lane *l)
{
    for (uint32_t i = 0; i < l->held; i++)
        Py_DECREF(l->held_target[i]);
    free(l->held_slot);
    free(l->held_target);
    free(l->held_count);
    if (l->ring.obj != NULL)
        PyBuffer_Release(&l->ring);
    free(l->rx);
    free(l->tx);
    Py_TYPE(l)->tp_free((PyObject *)l);
}

static uint64_t *
offsets(PyObject *items, uint32_t *count, uint64_t limit, uint32_t slot)
{
    PyObject *seq = PySequence_Fast(items, "Lane: slot offsets must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uint64_t *out = NULL;
    if (n == 0 || n > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "Lane: a ring has 1 to 16M slots");
        goto done;
    }
    out = malloc(n * sizeof(uint64_t));
    if (out == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PySequence_Fast_ITEMS(seq)[i]);
        if (PyErr_Occurred() || v % 4 || v > limit || slot > limit - v) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "Lane: a slot outside the ring");
            free(out);
            out = NULL;
            goto done;
        }
        out[i] = v;
    }
    *count = (uint32_t)n;
done:
    Py_DECREF(seq);
    return out;
}

/* Lane(ring, rx_offsets, rx_slot_size, tx_offsets, tx_slot_size, mac, max_frame, accept_other) */
static PyObject *
Lane_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *ring, *rx, *tx;
    Py_ssize_t rx_slot, tx_slot, max_frame;
    int accept_other;
    Py_buffer mac;
    if (!PyArg_ParseTuple(args, "OOnOny*np:Lane", &ring, &rx, &rx_slot, &tx, &tx_slot, &mac,
                          &max_frame, &accept_other))
        return NULL;
    Lane *l = (Lane *)type->tp_alloc(type, 0);
    if (l == NULL) {
        PyBuffer_Release(&mac);
        return NULL;
    }
    if (mac.len != 6) {
        PyErr_SetString(PyExc_ValueError, "Lane: a 6-byte MAC");
        goto fail;
    }
    memcpy(l->mac, mac.buf, 6);
    if (rx_slot < 64 || tx_slot < TX_DATA_AT + MIN_FRAME || rx_slot > (1 << 24)
        || tx_slot > (1 << 24) || max_frame < 0 || max_frame > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "Lane: slot sizes or max_frame out of range");
        goto fail;
    }
    if (PyObject_GetBuffer(ring, &l->ring, PyBUF_WRITABLE) < 0)
        goto fail;
    if ((uintptr_t)l->ring.buf % 4) {
        PyErr_SetString(PyExc_ValueError, "Lane: the ring is not word-aligned");
        goto fail;
    }
    l->rx_slot = (uint32_t)rx_slot;
    l->tx_slot = (uint32_t)tx_slot;
    l->rx = offsets(rx, &l->rx_count, (uint64_t)l->ring.len, rx_slot);
    if (l->rx == NULL)
        goto fail;
    l->tx = offsets(tx, &l->tx_count, (uint64_t)l->ring.len, tx_slot);
    if (l->tx == NULL)
        goto fail;
    l->max_frame = (uint32_t)max_frame;
    l->accept_other = accept_other;
    PyBuffer_Release(&mac);
    return (PyObject *)l;
fail:
    PyBuffer_Release(&mac);
    Py_DECREF(l);
    return NULL;
}

enum { STOP_EMPTY = 0, STOP_BUDGET = 1, STOP_PYTHON = 2, STOP_FLUSH = 3 };

static int
lane_grow_held(Lane *l)
{
    /* Each array is moved as realloc likes; the capacity grows once all three have. */
    uint32_t capacity = l->held_capacity ? l->held_capacity * 2 : 64;
    uint32_t *slots = realloc(l->held_slot, capacity * sizeof(uint32_t));
    if (slots != NULL)
        l->held_slot = slots;
    PyObject **targets = slots ? realloc(l->held_target, capacity * sizeof(PyObject *)) : NULL;
    if (targets != NULL)
        l->held_target = targets;
    uint8_t *counts = targets ? realloc(l->held_count, capacity) : NULL;
    if (counts == NULL)
        return -1;
    l->held_count = counts;
    l->held_capacity = capacity;
    return 0;
}

/* held() -> [Target]: the targets written by replies held for group commit, each once. */
static PyObject *
Lane_held(Lane *l, PyObject *unused)
{
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    for (uint32_t i = 0; i < l->held; i++) {
        int known = PySequence_Contains(list, l->held_target[i]);
        if (known < 0 || (!known && PyList_Append(list, l->held_target[i]) < 0)) {
            Py_DECREF(list);
            return NULL;
        }
    }
    return list;
}

/*
 * release(failed) -> (released, refused): send the held replies.
 *
 * failed holds the id() of each target whose disk could not be made durable:
 * their replies become the refusal (ERR|DRDY, ABRT, the request's sector
 * count), never an acknowledgement.  Every held slot is then queued
 * (SEND_REQUEST) in ring order; the next send transmits them.
 */
static PyObject *
Lane_release(Lane *l, PyObject *failed)
{
    uint8_t *ring = l->ring.buf;
    Py_ssize_t refused = 0, released = l->held;
    for (uint32_t i = 0; i < l->held; i++) {
        uint8_t *tx = ring + l->tx[l->held_slot[i]];
        PyObject *id = PyLong_FromVoidPtr(l->held_target[i]);
        int bad = id == NULL ? -1 : PySequence_Contains(failed, id);
        Py_XDECREF(id);
        if (bad != 0) {
            /* Failed, or cannot tell: refuse. An unacknowledged write is only retried. */
            PyErr_Clear();
            uint8_t *reply = tx + TX_DATA_AT;
            reply[25] = ERROR_ABRT;
            reply[26] = l->held_count[i];
            reply[27] = ERR_DRDY;
            refused++;
        }
        __atomic_store_n((uint32_t *)tx, TP_STATUS_SEND_REQUEST, __ATOMIC_RELEASE);
        Py_DECREF(l->held_target[i]);
    }
    l->held = 0;
    return Py_BuildValue("(nn)", released, refused);
}

/* One walk of the RX ring: where it starts and ends, and what it counted. */
typedef struct {
    Py_ssize_t rx_next, tx_next, budget, unflushed, batch;
    Py_ssize_t received, ignored, answered;
} Walk;

/* A receive time this many seconds before the present is no time at all (ring.NO_TIME). */
#define NO_TIME_SECONDS (365u * 86400u)

/*
 * The window of stale receive times (tp_sec) now: [*no_time, *before), empty
 * when stale_after is 0.  Older than no_time is not a CLOCK_REALTIME stamp
 * (a clock counting from boot would make every frame look decades old), and
 * never a reason to drop a frame.
 */
static void
stale_window(const Lane *l, uint32_t *before, uint32_t *no_time)
{
    *before = *no_time = 0;
    if (!l->stale_after)
        return;
    struct timespec now;
    if (clock_gettime(CLOCK_REALTIME_COARSE, &now) != 0 || now.tv_sec <= (time_t)l->stale_after)
        return;
    *before = (uint32_t)(now.tv_sec - (time_t)l->stale_after);
    *no_time = *before > NO_TIME_SECONDS ? *before - NO_TIME_SECONDS : 0;
}

/*
 * Walk the RX ring from slot w->rx_next, at most w->budget slots.  A slot the
 * port ignores (our own outgoing frame, another host's, too long) is
 * counted and handed back; a frame the lane answers gets its reply in TX
 * slot w->tx_next, queued for the kernel (tp_len, then SEND_REQUEST).
 * Returns why it stopped:
 *   STOP_EMPTY   the next slot is the kernel's: the ring is drained;
 *   STOP_BUDGET  budget slots walked;
 *   STOP_PYTHON  slot rx_next holds a frame the lane leaves to Python (or the
 *                next TX slot is not free): not consumed, still the user's;
 *   STOP_FLUSH   unflushed reached batch: send the queue, then call again.
 */
static int
lane_walk(Lane *l, Table *t, Walk *w)
{
    uint8_t *ring = l->ring.buf;
    Py_ssize_t rx_next = w->rx_next, tx_next = w->tx_next;
    int stop = STOP_BUDGET;
    Py_ssize_t error = 0;
    /* Frames received in [no_time, stale_before) (CLOCK_REALTIME, as tp_sec) are stale. */
    uint32_t stale_before, no_time;
    stale_window(l, &stale_before, &no_time);
    while (w->budget > 0) {
        w->budget--;
        uint8_t *slot = ring + l->rx[rx_next];
        uint32_t *status = (uint32_t *)slot;
        if (!(__atomic_load_n(status, __ATOMIC_ACQUIRE) & TP_STATUS_USER)) {
            w->budget++;
            stop = STOP_EMPTY;
            break;
        }
        uint32_t length, snaplen;
        uint16_t at;
        memcpy(&length, slot + 4, 4);
        memcpy(&snaplen, slot + 8, 4);
        memcpy(&at, slot + 12, 2);
        uint8_t pkttype = slot[RX_PKTTYPE_AT];
        uint32_t received_at;
        memcpy(&received_at, slot + RX_SEC_AT, 4);
        if (pkttype == PACKET_OUTGOING || (pkttype == PACKET_OTHERHOST && !l->accept_other)
            || length > l->max_frame) {
            w->ignored++;
        } else if (received_at < stale_before && received_at >= no_time) {
            w->ignored++;
            l->stale++;
        } else {
            /* A frame must lie inside its slot, and a reply needs a free TX slot. */
            uint8_t *tx = ring + l->tx[tx_next];
            if ((uint64_t)at + snaplen > l->rx_slot
                || __atomic_load_n((uint32_t *)tx, __ATOMIC_ACQUIRE) != TP_STATUS_AVAILABLE) {
                w->budget++;
                stop = STOP_PYTHON;
                break;
            }
            /* Room to note a held reply first: a write is never done and then forgotten. */
            if (l->held == l->held_capacity && lane_grow_held(l) < 0) {
                w->budget++;
                stop = STOP_PYTHON;
                break;
            }
            int hold;
            PyObject *target;
            Py_ssize_t written = answer(t, slot + at, snaplen, tx + TX_DATA_AT,
                                        l->tx_slot - TX_DATA_AT, l->mac, &hold, &target);
            if (written <= 0) {
                w->budget++;
                error = written;
                stop = STOP_PYTHON;
                break;
            }
            uint32_t len32 = (uint32_t)written;
            memcpy(tx + 4, &len32, 4);
            if (hold) {
                Py_INCREF(target);
                l->held_slot[l->held] = (uint32_t)tx_next;
                l->held_target[l->held] = target;
                l->held_count[l->held] = slot[at + 26];
                l->held++;
                __atomic_store_n((uint32_t *)tx, TP_STATUS_HELD, __ATOMIC_RELEASE);
            } else {
                __atomic_store_n((uint32_t *)tx, TP_STATUS_SEND_REQUEST, __ATOMIC_RELEASE);
            }
            if (++tx_next == l->tx_count)
                tx_next = 0;
            w->received++;
            w->answered++;
            w->unflushed++;
            if (l->stale_after)  /* the disk may have kept us: judge what follows by now */
                stale_window(l, &stale_before, &no_time);
        }
        __atomic_store_n(status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
        if (++rx_next == l->rx_count)
            rx_next = 0;
        if (w->unflushed >= w->batch) {
            stop = STOP_FLUSH;
            break;
        }
    }
    if (error < 0) {
        /* A Python error reading the target (its acl raised): the Python path will see it too. */
        PyErr_Clear();
    }
    w->rx_next = rx_next;
    w->tx_next = tx_next;
    return stop;
}

/* Parse (table, rx_next, tx_next, budget, unflushed, batch) into *t and *w; -1 on error. */
static int
walk_arguments(Lane *l, PyObject *const *args, Table **t, Walk *w)
{
    if (!PyObject_TypeCheck(args[0], &TableType)) {
        PyErr_SetString(PyExc_TypeError, "the first argument must be a Table");
        return -1;
    }
    *t = (Table *)args[0];
    memset(w, 0, sizeof(*w));
    w->rx_next = PyLong_AsSsize_t(args[1]);
    w->tx_next = PyLong_AsSsize_t(args[2]);
    w->budget = PyLong_AsSsize_t(args[3]);
    w->unflushed = PyLong_AsSsize_t(args[4]);
    w->batch = PyLong_AsSsize_t(args[5]);
    if (PyErr_Occurred())
        return -1;
    if (w->rx_next < 0 || w->rx_next >= l->rx_count || w->tx_next < 0
        || w->tx_next >= l->tx_count) {
        PyErr_SetString(PyExc_IndexError, "no such slot");
        return -1;
    }
    return 0;
}

/*
 * drain(table, rx_next, tx_next, budget, unflushed, batch)
 *   -> (stop, rx_next, tx_next, received, ignored, answered, unflushed)
 *
 * One walk of the ring (lane_walk): the port sends the queue at STOP_FLUSH
 * and hands the frame at rx_next to Python at STOP_PYTHON.
 */
static PyObject *
Lane_drain(Lane *l, PyObject *const *args, Py_ssize_t nargs)
{
    Table *t;
    Walk w;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "drain(table, rx_next, tx_next, budget, unflushed, batch)");
        return NULL;
    }
    if (walk_arguments(l, args, &t, &w) < 0)
        return NULL;
    int stop = lane_walk(l, t, &w);
    return Py_BuildValue("(innnnnn)", stop, w.rx_next, w.tx_next, w.received, w.ignored,
                         w.answered, w.unflushed);
}

static int64_t
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/*
 * linger(table, rx_next, tx_next, budget, unflushed, batch, fd, epfd, wait_ms)
 *   -> (stop, rx_next, tx_next, received, ignored, answered, unflushed, wakeups)
 *
 * wakeups: the wake-ups that brought frames (or a frame for Python).
 *
 * drain, then stay: send the queue (send(fd) of nothing, as the port's flush),
 * wait on the reactor's epoll descriptor epfd, and walk the ring again each
 * time the only thing ready is fd, readable -- so a port whose frames come one
 * or two at a time costs an epoll_wait per frame, not a turn of the reactor
 * in Python.  Returns to Python, like drain, at STOP_PYTHON, STOP_BUDGET (a
 * walk of budget slots), when a reply is held for group commit, when a send
 * fails (STOP_FLUSH, the queue left for the port's flush and its error
 * handling), when anything else is ready (another descriptor, fd writable or
 * in error), when a wake-up finds no frame, on a signal, and after wait_ms
 * in all (the port passes the time to the reactor's next timed call).  The
 * epoll set is level-triggered (Twisted's), so looking at it takes nothing
 * from the reactor: what made the lane return is reported to it again.
 */
static PyObject *
Lane_linger(Lane *l, PyObject *const *args, Py_ssize_t nargs)
{
    Table *t;
    Walk w;
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "linger(table, rx_next, tx_next, budget, unflushed, "
                                         "batch, fd, epfd, wait_ms)");
        return NULL;
    }
    if (walk_arguments(l, args, &t, &w) < 0)
        return NULL;
    long fd = PyLong_AsLong(args[6]);
    long epfd = PyLong_AsLong(args[7]);
    long wait_ms = PyLong_AsLong(args[8]);
    if (PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX || epfd < 0 || epfd > INT_MAX || wait_ms > 60000) {
        PyErr_SetString(PyExc_ValueError, "linger: no such descriptor, or wait_ms over 60000");
        return NULL;
    }
    /* What had been walked when the last wake-up came: a wake-up with no frame ends it. */
    Py_ssize_t budget = w.budget, wakeups = 0, at_wakeup = -1;
    int64_t deadline = monotonic_ns() + (int64_t)(wait_ms > 0 ? wait_ms : 0) * 1000000;
    int stop;
    for (;;) {
        stop = lane_walk(l, t, &w);
        if (stop == STOP_FLUSH || (stop == STOP_EMPTY && w.unflushed > 0)) {
            if (send((int)fd, NULL, 0, MSG_DONTWAIT) < 0) {
                stop = STOP_FLUSH;
                break;
            }
            w.unflushed = 0;
            if (stop == STOP_FLUSH)
                continue;
        }
        if (stop != STOP_EMPTY || l->held)
            break;
        if (w.received + w.ignored == at_wakeup) {
            wakeups--;      /* it brought no frame: not one answered without Python */
            break;
        }
        int64_t left = deadline - monotonic_ns();
        if (left <= 0)
            break;
        struct epoll_event events[4];
        int n;
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait((int)epfd, events, 4, (int)((left + 999999) / 1000000));
        Py_END_ALLOW_THREADS
        if (n <= 0)
            break;
        int ours = 1;
        for (int i = 0; i < n; i++)
            if (events[i].data.fd != fd || events[i].events != EPOLLIN)
                ours = 0;
        if (!ours)
            break;
        wakeups++;
        at_wakeup = w.received + w.ignored;
        w.budget = budget;
    }
    return Py_BuildValue("(innnnnnn)", stop, w.rx_next, w.tx_next, w.received, w.ignored,
                         w.answered, w.unflushed, wakeups);
}

/*
 * answer(table, frame, reply) -> int: the reply's length written into reply, or 0.
 * The lane's decision for one frame, as drain makes it for each slot, except
 * that nothing is held: a write to a WRITES_HELD target is done and its
 * acknowledgement returned at once (for tests and fuzzing; drain holds it).
 */
static PyObject *
Lane_answer(Lane *l, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyObject_TypeCheck(args[0], &TableType)) {
        PyErr_SetString(PyExc_TypeError, "answer(table, frame, reply)");
        return NULL;
    }
    Py_buffer frame, reply;
    if (PyObject_GetBuffer(args[1], &frame, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[2], &reply, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&frame);
        return NULL;
    }
    int held;
    PyObject *target;
    Py_ssize_t written = answer((Table *)args[0], frame.buf, frame.len, reply.buf, reply.len,
                                l->mac, &held, &target);
    PyBuffer_Release(&frame);
    PyBuffer_Release(&reply);
    if (written < 0)
        return NULL;
    return PyLong_FromSsize_t(written);
}

static PyMethodDef Lane_methods[] = {
    {"drain", (PyCFunction)(void (*)(void))Lane_drain, METH_FASTCALL,
     "drain(table, rx_next, tx_next, budget, unflushed, batch) -> (stop, rx_next, tx_next, "
     "received, ignored, answered, unflushed)"},
    {"linger", (PyCFunction)(void (*)(void))Lane_linger, METH_FASTCALL,
     "linger(table, rx_next, tx_next, budget, unflushed, batch, fd, epfd, wait_ms) -> "
     "(stop, rx_next, tx_next, received, ignored, answered, unflushed, wakeups): drain, "
     "then wait on epfd for fd alone and drain again, until anything else is ready or "
     "wait_ms have passed."},
    {"held", (PyCFunction)Lane_held, METH_NOARGS,
     "held() -> [Target]: the targets whose writes wait for group commit, each once."},
    {"release", (PyCFunction)Lane_release, METH_O,
     "release(failed) -> (released, refused): queue the held replies; a target whose id() "
     "is in failed gets refusals (ABRT) instead."},
    {"answer", (PyCFunction)(void (*)(void))Lane_answer, METH_FASTCALL,
     "answer(table, frame, reply) -> the reply's length written into reply, or 0."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Lane_members[] = {
    {"holding", T_UINT, offsetof(Lane, held), READONLY,
     "How many replies the lane holds for group commit (until release)."},
    {"stale_after", T_UINT, offsetof(Lane, stale_after), 0,
     "Drop frames that waited in the RX ring more than this many seconds (0: never)."},
    {"stale", T_PYSSIZET, offsetof(Lane, stale), 0,
     "Frames dropped as stale (counted in ignored too) since this was last set to 0."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aoe_twisted.lane._lane.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One port's PACKET_MMAP rings, walked in C.",
    .tp_new = Lane_new,
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_methods = Lane_methods,
    .tp_members = Lane_members,
};

/* -- the module ------------------------------------------------------- */

static struct PyModuleDef lane_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aoe_twisted.lane._lane",
    .m_doc = "The compiled data lane: plain ATA reads and writes answered in C.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__lane(void)
{
    if (PyType_Ready(&TallyType) < 0 || PyType_Ready(&TableType) < 0
        || PyType_Ready(&LaneType) < 0)
        return NULL;
    s_acl = PyUnicode_InternFromString("acl");
    s_backend = PyUnicode_InternFromString("backend");
    s_mask_list = PyUnicode_InternFromString("mask_list");
    s_reserve_list = PyUnicode_InternFromString("reserve_list");
    s_read_only = PyUnicode_InternFromString("read_only");
    s_sync = PyUnicode_InternFromString("sync");
    if (!s_acl || !s_backend || !s_mask_list || !s_reserve_list || !s_read_only || !s_sync)
        return NULL;
    PyObject *m = PyModule_Create(&lane_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "RECENT_TAGS", RECENT_TAGS) < 0
        || PyModule_AddIntConstant(m, "BUCKETS", BUCKETS) < 0
        || PyModule_AddIntConstant(m, "STOP_EMPTY", STOP_EMPTY) < 0
        || PyModule_AddIntConstant(m, "STOP_BUDGET", STOP_BUDGET) < 0
        || PyModule_AddIntConstant(m, "STOP_PYTHON", STOP_PYTHON) < 0
        || PyModule_AddIntConstant(m, "STOP_FLUSH", STOP_FLUSH) < 0
        || PyModule_AddIntConstant(m, "WRITES_DECLINED", WRITES_DECLINED) < 0
        || PyModule_AddIntConstant(m, "WRITES_SENT", WRITES_SENT) < 0
        || PyModule_AddIntConstant(m, "WRITES_HELD", WRITES_HELD) < 0
        || PyModule_AddIntConstant(m, "MAP_SHORT", MAP_SHORT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&TallyType);
    Py_INCREF(&TableType);
    Py_INCREF(&LaneType);
    if (PyModule_AddObject(m, "Tally", (PyObject *)&TallyType) < 0
        || PyModule_AddObject(m, "Table", (PyObject *)&TableType) < 0
        || PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
