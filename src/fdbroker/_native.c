/* fdbroker._native: the broker's data plane for prefetched GET tokens, in C.
 *
 * The one piece of C in the broker, and it parses bytes from clients: it is kept small, every index and length
 * is checked before use, tokens are compared in constant time, and tests/test_native_fuzz.py runs random and
 * adversarial frames through it and through the pure-Python twin (fdbroker/broker/fastpath.py), which must
 * answer identically, bytes and descriptors (under AddressSanitizer too: `make asan-fuzz`).
 *
 * What lives here (docs/performance.md, "The native data plane"):
 *
 *   Table   prefetched GET tokens (single and batch), issued here from the kernel's randomness and bound to a
 *           session, a uid, an expiry and a *grant*: the entries they deliver, as slots. A slot is an entry's
 *           held descriptor (borrowed: the registry owns it), a generation (bumped when the entry leaves, so the
 *           tokens issued for it stop matching) and the entry's encoded DeliverItem tail (NULL while the entry
 *           changes or is under an exclusive lease: then its tokens go to Python). Retired tokens are remembered
 *           (the last 4096) to say "already used" or "expired", as the Python token book does.
 *   Reader  the reader callback of one conduit connection on the event loop: one recvmsg; when the read is
 *           nothing but complete Redeem frames whose tokens all deliver, it answers them here (Deliver frames
 *           spliced from the slots' tails, one sendmsg each); anything else — descriptors, control data, another
 *           frame, a token that fails, a partial frame — goes to the connection's Python code unchanged
 *           (Connection._consume), which answers exactly as it would have without this module.
 *   exchange()  the client's half: send a Redeem, wait for one read, and recognise the Deliver that answers it
 *           without a protobuf parse.
 *
 * Descriptor ownership: the Table never owns a descriptor. Slot descriptors are the registry's, valid while the
 * slot is live; Python calls slot_drop() before it gives an entry's descriptor up, on the one event loop thread
 * that also runs every Reader. Descriptors that arrive on a connection are never kept here: a read that brings
 * any is handed to Python with them. Nothing here closes a descriptor.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>

#define TOKEN_BYTES 32
#define SCM_MAX_FD 253
#define RETIRED_MEMORY 4096
#define RETIRED_BUCKETS 8192
#define OP_GET 2

/* Outcomes of a lookup (Table.redeem and friends); the Python twin uses the same numbers. */
enum { ST_OK = 0, ST_MALFORMED = 1, ST_UNKNOWN = 2, ST_REUSED = 3, ST_EXPIRED_BEFORE = 4, ST_EXPIRED = 5,
       ST_FOREIGN = 6 };
enum { R_REUSED = 1, R_EXPIRED = 2 };

typedef struct {
    uint8_t t[TOKEN_BYTES];
    double exp;
    int32_t hnext, qprev, qnext, sprev, snext, grant;
    uint32_t sess; /* session index */
    uint8_t live, mark;
} Tok;

typedef struct {
    PyObject *payload; /* what Python attached: handed back on redeem */
    int32_t refs, n, next_free;
    uint8_t batch; /* a batch token: one frame of every slot, however many */
    int32_t *slots;
    uint32_t *gens;
} Grant;

typedef struct {
    int fd;
    uint32_t gen;
    int32_t next_free;
    uint8_t live;
    uint8_t *tail;
    Py_ssize_t tail_len;
} Slot;

typedef struct {
    uint32_t gen;
    int32_t head, uidx, next_free;
    uint8_t live;
} Sess;

typedef struct {
    uint32_t uid;
    Py_ssize_t count;
} UidCount;

typedef struct {
    uint8_t t[TOKEN_BYTES];
    int32_t hnext;
    uint8_t reason; /* 0: empty */
} Ret;

typedef struct {
    PyObject_HEAD
    Tok *toks;
    int32_t ntoks, captoks, free_tok;
    int32_t *buckets;
    uint32_t nbuckets;
    int32_t qhead, qtail;
    Py_ssize_t live;
    Grant *grants;
    int32_t ngrants, capgrants, free_grant;
    Slot *slots;
    int32_t nslots, capslots, free_slot;
    Sess *sess;
    int32_t nsess, capsess, free_sess;
    UidCount *uids;
    int32_t nuids, capuids;
    Ret ret[RETIRED_MEMORY];
    int32_t rbuckets[RETIRED_BUCKETS];
    int32_t rpos;
    uint8_t pool[4096];
    int pool_pos;
    int seeded;
    uint64_t seed_state;
    int manual;
    double now_manual;
    uint8_t *scratch;
    Py_ssize_t scratch_cap;
    unsigned long long frames_served, fds_served, reads_passed;
} Table;

static PyTypeObject TableType;
static PyTypeObject ReaderType;

/* -- small helpers --------------------------------------------------------------------------------------- */

static int ct_eq(const uint8_t *a, const uint8_t *b) {
    volatile uint8_t d = 0;
    for (int i = 0; i < TOKEN_BYTES; i++) d |= (uint8_t)(a[i] ^ b[i]);
    return d == 0;
}

static uint64_t lookup_of(const uint8_t *t) {
    uint64_t k;
    memcpy(&k, t, sizeof k);
    return k;
}

static double table_now(Table *T) {
    if (T->manual) return T->now_manual;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int grow(void **arr, int32_t *cap, int32_t need, size_t elem) {
    if (need <= *cap) return 0;
    int64_t ncap = *cap ? (int64_t)*cap * 2 : 64;
    while (ncap < need) ncap *= 2;
    if (ncap > INT32_MAX / 2) {
        PyErr_NoMemory();
        return -1;
    }
    void *p = PyMem_Realloc(*arr, (size_t)ncap * elem);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    *arr = p;
    *cap = (int32_t)ncap;
    return 0;
}

static uint8_t *scratch(Table *T, Py_ssize_t need) {
    if (need > T->scratch_cap) {
        Py_ssize_t cap = T->scratch_cap ? T->scratch_cap : 4096;
        while (cap < need) cap *= 2;
        uint8_t *p = PyMem_Realloc(T->scratch, (size_t)cap);
        if (!p) {
            PyErr_NoMemory();
            return NULL;
        }
        T->scratch = p;
        T->scratch_cap = cap;
    }
    return T->scratch;
}

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* 32 fresh random bytes: the kernel's (getrandom, 4 KiB at a time), or a seeded sequence for tests. */
static int random_token(Table *T, uint8_t *out) {
    if (T->seeded) {
        for (int i = 0; i < 4; i++) {
            uint64_t x = splitmix64(&T->seed_state);
            for (int b = 0; b < 8; b++) out[i * 8 + b] = (uint8_t)(x >> (8 * b));
        }
        return 0;
    }
    if (T->pool_pos + TOKEN_BYTES > (int)sizeof T->pool) {
        size_t got = 0;
        while (got < sizeof T->pool) {
            ssize_t r = getrandom(T->pool + got, sizeof T->pool - got, 0);
            if (r < 0) {
                if (errno == EINTR) continue;
                PyErr_SetFromErrno(PyExc_OSError);
                return -1;
            }
            got += (size_t)r;
        }
        T->pool_pos = 0;
    }
    memcpy(out, T->pool + T->pool_pos, TOKEN_BYTES);
    T->pool_pos += TOKEN_BYTES;
    return 0;
}

static int put_varint(uint8_t *p, uint64_t v) {
    int n = 0;
    while (v >= 0x80) {
        p[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

static int varint_len(uint64_t v) {
    int n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

/* -- sessions, uids, slots ------------------------------------------------------------------------------- */

static int valid_session(Table *T, long long key, uint32_t *idx) {
    if (key < 0) return 0;
    uint32_t i = (uint32_t)(key & 0xFFFFFF), gen = (uint32_t)(key >> 24);
    if ((int32_t)i >= T->nsess || !T->sess[i].live || T->sess[i].gen != gen) return 0;
    *idx = i;
    return 1;
}

static int32_t uid_index(Table *T, uint32_t uid, int create) {
    for (int32_t i = 0; i < T->nuids; i++)
        if (T->uids[i].uid == uid) return i;
    if (!create) return -1;
    if (grow((void **)&T->uids, &T->capuids, T->nuids + 1, sizeof(UidCount)) < 0) return -2;
    T->uids[T->nuids].uid = uid;
    T->uids[T->nuids].count = 0;
    return T->nuids++;
}

static int slot_ok(Table *T, int32_t s, uint32_t gen) {
    return s >= 0 && s < T->nslots && T->slots[s].live && T->slots[s].gen == gen;
}

/* -- retired tokens -------------------------------------------------------------------------------------- */

static void retire(Table *T, const uint8_t *t, uint8_t reason) {
    int32_t i = T->rpos;
    Ret *r = &T->ret[i];
    if (r->reason) { /* the oldest is forgotten: unlink it from its chain */
        uint32_t b = (uint32_t)(lookup_of(r->t) & (RETIRED_BUCKETS - 1));
        int32_t *pp = &T->rbuckets[b];
        while (*pp >= 0 && *pp != i) pp = &T->ret[*pp].hnext;
        if (*pp == i) *pp = r->hnext;
    }
    memcpy(r->t, t, TOKEN_BYTES);
    r->reason = reason;
    uint32_t b = (uint32_t)(lookup_of(t) & (RETIRED_BUCKETS - 1));
    r->hnext = T->rbuckets[b];
    T->rbuckets[b] = i;
    T->rpos = (i + 1) % RETIRED_MEMORY;
}

/* The newest retired record whose lookup id (first 8 bytes) is t's, or -1. */
static int32_t retired_find(Table *T, const uint8_t *t) {
    uint64_t k = lookup_of(t);
    for (int32_t i = T->rbuckets[k & (RETIRED_BUCKETS - 1)]; i >= 0; i = T->ret[i].hnext)
        if (lookup_of(T->ret[i].t) == k) return i;
    return -1;
}

/* -- live tokens ----------------------------------------------------------------------------------------- */

static int32_t live_find(Table *T, const uint8_t *t) {
    uint64_t k = lookup_of(t);
    for (int32_t i = T->buckets[k & (T->nbuckets - 1)]; i >= 0; i = T->toks[i].hnext)
        if (lookup_of(T->toks[i].t) == k) return i;
    return -1;
}

static int rehash(Table *T, uint32_t n) {
    int32_t *b = PyMem_Malloc((size_t)n * sizeof(int32_t));
    if (!b) {
        PyErr_NoMemory();
        return -1;
    }
    for (uint32_t i = 0; i < n; i++) b[i] = -1;
    for (int32_t i = 0; i < T->ntoks; i++) {
        if (!T->toks[i].live) continue;
        uint32_t h = (uint32_t)(lookup_of(T->toks[i].t) & (n - 1));
        T->toks[i].hnext = b[h];
        b[h] = i;
    }
    PyMem_Free(T->buckets);
    T->buckets = b;
    T->nbuckets = n;
    return 0;
}

static void grant_release(Table *T, int32_t g) {
    Grant *G = &T->grants[g];
    if (--G->refs > 0) return;
    Py_CLEAR(G->payload);
    PyMem_Free(G->slots);
    PyMem_Free(G->gens);
    G->slots = NULL;
    G->gens = NULL;
    G->n = 0;
    G->next_free = T->free_grant;
    T->free_grant = g;
}

/* Take token i out of every index; remember it as ``reason`` (0: forget it, as a cancel or a void does). */
static void tok_remove(Table *T, int32_t i, uint8_t reason) {
    Tok *k = &T->toks[i];
    uint32_t h = (uint32_t)(lookup_of(k->t) & (T->nbuckets - 1));
    int32_t *pp = &T->buckets[h];
    while (*pp >= 0 && *pp != i) pp = &T->toks[*pp].hnext;
    if (*pp == i) *pp = k->hnext;
    if (k->qprev >= 0) T->toks[k->qprev].qnext = k->qnext; else T->qhead = k->qnext;
    if (k->qnext >= 0) T->toks[k->qnext].qprev = k->qprev; else T->qtail = k->qprev;
    Sess *S = &T->sess[k->sess];
    if (k->sprev >= 0) T->toks[k->sprev].snext = k->snext; else S->head = k->snext;
    if (k->snext >= 0) T->toks[k->snext].sprev = k->sprev;
    T->uids[S->uidx].count--;
    T->live--;
    if (reason) retire(T, k->t, reason);
    grant_release(T, k->grant);
    k->live = 0;
    k->mark = 0;
    k->hnext = T->free_tok;
    T->free_tok = i;
}

/* Find ``t`` as the Python token book's _find does: the live token whose lookup id matches and whose 32 bytes
 * are equal (constant time); otherwise why not (retired: reused or expired; unknown). A live token found
 * expired is retired as "expired" here. Returns the status; *idx is the live token (ST_OK, ST_FOREIGN). */
static int find_token(Table *T, const uint8_t *t, Py_ssize_t len, uint32_t sess, double now, int32_t *idx,
                      PyObject **payload) {
    *idx = -1;
    if (payload) *payload = NULL;
    if (len != TOKEN_BYTES) return ST_MALFORMED;
    int32_t i = live_find(T, t);
    if (i < 0 || !ct_eq(T->toks[i].t, t)) {
        if (i < 0) {
            int32_t r = retired_find(T, t);
            if (r >= 0 && ct_eq(T->ret[r].t, t)) return T->ret[r].reason == R_REUSED ? ST_REUSED : ST_EXPIRED_BEFORE;
        }
        return ST_UNKNOWN;
    }
    Tok *k = &T->toks[i];
    if (k->exp <= now) {
        if (payload) {
            *payload = T->grants[k->grant].payload;
            Py_INCREF(*payload);
        }
        tok_remove(T, i, R_EXPIRED);
        return ST_EXPIRED;
    }
    *idx = i;
    if (payload) *payload = T->grants[k->grant].payload;
    return k->sess == sess ? ST_OK : ST_FOREIGN;
}

/* -- Table: Python API ----------------------------------------------------------------------------------- */

static PyObject *Table_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"seed", NULL};
    PyObject *seed = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O", kwlist, &seed)) return NULL;
    Table *T = (Table *)type->tp_alloc(type, 0);
    if (!T) return NULL;
    T->free_tok = T->free_grant = T->free_slot = T->free_sess = -1;
    T->qhead = T->qtail = -1;
    for (int i = 0; i < RETIRED_BUCKETS; i++) T->rbuckets[i] = -1;
    T->pool_pos = (int)sizeof T->pool;
    if (seed != Py_None) {
        T->seeded = 1;
        T->seed_state = PyLong_AsUnsignedLongLongMask(seed);
        if (PyErr_Occurred()) {
            Py_DECREF(T);
            return NULL;
        }
    }
    if (rehash(T, 1024) < 0) {
        Py_DECREF(T);
        return NULL;
    }
    return (PyObject *)T;
}

static int Table_traverse(Table *T, visitproc visit, void *arg) {
    for (int32_t g = 0; g < T->ngrants; g++) Py_VISIT(T->grants[g].payload);
    return 0;
}

static int Table_clear(Table *T) {
    for (int32_t g = 0; g < T->ngrants; g++) Py_CLEAR(T->grants[g].payload);
    return 0;
}

static void Table_dealloc(Table *T) {
    PyObject_GC_UnTrack(T);
    Table_clear(T);
    for (int32_t g = 0; g < T->ngrants; g++) {
        PyMem_Free(T->grants[g].slots);
        PyMem_Free(T->grants[g].gens);
    }
    for (int32_t s = 0; s < T->nslots; s++) PyMem_Free(T->slots[s].tail);
    PyMem_Free(T->toks);
    PyMem_Free(T->buckets);
    PyMem_Free(T->grants);
    PyMem_Free(T->slots);
    PyMem_Free(T->sess);
    PyMem_Free(T->uids);
    PyMem_Free(T->scratch);
    Py_TYPE(T)->tp_free((PyObject *)T);
}

static PyObject *Table_set_now(Table *T, PyObject *arg) {
    if (arg == Py_None) {
        T->manual = 0;
        Py_RETURN_NONE;
    }
    double v = PyFloat_AsDouble(arg);
    if (v == -1.0 && PyErr_Occurred()) return NULL;
    T->manual = 1;
    T->now_manual = v;
    Py_RETURN_NONE;
}

static PyObject *Table_now(Table *T, PyObject *unused) { return PyFloat_FromDouble(table_now(T)); }

static PyObject *Table_session_open(Table *T, PyObject *arg) {
    unsigned long uid = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (uid > UINT32_MAX) return PyErr_Format(PyExc_OverflowError, "uid %lu out of range", uid);
    int32_t u = uid_index(T, (uint32_t)uid, 1);
    if (u < 0) return NULL;
    int32_t i = T->free_sess;
    if (i >= 0) {
        T->free_sess = T->sess[i].next_free;
    } else {
        if (T->nsess >= 0xFFFFFF) return PyErr_Format(PyExc_OverflowError, "too many sessions");
        if (grow((void **)&T->sess, &T->capsess, T->nsess + 1, sizeof(Sess)) < 0) return NULL;
        i = T->nsess++;
        T->sess[i].gen = 0;
    }
    Sess *S = &T->sess[i];
    S->gen = (S->gen + 1) & 0xFFFFFF;
    S->live = 1;
    S->head = -1;
    S->uidx = u;
    return PyLong_FromLongLong(((long long)S->gen << 24) | i);
}

static PyObject *Table_session_close(Table *T, PyObject *arg) {
    long long key = PyLong_AsLongLong(arg);
    if (key == -1 && PyErr_Occurred()) return NULL;
    uint32_t i;
    if (!valid_session(T, key, &i)) return PyLong_FromLong(0);
    long n = 0;
    while (T->sess[i].head >= 0) {
        tok_remove(T, T->sess[i].head, 0);
        n++;
    }
    T->sess[i].live = 0;
    T->sess[i].next_free = T->free_sess;
    T->free_sess = (int32_t)i;
    return PyLong_FromLong(n);
}

static PyObject *Table_slot_new(Table *T, PyObject *arg) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    if (fd < 0 || fd > INT32_MAX) return PyErr_Format(PyExc_ValueError, "descriptor %ld", fd);
    int32_t s = T->free_slot;
    if (s >= 0) {
        T->free_slot = T->slots[s].next_free;
    } else {
        if (grow((void **)&T->slots, &T->capslots, T->nslots + 1, sizeof(Slot)) < 0) return NULL;
        s = T->nslots++;
        memset(&T->slots[s], 0, sizeof(Slot));
    }
    Slot *S = &T->slots[s];
    S->gen++;
    S->live = 1;
    S->fd = (int)fd;
    S->tail = NULL;
    S->tail_len = 0;
    return PyLong_FromLong(s);
}

static int arg_slot(Table *T, PyObject *o, int32_t *s) {
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < 0 || v >= T->nslots || !T->slots[v].live) {
        PyErr_Format(PyExc_ValueError, "no live slot %ld", v);
        return -1;
    }
    *s = (int32_t)v;
    return 0;
}

static PyObject *Table_slot_tail(Table *T, PyObject *args) {
    PyObject *so, *tail;
    int32_t s;
    if (!PyArg_ParseTuple(args, "OO", &so, &tail) || arg_slot(T, so, &s) < 0) return NULL;
    Slot *S = &T->slots[s];
    if (tail == Py_None) {
        PyMem_Free(S->tail);
        S->tail = NULL;
        S->tail_len = 0;
        Py_RETURN_NONE;
    }
    if (!PyBytes_Check(tail)) return PyErr_Format(PyExc_TypeError, "tail must be bytes or None");
    Py_ssize_t n = PyBytes_GET_SIZE(tail);
    uint8_t *p = PyMem_Malloc(n ? (size_t)n : 1);
    if (!p) return PyErr_NoMemory();
    memcpy(p, PyBytes_AS_STRING(tail), (size_t)n);
    PyMem_Free(S->tail);
    S->tail = p;
    S->tail_len = n;
    Py_RETURN_NONE;
}

static PyObject *Table_slot_drop(Table *T, PyObject *arg) {
    int32_t s;
    if (arg_slot(T, arg, &s) < 0) return NULL;
    Slot *S = &T->slots[s];
    PyMem_Free(S->tail);
    S->tail = NULL;
    S->tail_len = 0;
    S->live = 0;
    S->fd = -1;
    S->gen++; /* the tokens issued for it stop matching */
    S->next_free = T->free_slot;
    T->free_slot = s;
    Py_RETURN_NONE;
}

/* issue(session_key, slots, count, expires_at, payload) -> list of tokens (bytes). ``slots``: one slot (a
 * single GET token) or a sequence of slots (a batch token, delivered as one frame); every slot must be live. */
static PyObject *Table_issue(Table *T, PyObject *args) {
    long long key;
    PyObject *slots, *payload;
    Py_ssize_t count;
    double exp;
    if (!PyArg_ParseTuple(args, "LOndO", &key, &slots, &count, &exp, &payload)) return NULL;
    uint32_t si;
    if (!valid_session(T, key, &si)) return PyErr_Format(PyExc_ValueError, "no such session");
    if (count < 0 || count > 1 << 20) return PyErr_Format(PyExc_ValueError, "count %zd", count);
    PyObject *seq = NULL;
    Py_ssize_t n = 1;
    int32_t single = -1;
    if (PyLong_Check(slots)) {
        if (arg_slot(T, slots, &single) < 0) return NULL;
    } else {
        seq = PySequence_Fast(slots, "slots must be an int or a sequence of ints");
        if (!seq) return NULL;
        n = PySequence_Fast_GET_SIZE(seq);
        if (n < 1 || n > SCM_MAX_FD) {
            Py_DECREF(seq);
            return PyErr_Format(PyExc_ValueError, "a batch holds 1..%d entries, not %zd", SCM_MAX_FD, n);
        }
    }
    PyObject *out = PyList_New(0);
    if (!out) goto fail_seq;
    if (count == 0) {
        Py_XDECREF(seq);
        return out;
    }
    /* the grant, shared by every token of this call */
    int32_t g = T->free_grant;
    if (g >= 0) {
        T->free_grant = T->grants[g].next_free;
    } else {
        if (grow((void **)&T->grants, &T->capgrants, T->ngrants + 1, sizeof(Grant)) < 0) goto fail;
        g = T->ngrants++;
        memset(&T->grants[g], 0, sizeof(Grant));
    }
    Grant *G = &T->grants[g];
    G->slots = PyMem_Malloc((size_t)n * sizeof(int32_t));
    G->gens = PyMem_Malloc((size_t)n * sizeof(uint32_t));
    G->n = 0;
    G->batch = seq != NULL;
    G->refs = 1; /* held by this call until its end */
    Py_INCREF(payload);
    G->payload = payload;
    if (!G->slots || !G->gens) {
        PyErr_NoMemory();
        goto fail_grant;
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        int32_t s = single;
        if (seq && arg_slot(T, PySequence_Fast_GET_ITEM(seq, j), &s) < 0) goto fail_grant;
        G->slots[j] = s;
        G->gens[j] = T->slots[s].gen;
    }
    G->n = (int32_t)n;
    if (grow((void **)&T->toks, &T->captoks, T->ntoks + (int32_t)count, sizeof(Tok)) < 0) goto fail_grant;
    if ((uint64_t)(T->live + count) > T->nbuckets && rehash(T, T->nbuckets * 2 > (uint64_t)(T->live + count)
                                                                   ? T->nbuckets * 2
                                                                   : (uint32_t)(T->live + count) * 2) < 0)
        goto fail_grant;
    Sess *S = &T->sess[si];
    for (Py_ssize_t c = 0; c < count; c++) {
        uint8_t t[TOKEN_BYTES];
        do { /* never shadow a live or a remembered token */
            if (random_token(T, t) < 0) goto fail_grant;
        } while (live_find(T, t) >= 0 || retired_find(T, t) >= 0);
        PyObject *b = PyBytes_FromStringAndSize((const char *)t, TOKEN_BYTES);
        if (!b || PyList_Append(out, b) < 0) {
            Py_XDECREF(b);
            goto fail_grant;
        }
        Py_DECREF(b);
        int32_t i = T->free_tok;
        if (i >= 0) T->free_tok = T->toks[i].hnext; else i = T->ntoks++;
        Tok *k = &T->toks[i];
        memcpy(k->t, t, TOKEN_BYTES);
        k->exp = exp;
        k->grant = g;
        k->sess = si;
        k->live = 1;
        k->mark = 0;
        uint32_t h = (uint32_t)(lookup_of(t) & (T->nbuckets - 1));
        k->hnext = T->buckets[h];
        T->buckets[h] = i;
        k->qnext = -1;
        k->qprev = T->qtail;
        if (T->qtail >= 0) T->toks[T->qtail].qnext = i; else T->qhead = i;
        T->qtail = i;
        k->sprev = -1;
        k->snext = S->head;
        if (S->head >= 0) T->toks[S->head].sprev = i;
        S->head = i;
        T->uids[S->uidx].count++;
        T->live++;
        G->refs++;
    }
    grant_release(T, g);
    Py_XDECREF(seq);
    return out;
fail_grant:
    /* tokens already issued by this call stay valid (they are in the list we drop): void them */
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(out); j++) {
        int32_t i = live_find(T, (const uint8_t *)PyBytes_AS_STRING(PyList_GET_ITEM(out, j)));
        if (i >= 0) tok_remove(T, i, 0);
    }
    grant_release(T, g);
fail:
    Py_DECREF(out);
fail_seq:
    Py_XDECREF(seq);
    return NULL;
}

/* redeem(token, session_key, consume) -> (status, payload). ST_OK: found for this session (consumed when
 * ``consume``, remembered as used); ST_FOREIGN: another session's (not consumed); ST_EXPIRED: found expired
 * (now retired); the others carry no payload. Uses the table's clock. */
static PyObject *Table_redeem(Table *T, PyObject *args) {
    Py_buffer tok;
    long long key;
    int consume;
    if (!PyArg_ParseTuple(args, "y*Lp", &tok, &key, &consume)) return NULL;
    uint32_t si;
    uint32_t sess = valid_session(T, key, &si) ? si : UINT32_MAX;
    int32_t i;
    PyObject *payload;
    int st = find_token(T, tok.buf, tok.len, sess, table_now(T), &i, &payload);
    PyBuffer_Release(&tok);
    PyObject *res;
    if (st == ST_EXPIRED) {
        res = Py_BuildValue("(iN)", st, payload);
    } else if (st == ST_OK || st == ST_FOREIGN) {
        res = Py_BuildValue("(iO)", st, payload);
        if (res && st == ST_OK && consume) tok_remove(T, i, R_REUSED);
    } else {
        res = Py_BuildValue("(iO)", st, Py_None);
    }
    return res;
}

/* cancel(token) -> payload or None: take back a live token whoever's it is, without remembering it. */
static PyObject *Table_cancel(Table *T, PyObject *arg) {
    Py_buffer tok;
    if (PyObject_GetBuffer(arg, &tok, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *res = Py_None;
    if (tok.len == TOKEN_BYTES) {
        int32_t i = live_find(T, tok.buf);
        if (i >= 0 && ct_eq(T->toks[i].t, tok.buf)) {
            res = T->grants[T->toks[i].grant].payload;
            Py_INCREF(res);
            tok_remove(T, i, 0);
            PyBuffer_Release(&tok);
            return res;
        }
    }
    PyBuffer_Release(&tok);
    Py_RETURN_NONE;
}

static PyObject *Table_expire(Table *T, PyObject *unused) {
    double now = table_now(T);
    long n = 0;
    while (T->qhead >= 0 && T->toks[T->qhead].exp <= now) {
        tok_remove(T, T->qhead, R_EXPIRED);
        n++;
    }
    return PyLong_FromLong(n);
}

static PyObject *Table_next_expiry(Table *T, PyObject *unused) {
    if (T->qhead < 0) Py_RETURN_NONE;
    return PyFloat_FromDouble(T->toks[T->qhead].exp);
}

static PyObject *Table_count_for_uid(Table *T, PyObject *arg) {
    unsigned long uid = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred()) return NULL;
    int32_t u = uid <= UINT32_MAX ? uid_index(T, (uint32_t)uid, 0) : -1;
    return PyLong_FromSsize_t(u >= 0 ? T->uids[u].count : 0);
}

static Py_ssize_t Table_len(Table *T) { return T->live; }

static PyObject *Table_stats(Table *T, PyObject *unused) {
    return Py_BuildValue("{sKsKsKsn}", "frames_served", T->frames_served, "fds_served", T->fds_served,
                         "reads_passed", T->reads_passed, "live", T->live);
}

/* -- serving Redeem frames ------------------------------------------------------------------------------- */

/* A Redeem frame as fdbroker's clients write it: ConduitFrame{redeem(6){tokens(1): 32 bytes}*} and nothing
 * else. Sets *first to its first token and *k to their number; 0 if the body is anything else (then Python
 * reads it, whatever it is). */
static int canonical_redeem(const uint8_t *b, Py_ssize_t n, const uint8_t **first, Py_ssize_t *k) {
    if (n < 2 || b[0] != 0x32) return 0;
    uint64_t len = 0;
    int shift = 0;
    Py_ssize_t p = 1;
    for (;;) {
        if (p >= n || shift > 56) return 0;
        uint8_t c = b[p++];
        len |= (uint64_t)(c & 0x7F) << shift;
        if (!(c & 0x80)) break;
        shift += 7;
    }
    if (varint_len(len) != p - 1) return 0; /* not minimally encoded: let protobuf judge it */
    if ((uint64_t)(n - p) != len || len == 0 || len % (2 + TOKEN_BYTES)) return 0;
    for (Py_ssize_t q = p; q < n; q += 2 + TOKEN_BYTES)
        if (b[q] != 0x0a || b[q + 1] != TOKEN_BYTES) return 0;
    *first = b + p + 2;
    *k = (Py_ssize_t)(len / (2 + TOKEN_BYTES));
    return 1;
}

typedef struct {
    PyObject_HEAD
    Table *table;
    PyObject *conn;  /* the Python Connection: fallbacks go there */
    PyObject *rbuf;  /* its reused bytearray */
    int fd;
    int python_only; /* set by Python while its decoder holds a partial frame or its output is queued */
    long long key;   /* the session's key in the table; -1 before the Welcome */
    Py_ssize_t recv_bytes, max_frame;
    PyObject *accounts; /* a tuple of dicts, all empty when no descriptor is in flight for anyone; or NULL */
} Reader;

static PyObject *str_throttled; /* "_throttled", interned at import */

/* Nothing in flight for any uid (every dict of the accounts is empty) and the connection not throttled (its
 * _throttled is False: a pause episode ends in _read_size, which logs it); anything else: ask Python. */
static int nothing_in_flight(Reader *R) {
    if (!R->accounts) return 0;
    Py_ssize_t n = PyTuple_GET_SIZE(R->accounts);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *d = PyTuple_GET_ITEM(R->accounts, i);
        if (!PyDict_Check(d) || PyDict_GET_SIZE(d) != 0) return 0;
    }
    PyObject *th = PyObject_GetAttr(R->conn, str_throttled);
    if (!th) {
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(th);
    return th == Py_False;
}

static uint32_t be32(const uint8_t *b) {
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | (uint32_t)b[3];
}

/* Can this one token of the reader's session deliver right now, every entry of its grant included? */
static int32_t deliverable(Table *T, uint32_t si, const uint8_t *t, double now) {
    int32_t i = live_find(T, t);
    if (i < 0 || !ct_eq(T->toks[i].t, t)) return -1;
    Tok *tk = &T->toks[i];
    if (tk->exp <= now || tk->sess != si) return -1;
    Grant *G = &T->grants[tk->grant];
    for (int32_t e = 0; e < G->n; e++)
        if (!slot_ok(T, G->slots[e], G->gens[e]) || !T->slots[G->slots[e]].tail) return -1;
    return i;
}

/* delivery.FRAME_OVERHEAD: what a Deliver frame takes around its items */
#define FRAME_OVERHEAD 32

/* Is the read nothing but complete Redeem frames whose tokens all deliver now, each token once? */
static int plan_read(Table *T, Reader *R, const uint8_t *data, Py_ssize_t n, double now) {
    uint32_t si;
    if (!valid_session(T, R->key, &si)) return 0;
    Py_ssize_t p = 0;
    int ok = 1;
    while (p < n) {
        if (n - p < 4) { ok = 0; break; }
        uint32_t len = be32(data + p);
        const uint8_t *first;
        Py_ssize_t k;
        if (len < 1 || len > (uint64_t)R->max_frame || (Py_ssize_t)len > n - p - 4 ||
            !canonical_redeem(data + p + 4, len, &first, &k)) {
            ok = 0;
            break;
        }
        p += 4 + (Py_ssize_t)len; /* a whole canonical frame: its marks are undone below */
        /* its single tokens are answered by one Deliver: at most 253 items within max_frame bytes (more is split
         * by Python, delivery.deliver_frames) */
        Py_ssize_t singles = 0, sbytes = 0;
        for (Py_ssize_t j = 0; j < k && ok; j++) {
            int32_t i = deliverable(T, si, first + j * (2 + TOKEN_BYTES), now);
            if (i < 0 || T->toks[i].mark) { ok = 0; break; } /* twice in one read: the second is refused, by Python */
            T->toks[i].mark = 1;
            Grant *G = &T->grants[T->toks[i].grant];
            if (!G->batch) {
                Py_ssize_t body = 2 + TOKEN_BYTES + 2 + T->slots[G->slots[0]].tail_len;
                singles++;
                sbytes += 1 + varint_len((uint64_t)body) + body;
                if (singles > SCM_MAX_FD || sbytes > R->max_frame - FRAME_OVERHEAD) ok = 0;
            }
        }
        if (!ok) break;
    }
    for (Py_ssize_t q = 0; q < p;) {
        uint32_t len = be32(data + q);
        const uint8_t *first;
        Py_ssize_t k;
        if (canonical_redeem(data + q + 4, len, &first, &k))
            for (Py_ssize_t j = 0; j < k; j++) {
                int32_t i = live_find(T, first + j * (2 + TOKEN_BYTES));
                if (i >= 0) T->toks[i].mark = 0;
            }
        q += 4 + (Py_ssize_t)len;
    }
    return ok && p == n;
}

/* Send one encoded frame with its descriptors. A frame the socket does not take at once, whole, goes to the
 * connection's Python send_raw: it queues the rest (with duplicates of the descriptors until they are on the
 * wire), or meets the error again and closes the connection. */
static int send_frame(Reader *R, const uint8_t *buf, Py_ssize_t len, const int *fds, int nfds) {
    if (!R->python_only) {
        union {
            char buf[CMSG_SPACE(SCM_MAX_FD * sizeof(int))];
            struct cmsghdr align;
        } u;
        struct iovec iov = {(void *)buf, (size_t)len};
        struct msghdr msg = {0};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        if (nfds > 0) {
            msg.msg_control = u.buf;
            msg.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
            struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
            memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
        }
        ssize_t sent;
        do sent = sendmsg(R->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        while (sent < 0 && errno == EINTR);
        if (sent == len) return 0;
        if (sent > 0) { /* the descriptors went with the first byte */
            PyObject *r = PyObject_CallMethod(R->conn, "send_raw", "y#", buf + sent, (Py_ssize_t)(len - sent));
            Py_XDECREF(r);
            return r ? 0 : -1;
        }
    }
    PyObject *lst = PyList_New(nfds);
    if (!lst) return -1;
    for (int i = 0; i < nfds; i++) {
        PyObject *v = PyLong_FromLong(fds[i]);
        if (!v) {
            Py_DECREF(lst);
            return -1;
        }
        PyList_SET_ITEM(lst, i, v);
    }
    PyObject *r = PyObject_CallMethod(R->conn, "send_raw", "y#O", buf, len, lst);
    Py_DECREF(lst);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

/* One Deliver frame of the n slots into the table's scratch buffer (*out): item e tagged with toks[e] when it is
 * not NULL (a batch: its first only), operation GET, the slot's tail; their descriptors into fds. Returns the
 * frame's length, or -1 (no memory). */
static Py_ssize_t encode_deliver(Table *T, const int32_t *slots, const uint8_t *const *toks, int n, int *fds,
                                 uint8_t **out) {
    Py_ssize_t items = 0;
    for (int e = 0; e < n; e++) {
        Py_ssize_t body = (toks[e] ? 2 + TOKEN_BYTES : 0) + 2 + T->slots[slots[e]].tail_len;
        items += 1 + varint_len((uint64_t)body) + body;
    }
    Py_ssize_t inner = 1 + varint_len((uint64_t)n) + 1 + varint_len((uint64_t)items) + items;
    uint8_t *w = scratch(T, 4 + inner);
    if (!w) return -1;
    *out = w;
    w[0] = (uint8_t)(inner >> 24); w[1] = (uint8_t)(inner >> 16); w[2] = (uint8_t)(inner >> 8);
    w[3] = (uint8_t)inner;
    w += 4;
    *w++ = 0x08; /* fd_count */
    w += put_varint(w, (uint64_t)n);
    *w++ = 0x2a; /* deliver */
    w += put_varint(w, (uint64_t)items);
    for (int e = 0; e < n; e++) {
        Slot *S = &T->slots[slots[e]];
        Py_ssize_t body = (toks[e] ? 2 + TOKEN_BYTES : 0) + 2 + S->tail_len;
        *w++ = 0x0a; /* items */
        w += put_varint(w, (uint64_t)body);
        if (toks[e]) {
            *w++ = 0x0a; /* token */
            *w++ = TOKEN_BYTES;
            memcpy(w, toks[e], TOKEN_BYTES);
            w += TOKEN_BYTES;
        }
        *w++ = 0x18; /* operation */
        *w++ = OP_GET;
        memcpy(w, S->tail, (size_t)S->tail_len);
        w += S->tail_len;
        fds[e] = S->fd;
    }
    return 4 + inner;
}

/* Answer every (already checked) Redeem frame of the read, as Redemptions.on_redeem does: each batch token by a
 * Deliver of its own when met, the single tokens of a frame by one Deliver after it (plan_read: they fit). A send
 * that calls into Python (a full socket, a failed write) may end the session or drop entries: every token is
 * checked again before it is used, and the first that no longer delivers ends the answering (the connection
 * is closing then). */
static int answer_read(Table *T, Reader *R, const uint8_t *data, Py_ssize_t n) {
    uint8_t *out;
    Py_ssize_t p = 0;
    double now = table_now(T);
    while (p < n) {
        uint32_t len = be32(data + p);
        const uint8_t *first;
        Py_ssize_t k;
        canonical_redeem(data + p + 4, len, &first, &k);
        p += 4 + (Py_ssize_t)len;
        /* singles: (slot, token) pairs gathered, sent after the frame's batch tokens */
        int32_t sslots[SCM_MAX_FD];
        const uint8_t *stoks[SCM_MAX_FD];
        int ns = 0;
        for (Py_ssize_t j = 0; j < k; j++) {
            const uint8_t *t = first + j * (2 + TOKEN_BYTES);
            uint32_t si;
            int32_t i = valid_session(T, R->key, &si) ? deliverable(T, si, t, now) : -1;
            if (i < 0) return 0;
            Grant *G = &T->grants[T->toks[i].grant];
            if (!G->batch) {
                if (ns == SCM_MAX_FD) return 0; /* cannot be: plan_read counted at most 253 */
                sslots[ns] = G->slots[0];
                stoks[ns] = t;
                ns++;
                tok_remove(T, i, R_REUSED);
                continue;
            }
            /* a batch token: its own frame, the first item tagged, the others not */
            int nb = G->n;
            int fds[SCM_MAX_FD];
            const uint8_t *btoks[SCM_MAX_FD] = {t};
            Py_ssize_t flen = encode_deliver(T, G->slots, btoks, nb, fds, &out);
            if (flen < 0) return -1;
            /* the token goes before the send: the frame's bytes are already in the scratch buffer */
            tok_remove(T, i, R_REUSED);
            if (send_frame(R, out, flen, fds, nb) < 0) return -1;
            T->frames_served++;
            T->fds_served += (unsigned long long)nb;
        }
        if (ns > 0) { /* one Deliver: plan_read saw to it that they fit one frame */
            for (int e = 0; e < ns; e++)
                if (!T->slots[sslots[e]].live || !T->slots[sslots[e]].tail) return 0;
            int fds[SCM_MAX_FD];
            Py_ssize_t flen = encode_deliver(T, sslots, stoks, ns, fds, &out);
            if (flen < 0) return -1;
            if (send_frame(R, out, flen, fds, ns) < 0) return -1;
            T->frames_served++;
            T->fds_served += (unsigned long long)ns;
        }
    }
    return 0;
}

/* The ancillary data of a recvmsg as socket.recvmsg_into returns it: [(level, type, data)]. */
static PyObject *ancdata_list(struct msghdr *msg) {
    PyObject *lst = PyList_New(0);
    if (!lst || msg->msg_controllen == 0) return lst;
    char *base = msg->msg_control, *end = base + msg->msg_controllen;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
        char *d = (char *)CMSG_DATA(c);
        if ((char *)c + CMSG_LEN(0) > end || c->cmsg_len < CMSG_LEN(0) || d > end) break;
        size_t dlen = c->cmsg_len - CMSG_LEN(0);
        if ((size_t)(end - d) < dlen) dlen = (size_t)(end - d);
        PyObject *t = Py_BuildValue("(iiy#)", c->cmsg_level, c->cmsg_type, d, (Py_ssize_t)dlen);
        if (!t || PyList_Append(lst, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(lst);
            return NULL;
        }
        Py_DECREF(t);
    }
    return lst;
}

/* The reader callback: see the file's comment. Every way out that is not "answered here" is Python's. */
static PyObject *Reader_call(Reader *R, PyObject *args, PyObject *kw) {
    Table *T = R->table;
    if (R->key < 0 || R->python_only || R->fd < 0) return PyObject_CallMethod(R->conn, "_readable", NULL);
    /* The cap on descriptors in flight (Connection._read_size): with none in flight anywhere and the connection
     * not throttled, its answer is a full read (a cap is at least 1), so it is not asked. */
    Py_ssize_t size = R->recv_bytes;
    if (!nothing_in_flight(R)) {
        PyObject *sz = PyObject_CallMethod(R->conn, "_read_size", NULL);
        if (!sz) return NULL;
        size = PyLong_AsSsize_t(sz);
        Py_DECREF(sz);
        if (size == -1 && PyErr_Occurred()) return NULL;
    }
    if (size != R->recv_bytes || PyByteArray_GET_SIZE(R->rbuf) < size)
        return PyObject_CallMethod(R->conn, "_readable", NULL);
    uint8_t *buf = (uint8_t *)PyByteArray_AS_STRING(R->rbuf);
    union {
        char buf[CMSG_SPACE(SCM_MAX_FD * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct iovec iov = {buf, (size_t)size};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.buf;
    msg.msg_controllen = sizeof u.buf;
    ssize_t n;
    do n = recvmsg(R->fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) Py_RETURN_NONE;
        return PyObject_CallMethod(R->conn, "_consume", "nOi", (Py_ssize_t)-errno, Py_None, 0);
    }
    if (n == 0 || msg.msg_controllen > 0 || (msg.msg_flags & MSG_CTRUNC)) {
        PyObject *anc = ancdata_list(&msg);
        if (!anc) return NULL; /* cannot happen short of memory; the descriptors are then lost to Python */
        PyObject *r = PyObject_CallMethod(R->conn, "_consume", "nNi", (Py_ssize_t)n, anc, msg.msg_flags);
        T->reads_passed++;
        return r;
    }
    if (!plan_read(T, R, buf, n, table_now(T))) {
        T->reads_passed++;
        return PyObject_CallMethod(R->conn, "_consume", "nOi", (Py_ssize_t)n, Py_None, 0);
    }
    /* copy: answering may call into Python, which may reuse the buffer */
    uint8_t stackbuf[512];
    uint8_t *copy = n <= (ssize_t)sizeof stackbuf ? stackbuf : PyMem_Malloc((size_t)n);
    if (!copy) return PyErr_NoMemory();
    memcpy(copy, buf, (size_t)n);
    int rc = answer_read(T, R, copy, n);
    if (copy != stackbuf) PyMem_Free(copy);
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
}

static int Reader_traverse(Reader *R, visitproc visit, void *arg) {
    Py_VISIT(R->table);
    Py_VISIT(R->conn);
    Py_VISIT(R->rbuf);
    Py_VISIT(R->accounts);
    return 0;
}

static int Reader_clear(Reader *R) {
    Py_CLEAR(R->table);
    Py_CLEAR(R->conn);
    Py_CLEAR(R->rbuf);
    Py_CLEAR(R->accounts);
    return 0;
}

static void Reader_dealloc(Reader *R) {
    PyObject_GC_UnTrack(R);
    Reader_clear(R);
    Py_TYPE(R)->tp_free((PyObject *)R);
}

/* reader(conn, fd, rbuf, max_frame_bytes, recv_bytes[, accounts]) -> Reader. ``accounts``: a tuple of dicts that
 * are all empty when no uid has a descriptor in flight (then conn._read_size is not asked; without it, always). */
static PyObject *Table_reader(Table *T, PyObject *args) {
    PyObject *conn, *rbuf, *accounts = NULL;
    int fd;
    Py_ssize_t max_frame, recv_bytes;
    if (!PyArg_ParseTuple(args, "OiO!nn|O!", &conn, &fd, &PyByteArray_Type, &rbuf, &max_frame, &recv_bytes,
                          &PyTuple_Type, &accounts))
        return NULL;
    if (recv_bytes < 4 || max_frame < 1) return PyErr_Format(PyExc_ValueError, "bad sizes");
    Reader *R = PyObject_GC_New(Reader, &ReaderType);
    if (!R) return NULL;
    Py_INCREF(T);
    R->table = T;
    Py_INCREF(conn);
    R->conn = conn;
    Py_INCREF(rbuf);
    R->rbuf = rbuf;
    R->fd = fd;
    R->python_only = 0;
    Py_XINCREF(accounts);
    R->accounts = accounts;
    R->key = -1;
    R->recv_bytes = recv_bytes;
    R->max_frame = max_frame;
    PyObject_GC_Track(R);
    return (PyObject *)R;
}

static PyObject *Reader_detach(Reader *R, PyObject *unused) {
    R->fd = -1;
    R->key = -1;
    Reader_clear(R);
    Py_RETURN_NONE;
}

static PyMemberDef Reader_members[] = {
    {"python_only", T_INT, offsetof(Reader, python_only), 0, "Python reads this connection (partial frame, queued output)"},
    {"key", T_LONGLONG, offsetof(Reader, key), 0, "the session's key in the table (-1: none)"},
    {NULL},
};

static PyMethodDef Reader_methods[] = {
    {"detach", (PyCFunction)Reader_detach, METH_NOARGS, "forget the connection (it closed)"},
    {NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fdbroker._native.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_call = (ternaryfunc)Reader_call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Reader_traverse,
    .tp_clear = (inquiry)Reader_clear,
    .tp_members = Reader_members,
    .tp_methods = Reader_methods,
    .tp_doc = "The reader callback of one conduit connection (Table.reader).",
};

static PyMethodDef Table_methods[] = {
    {"set_now", (PyCFunction)Table_set_now, METH_O, "set_now(t | None): a manual clock (tests), or CLOCK_MONOTONIC"},
    {"now", (PyCFunction)Table_now, METH_NOARGS, "the table's clock"},
    {"session_open", (PyCFunction)Table_session_open, METH_O, "session_open(uid) -> key"},
    {"session_close", (PyCFunction)Table_session_close, METH_O, "session_close(key) -> tokens voided"},
    {"slot_new", (PyCFunction)Table_slot_new, METH_O, "slot_new(fd) -> slot (the fd stays the caller's)"},
    {"slot_tail", (PyCFunction)Table_slot_tail, METH_VARARGS, "slot_tail(slot, tail | None)"},
    {"slot_drop", (PyCFunction)Table_slot_drop, METH_O, "slot_drop(slot): the entry left"},
    {"issue", (PyCFunction)Table_issue, METH_VARARGS, "issue(key, slots, count, expires_at, payload) -> tokens"},
    {"redeem", (PyCFunction)Table_redeem, METH_VARARGS, "redeem(token, key, consume) -> (status, payload)"},
    {"cancel", (PyCFunction)Table_cancel, METH_O, "cancel(token) -> payload | None"},
    {"expire", (PyCFunction)Table_expire, METH_NOARGS, "expire() -> tokens retired as expired"},
    {"next_expiry", (PyCFunction)Table_next_expiry, METH_NOARGS, "the earliest expiry, or None"},
    {"count_for_uid", (PyCFunction)Table_count_for_uid, METH_O, "live tokens of uid"},
    {"stats", (PyCFunction)Table_stats, METH_NOARGS, "counters of the native path"},
    {"reader", (PyCFunction)Table_reader, METH_VARARGS, "reader(conn, fd, rbuf, max_frame, recv_bytes)"},
    {NULL},
};

static PySequenceMethods Table_seq = {.sq_length = (lenfunc)Table_len};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fdbroker._native.Table",
    .tp_basicsize = sizeof(Table),
    .tp_new = Table_new,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Table_traverse,
    .tp_clear = (inquiry)Table_clear,
    .tp_methods = Table_methods,
    .tp_as_sequence = &Table_seq,
    .tp_doc = "Prefetched GET tokens and the slots they deliver (see the module's source).",
};

/* -- the client's half ----------------------------------------------------------------------------------- */

static int read_varint(const uint8_t *b, Py_ssize_t n, Py_ssize_t *p, uint64_t *v) {
    uint64_t x = 0;
    int shift = 0;
    while (*p < n && shift <= 63) {
        uint8_t c = b[(*p)++];
        x |= (uint64_t)(c & 0x7F) << shift;
        if (!(c & 0x80)) {
            *v = x;
            return 1;
        }
        shift += 7;
    }
    return 0;
}

/* Is b[0..n) exactly the Deliver frame that answers ``token`` with ``count`` descriptors (a single item for 1,
 * a batch for more)? Sets *item to the offset and *item_len to the length of the first item's body. */
static int match_deliver(const uint8_t *b, Py_ssize_t n, const uint8_t *token, Py_ssize_t count, Py_ssize_t *item,
                         Py_ssize_t *item_len) {
    if (n < 4) return 0;
    uint32_t len = ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | (uint32_t)b[3];
    if ((Py_ssize_t)len != n - 4) return 0;
    Py_ssize_t p = 4;
    uint64_t v;
    if (p >= n || b[p++] != 0x08 || !read_varint(b, n, &p, &v) || v != (uint64_t)count) return 0;
    if (p >= n || b[p++] != 0x2a || !read_varint(b, n, &p, &v) || v != (uint64_t)(n - p)) return 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (p >= n || b[p++] != 0x0a || !read_varint(b, n, &p, &v) || v > (uint64_t)(n - p)) return 0;
        if (i == 0) {
            if (v < 2 + TOKEN_BYTES || b[p] != 0x0a || b[p + 1] != TOKEN_BYTES ||
                memcmp(b + p + 2, token, TOKEN_BYTES) != 0)
                return 0;
            *item = p;
            *item_len = (Py_ssize_t)v;
        } else if (v == 0 || b[p] == 0x0a) {
            return 0; /* a batch's later items carry no token */
        }
        p += (Py_ssize_t)v;
    }
    return p == n;
}

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int wait_fd(int fd, short ev, double deadline) {
    for (;;) {
        int ms = -1;
        if (deadline >= 0) {
            double left = deadline - mono();
            if (left <= 0) return 0;
            ms = (int)(left * 1000 + 0.999);
            if (ms < 1) ms = 1;
        }
        struct pollfd pf = {fd, ev, 0};
        int r;
        Py_BEGIN_ALLOW_THREADS
        r = poll(&pf, 1, ms);
        Py_END_ALLOW_THREADS
        if (r > 0) return 1;
        if (r < 0 && errno != EINTR) return -1;
        if (r == 0 && deadline >= 0 && mono() >= deadline) return 0;
    }
}

/* exchange(fd, data, token, count, rbuf, timeout) -- the client's lean Redeem: send ``data`` (a Redeem frame)
 * whole on the non-blocking socket ``fd``, wait up to ``timeout`` seconds (negative: forever) for it to be
 * readable, and do one recvmsg into ``rbuf``. Returns
 *   (fds, body)            the read was exactly the Deliver answering ``token``: the caller owns ``fds`` (a list);
 *                          ``body`` is the DeliverItem's serialized body (one descriptor), or the whole
 *                          serialized ConduitFrame (a batch);
 *   (n, ancdata, flags)    anything else, as socket.recvmsg_into returns it, for the caller's frame decoder
 *                          (which then owns whatever descriptors ancdata carries);
 *   (-1, sent, errno)      the send failed after ``sent`` bytes;
 *   None                   nothing arrived in time (the Redeem was sent). */
static PyObject *native_exchange(PyObject *mod, PyObject *args) {
    int fd;
    Py_buffer data, token;
    Py_ssize_t count;
    PyObject *rbuf;
    double timeout;
    if (!PyArg_ParseTuple(args, "iy*y*nO!d", &fd, &data, &token, &count, &PyByteArray_Type, &rbuf, &timeout))
        return NULL;
    PyObject *res = NULL;
    if (token.len != TOKEN_BYTES || count < 1 || count > SCM_MAX_FD) {
        PyErr_SetString(PyExc_ValueError, "a 32-byte token and 1..253 descriptors");
        goto done;
    }
    double deadline = timeout < 0 ? -1 : mono() + timeout;
    Py_ssize_t sent = 0;
    /* The GIL is kept across the send and the recvmsg: with MSG_DONTWAIT they never block, and giving it up and
     * taking it back costs more than they do. It is given up only while waiting (wait_fd). */
    while (sent < data.len) {
        ssize_t r = send(fd, (char *)data.buf + sent, (size_t)(data.len - sent), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r >= 0) {
            sent += r;
            continue;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            int w = wait_fd(fd, POLLOUT, deadline);
            if (w > 0) continue;
            errno = w == 0 ? ETIMEDOUT : errno;
        }
        res = Py_BuildValue("(ini)", -1, sent, errno);
        goto done;
    }
    Py_buffer rb;
    if (PyObject_GetBuffer(rbuf, &rb, PyBUF_WRITABLE) < 0) goto done;
    union {
        char buf[CMSG_SPACE(SCM_MAX_FD * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct iovec iov = {rb.buf, (size_t)rb.len};
    struct msghdr msg = {0};
    ssize_t n;
    /* the answer cannot be there yet: wait first (a recvmsg now would only say EAGAIN) */
    int w0 = wait_fd(fd, POLLIN, deadline);
    if (w0 <= 0) {
        PyBuffer_Release(&rb);
        if (w0 < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        Py_INCREF(Py_None);
        res = Py_None;
        goto done;
    }
    for (;;) {
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = u.buf;
        msg.msg_controllen = sizeof u.buf;
        msg.msg_flags = 0;
        n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n >= 0) break;
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) break;
        int w = wait_fd(fd, POLLIN, deadline);
        if (w < 0) {
            n = -1;
            break;
        }
        if (w == 0) {
            PyBuffer_Release(&rb);
            Py_INCREF(Py_None);
            res = Py_None;
            goto done;
        }
    }
    if (n < 0) {
        PyBuffer_Release(&rb);
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    /* exactly one SCM_RIGHTS message with ``count`` descriptors, nothing truncated, the frame ours */
    struct cmsghdr *c = msg.msg_controllen ? CMSG_FIRSTHDR(&msg) : NULL;
    Py_ssize_t item = 0, item_len = 0;
    if (c && !(msg.msg_flags & MSG_CTRUNC) && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
        c->cmsg_len == CMSG_LEN((size_t)count * sizeof(int)) && CMSG_NXTHDR(&msg, c) == NULL &&
        match_deliver(rb.buf, n, token.buf, count, &item, &item_len)) {
        PyObject *fds = PyList_New(count);
        if (fds) {
            int *p = (int *)CMSG_DATA(c);
            for (Py_ssize_t i = 0; i < count; i++) {
                int v;
                memcpy(&v, p + i, sizeof v);
                PyList_SET_ITEM(fds, i, PyLong_FromLong(v));
            }
            /* a single item's body; a batch's whole ConduitFrame (its items are parsed only if asked for) */
            if (count == 1) res = Py_BuildValue("(Ny#)", fds, (char *)rb.buf + item, item_len);
            else res = Py_BuildValue("(Ny#)", fds, (char *)rb.buf + 4, (Py_ssize_t)(n - 4));
        }
    } else {
        PyObject *anc = ancdata_list(&msg);
        if (anc) res = Py_BuildValue("(nNi)", (Py_ssize_t)n, anc, msg.msg_flags);
    }
    PyBuffer_Release(&rb);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&token);
    return res;
}

static PyMethodDef module_methods[] = {
    {"exchange", native_exchange, METH_VARARGS, "the client's lean Redeem (see the source)"},
    {NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "fdbroker._native",
    "The broker's native data plane for prefetched GET tokens, and the client's lean Redeem.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&TableType) < 0 || PyType_Ready(&ReaderType) < 0) return NULL;
    str_throttled = PyUnicode_InternFromString("_throttled");
    if (!str_throttled) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&TableType);
    if (PyModule_AddObject(m, "Table", (PyObject *)&TableType) < 0) return NULL;
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0) return NULL;
    PyModule_AddIntConstant(m, "ST_OK", ST_OK);
    PyModule_AddIntConstant(m, "ST_MALFORMED", ST_MALFORMED);
    PyModule_AddIntConstant(m, "ST_UNKNOWN", ST_UNKNOWN);
    PyModule_AddIntConstant(m, "ST_REUSED", ST_REUSED);
    PyModule_AddIntConstant(m, "ST_EXPIRED_BEFORE", ST_EXPIRED_BEFORE);
    PyModule_AddIntConstant(m, "ST_EXPIRED", ST_EXPIRED);
    PyModule_AddIntConstant(m, "ST_FOREIGN", ST_FOREIGN);
    PyModule_AddIntConstant(m, "RETIRED_MEMORY", RETIRED_MEMORY);
    return m;
}
