/*
 * collector/_otlpfast.c -- a compiled walk of OTLP ExportTraceServiceRequest bodies.
 *
 * Produces the same rows as the Python decoder (collector/otlp.py +
 * collector/attributes.py) for spans, span events and span links: ids as
 * lowercase hex, times, kind/status names, the typed attribute columns of
 * collector.schema (lifting rules of collector.attributes.Lifter) and the
 * leftover attributes as JSON text -- written straight into Arrow buffers
 * (validity bitmap, int32 offsets, data) that collector/otlp_c.py wraps as
 * pyarrow arrays. Resource attributes (one list per ResourceSpans) are handed
 * back as raw KeyValue encodings for the Python code, as are rare attribute
 * encodings (nested values, bytes, long strings, unusual field order): those
 * go through collector.attributes.decode_kv_blob, so every value the two
 * decoders produce has one definition.
 *
 * The body is untrusted. Every varint, length and fixed-width field is
 * bounds-checked; a varint longer than 10 bytes, a truncated field, a group or
 * reserved wire type, a known field with an unexpected wire type, a string
 * field that is not UTF-8, or anything else this walker is not sure about
 * makes it answer None ("punt"): the Python decoder then decodes the body and
 * raises its BadPayload (or, for the odd legal encoding, decodes it). So the
 * compiled path only ever returns results for bodies it fully understood, and
 * cannot disagree with the Python path about what is an error. There is no
 * recursion: the message tree of a traces request has a fixed depth, and
 * nested AnyValues are left to the Python code (which limits their depth).
 *
 * The GIL is released while walking; it is taken back only for the rare
 * Python call-backs (fallback attributes, numeric strings, doubles that go to
 * the JSON text) and to build the result.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

/* results of the internal functions */
#define ST_OK 0
#define ST_PY (-1)    /* a Python exception is set (GIL held) */
#define ST_PUNT (-2)  /* not understood: let the Python decoder decide */
#define ST_NOMEM (-3) /* malloc failed (GIL may be released: raised later) */

/* value types (codes as in collector.attributes) */
enum { V_NULL = 0, V_STR = 1, V_INT = 2, V_FLT = 3, V_BOOL = 4, V_OTHER = 5 };
/* typed-column kinds (collector.attributes._KIND_CODE) */
enum { K_STR = 1, K_INT = 2, K_FLT = 3 };
/* column storage */
enum { C_STR = 0, C_I64 = 1, C_I32 = 2, C_F64 = 3 };

/* time limits of collector.otlp (ns) */
#define MIN_NS 86400000000000ULL
#define MAX_NS 7258118400000000000ULL

/* ------------------------------------------------------------------ buffers */

typedef struct {
    char *p;
    size_t len, cap;
} Buf;

static int buf_grow(Buf *b, size_t extra)
{
    size_t need = b->len + extra;
    if (need < b->len)
        return ST_NOMEM;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need) {
        if (cap > ((size_t)-1) / 2)
            return ST_NOMEM;
        cap *= 2;
    }
    char *p = (char *)realloc(b->p, cap);
    if (p == NULL)
        return ST_NOMEM;
    b->p = p;
    b->cap = cap;
    return ST_OK;
}

static inline int buf_put(Buf *b, const void *src, size_t n)
{
    if (b->cap - b->len < n && buf_grow(b, n))
        return ST_NOMEM;
    if (n)
        memcpy(b->p + b->len, src, n);
    b->len += n;
    return ST_OK;
}

static inline int buf_byte(Buf *b, char ch)
{
    if (b->cap == b->len && buf_grow(b, 1))
        return ST_NOMEM;
    b->p[b->len++] = ch;
    return ST_OK;
}

static void buf_free(Buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* ------------------------------------------------------------------ columns */

typedef struct {
    int type;
    Buf data, offs, valid;
    Py_ssize_t n, nulls;
} Col;

static int col_init(Col *c, int type)
{
    memset(c, 0, sizeof(*c));
    c->type = type;
    if (type == C_STR) {
        int32_t zero = 0;
        return buf_put(&c->offs, &zero, 4);
    }
    return ST_OK;
}

static void col_free(Col *c)
{
    buf_free(&c->data);
    buf_free(&c->offs);
    buf_free(&c->valid);
}

static inline int col_bit(Col *c, int ok)
{
    if ((c->n & 7) == 0 && buf_byte(&c->valid, 0))
        return ST_NOMEM;
    if (ok)
        c->valid.p[c->n >> 3] |= (char)(1 << (c->n & 7));
    else
        c->nulls++;
    c->n++;
    return ST_OK;
}

/* close a string value whose bytes were appended to c->data */
static inline int col_str_end(Col *c, int ok)
{
    if (c->data.len > (size_t)INT32_MAX)
        return ST_PUNT; /* over 2 GiB of text in one column: leave it to Arrow's own builders */
    int32_t off = (int32_t)c->data.len;
    if (buf_put(&c->offs, &off, 4))
        return ST_NOMEM;
    return col_bit(c, ok);
}

static inline int col_str(Col *c, const char *s, size_t n)
{
    if (buf_put(&c->data, s, n))
        return ST_NOMEM;
    return col_str_end(c, 1);
}

static inline int col_null(Col *c)
{
    switch (c->type) {
    case C_STR:
        return col_str_end(c, 0);
    case C_I32: {
        int32_t z = 0;
        if (buf_put(&c->data, &z, 4))
            return ST_NOMEM;
        break;
    }
    default: {
        int64_t z = 0;
        if (buf_put(&c->data, &z, 8))
            return ST_NOMEM;
    }
    }
    return col_bit(c, 0);
}

static inline int col_i64(Col *c, int64_t v)
{
    if (buf_put(&c->data, &v, 8))
        return ST_NOMEM;
    return col_bit(c, 1);
}

static inline int col_i32(Col *c, int32_t v)
{
    if (buf_put(&c->data, &v, 4))
        return ST_NOMEM;
    return col_bit(c, 1);
}

static inline int col_f64(Col *c, double v)
{
    if (buf_put(&c->data, &v, 8))
        return ST_NOMEM;
    return col_bit(c, 1);
}

/* (n, null_count, validity bitmap | None, offsets | None, data) */
static PyObject *col_py(Col *c)
{
    PyObject *valid, *offs, *data;
    if (c->nulls) {
        valid = PyBytes_FromStringAndSize(c->valid.p, (Py_ssize_t)c->valid.len);
    } else {
        valid = Py_None;
        Py_INCREF(valid);
    }
    if (c->type == C_STR) {
        offs = PyBytes_FromStringAndSize(c->offs.p, (Py_ssize_t)c->offs.len);
    } else {
        offs = Py_None;
        Py_INCREF(offs);
    }
    data = PyBytes_FromStringAndSize(c->data.p, (Py_ssize_t)c->data.len);
    if (valid == NULL || offs == NULL || data == NULL) {
        Py_XDECREF(valid);
        Py_XDECREF(offs);
        Py_XDECREF(data);
        return NULL;
    }
    return Py_BuildValue("(nnNNN)", c->n, c->nulls, valid, offs, data);
}

/* ------------------------------------------------------------------ text */

static int utf8_ok(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) {
            while (i + 8 <= n) {
                uint64_t w;
                memcpy(&w, s + i, 8);
                if (w & 0x8080808080808080ULL)
                    break;
                i += 8;
            }
            while (i < n && s[i] < 0x80)
                i++;
            continue;
        }
        uint8_t c = s[i];
        if (c >= 0xC2 && c <= 0xDF) {
            if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80)
                return 0;
            i += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            if (i + 2 >= n || (s[i + 2] & 0xC0) != 0x80)
                return 0;
            uint8_t c1 = s[i + 1];
            if (c == 0xE0 ? (c1 < 0xA0 || c1 > 0xBF) : c == 0xED ? (c1 < 0x80 || c1 > 0x9F) : (c1 & 0xC0) != 0x80)
                return 0;
            i += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            if (i + 3 >= n || (s[i + 2] & 0xC0) != 0x80 || (s[i + 3] & 0xC0) != 0x80)
                return 0;
            uint8_t c1 = s[i + 1];
            if (c == 0xF0 ? (c1 < 0x90 || c1 > 0xBF) : c == 0xF4 ? (c1 < 0x80 || c1 > 0x8F) : (c1 & 0xC0) != 0x80)
                return 0;
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

/* Length of valid UTF-8 ``s`` cut to at most ``limit`` bytes on a character
 * boundary (collector.attributes.truncate_str). */
static size_t utf8_cut(const uint8_t *s, size_t n, size_t limit)
{
    if (n <= limit)
        return n;
    size_t cut = limit;
    while (cut > 0 && (s[cut] & 0xC0) == 0x80)
        cut--;
    return cut;
}

static const char HEXDIGITS[] = "0123456789abcdef";

/* A JSON string as json.encoder.encode_basestring writes it (non-ASCII kept). */
static int json_str(Buf *b, const uint8_t *s, size_t n)
{
    if (b->cap - b->len < n + 2 && buf_grow(b, n + 2))
        return ST_NOMEM;
    b->p[b->len++] = '"';
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t c = s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        if (buf_put(b, s + run, i - run))
            return ST_NOMEM;
        run = i + 1;
        char esc[6];
        size_t k = 2;
        esc[0] = '\\';
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        default:
            esc[1] = 'u';
            esc[2] = '0';
            esc[3] = '0';
            esc[4] = HEXDIGITS[c >> 4];
            esc[5] = HEXDIGITS[c & 15];
            k = 6;
        }
        if (buf_put(b, esc, k))
            return ST_NOMEM;
    }
    if (buf_put(b, s + run, n - run))
        return ST_NOMEM;
    return buf_byte(b, '"');
}

static size_t fmt_i64(char *out, int64_t v)
{
    char tmp[24];
    size_t k = 0, n = 0;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        tmp[k++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        out[n++] = '-';
    while (k)
        out[n++] = tmp[--k];
    return n;
}

static int put_i64(Buf *b, int64_t v)
{
    char tmp[24];
    return buf_put(b, tmp, fmt_i64(tmp, v));
}

static void hex(char *out, const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = HEXDIGITS[s[i] >> 4];
        out[2 * i + 1] = HEXDIGITS[s[i] & 15];
    }
}

/* Shortest round-trip digits of a finite double, written the way Arrow casts
 * float64 to string (double-conversion ToShortest: plain decimal for decimal
 * exponents -6..9, else d.ddde+N / d.ddde-N; "-0" for negative zero).
 * ``repr`` is Python's repr of the same double (same shortest digits). */
static int arrow_double_text(Buf *b, const char *repr)
{
    const char *s = repr;
    int neg = 0;
    if (*s == '-') {
        neg = 1;
        s++;
    }
    char digits[32];
    int nd = 0, int_digits = -1, exp10 = 0, lead = 0;
    for (; *s && *s != 'e' && *s != 'E'; s++) {
        if (*s == '.') {
            int_digits = nd + lead;
            continue;
        }
        if (*s < '0' || *s > '9')
            return ST_PUNT;
        if (nd == 0 && *s == '0') {
            lead++;
            continue;
        }
        if (nd >= (int)sizeof(digits))
            return ST_PUNT;
        digits[nd++] = *s;
    }
    if (int_digits < 0)
        int_digits = nd + lead;
    if (*s == 'e' || *s == 'E')
        exp10 = atoi(s + 1);
    while (nd > 0 && digits[nd - 1] == '0')
        nd--;
    if (neg && buf_byte(b, '-'))
        return ST_NOMEM;
    if (nd == 0)
        return buf_byte(b, '0');
    int point = int_digits + exp10 - lead; /* value = 0.DIGITS * 10^point */
    int e = point - 1;
    if (e >= -6 && e < 10) {
        if (point <= 0) {
            if (buf_put(b, "0.", 2))
                return ST_NOMEM;
            for (int i = 0; i < -point; i++)
                if (buf_byte(b, '0'))
                    return ST_NOMEM;
            return buf_put(b, digits, (size_t)nd);
        }
        if (point >= nd) {
            if (buf_put(b, digits, (size_t)nd))
                return ST_NOMEM;
            for (int i = nd; i < point; i++)
                if (buf_byte(b, '0'))
                    return ST_NOMEM;
            return ST_OK;
        }
        if (buf_put(b, digits, (size_t)point) || buf_byte(b, '.') || buf_put(b, digits + point, (size_t)(nd - point)))
            return ST_NOMEM;
        return ST_OK;
    }
    if (buf_byte(b, digits[0]))
        return ST_NOMEM;
    if (nd > 1 && (buf_byte(b, '.') || buf_put(b, digits + 1, (size_t)(nd - 1))))
        return ST_NOMEM;
    if (buf_byte(b, 'e') || buf_byte(b, e < 0 ? '-' : '+'))
        return ST_NOMEM;
    return put_i64(b, e < 0 ? -(int64_t)e : (int64_t)e);
}

/* ------------------------------------------------------------------ wire format */

typedef struct {
    const uint8_t *p, *end;
} Rd;

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_I32 = 5 };

typedef struct {
    uint32_t num;
    int wt;
    uint64_t v;         /* varint / fixed value */
    const uint8_t *ptr; /* WT_LEN payload */
    size_t len;
} Field;

/* A varint of at most ``max`` bytes (upb: 10 for values, bits past 64 dropped;
 * 5 for tags and lengths). */
static inline int rd_varint_n(Rd *r, uint64_t *out, int max)
{
    const uint8_t *p = r->p;
    uint64_t x = 0;
    for (int k = 0; k < max; k++) {
        if (p >= r->end)
            return ST_PUNT;
        uint8_t c = *p++;
        x |= (uint64_t)(c & 0x7F) << (7 * k);
        if (c < 0x80) {
            r->p = p;
            *out = x;
            return ST_OK;
        }
    }
    return ST_PUNT;
}

static inline int rd_varint(Rd *r, uint64_t *out)
{
    return rd_varint_n(r, out, 10);
}

/* 1: a field was read into f; 0: end of message; ST_PUNT: malformed */
static ALWAYS_INLINE int next_field(Rd *r, Field *f)
{
    if (r->p >= r->end)
        return 0;
    uint64_t tag;
    if (rd_varint_n(r, &tag, 5) || tag > 0xFFFFFFFFULL || (tag >> 3) == 0)
        return ST_PUNT;
    f->num = (uint32_t)(tag >> 3);
    f->wt = (int)(tag & 7);
    switch (f->wt) {
    case WT_VARINT:
        return rd_varint(r, &f->v) ? ST_PUNT : 1;
    case WT_I64:
        if (r->end - r->p < 8)
            return ST_PUNT;
        f->v = 0;
        for (int i = 7; i >= 0; i--)
            f->v = (f->v << 8) | r->p[i];
        r->p += 8;
        return 1;
    case WT_I32:
        if (r->end - r->p < 4)
            return ST_PUNT;
        f->v = (uint64_t)r->p[0] | (uint64_t)r->p[1] << 8 | (uint64_t)r->p[2] << 16 | (uint64_t)r->p[3] << 24;
        r->p += 4;
        return 1;
    case WT_LEN: {
        uint64_t n;
        if (rd_varint_n(r, &n, 5) || n > (uint64_t)(r->end - r->p))
            return ST_PUNT;
        f->ptr = r->p;
        f->len = (size_t)n;
        r->p += n;
        return 1;
    }
    default: /* groups (3, 4) and the reserved wire types 6, 7 */
        return ST_PUNT;
    }
}

/* ------------------------------------------------------------------ Spec */

typedef struct {
    char *key;
    size_t klen;
    uint32_t hash;
    int col, prio;
} KeyEnt;

typedef struct {
    PyObject_HEAD
    KeyEnt *tab; /* open addressing, NULL key = empty */
    size_t mask;
    int ncols;
    int *kind;   /* K_* per column */
    int *store;  /* C_* per column */
    char *strip; /* leave exact values out of the JSON */
    int role_col;
    PyObject *fallback; /* (blob: bytes, limit: int) -> (key, value, trunc, json | None) */
    PyObject *coerce;   /* (text, "int" | "float", sql_type) -> value | None */
} SpecObject;

/* A hash of an attribute key, eight bytes at a time (keys are ~10-40 bytes). */
static inline uint32_t key_hash(const uint8_t *s, size_t n)
{
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)n;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xFF51AFD7ED558CCDULL;
        h ^= h >> 29;
        s += 8;
        n -= 8;
    }
    if (n) {
        uint64_t w = 0;
        memcpy(&w, s, n);
        h = (h ^ w) * 0xC4CEB9FE1A85EC53ULL;
    }
    h ^= h >> 32;
    return (uint32_t)h;
}

static const KeyEnt *spec_find(const SpecObject *sp, const uint8_t *key, size_t klen, uint32_t h)
{
    if (sp->tab == NULL)
        return NULL;
    for (size_t i = h & sp->mask;; i = (i + 1) & sp->mask) {
        const KeyEnt *e = &sp->tab[i];
        if (e->key == NULL)
            return NULL;
        if (e->hash == h && e->klen == klen && memcmp(e->key, key, klen) == 0)
            return e;
    }
}

static void Spec_dealloc(SpecObject *self)
{
    if (self->tab) {
        for (size_t i = 0; i <= self->mask; i++)
            free(self->tab[i].key);
        free(self->tab);
    }
    free(self->kind);
    free(self->store);
    free(self->strip);
    Py_XDECREF(self->fallback);
    Py_XDECREF(self->coerce);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Spec(keys: {key: (column, priority)}, kinds: [K_*], stores: [C_*], strip: [bool],
 *      role_col: int, fallback, coerce) */
static PyObject *Spec_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *keys, *kinds, *stores, *strip, *fallback, *coerce;
    int role_col;
    static char *kwlist[] = {"keys", "kinds", "stores", "strip", "role_col", "fallback", "coerce", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OOOiOO", kwlist, &PyDict_Type, &keys, &kinds, &stores, &strip,
                                     &role_col, &fallback, &coerce))
        return NULL;
    if (!PyCallable_Check(fallback) || !PyCallable_Check(coerce)) {
        PyErr_SetString(PyExc_TypeError, "fallback and coerce must be callable");
        return NULL;
    }
    SpecObject *self = (SpecObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    PyObject *kseq = PySequence_Fast(kinds, "kinds must be a sequence");
    PyObject *sseq = kseq ? PySequence_Fast(stores, "stores must be a sequence") : NULL;
    PyObject *tseq = sseq ? PySequence_Fast(strip, "strip must be a sequence") : NULL;
    if (tseq == NULL)
        goto fail;
    Py_ssize_t ncols = PySequence_Fast_GET_SIZE(kseq);
    if (PySequence_Fast_GET_SIZE(sseq) != ncols || PySequence_Fast_GET_SIZE(tseq) != ncols || ncols > 1000 ||
        role_col < -1 || role_col >= ncols) {
        PyErr_SetString(PyExc_ValueError, "kinds, stores and strip must have one entry per column");
        goto fail;
    }
    self->ncols = (int)ncols;
    self->role_col = role_col;
    self->kind = (int *)calloc((size_t)ncols + 1, sizeof(int));
    self->store = (int *)calloc((size_t)ncols + 1, sizeof(int));
    self->strip = (char *)calloc((size_t)ncols + 1, 1);
    if (!self->kind || !self->store || !self->strip) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < ncols; i++) {
        long k = PyLong_AsLong(PySequence_Fast_GET_ITEM(kseq, i));
        long s = PyLong_AsLong(PySequence_Fast_GET_ITEM(sseq, i));
        int t = PyObject_IsTrue(PySequence_Fast_GET_ITEM(tseq, i));
        if (PyErr_Occurred() || t < 0)
            goto fail;
        if (k < K_STR || k > K_FLT || s < C_STR || s > C_F64 || (k == K_STR) != (s == C_STR) ||
            (k == K_FLT) != (s == C_F64)) {
            PyErr_SetString(PyExc_ValueError, "bad column kind/storage");
            goto fail;
        }
        self->kind[i] = (int)k;
        self->store[i] = (int)s;
        self->strip[i] = (char)t;
    }
    Py_ssize_t nkeys = PyDict_Size(keys);
    size_t size = 16;
    while (size < (size_t)nkeys * 4)
        size *= 2;
    self->tab = (KeyEnt *)calloc(size, sizeof(KeyEnt));
    if (self->tab == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    self->mask = size - 1;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(keys, &pos, &k, &v)) {
        Py_ssize_t klen;
        const char *ks = PyUnicode_Check(k) ? PyUnicode_AsUTF8AndSize(k, &klen) : NULL;
        int col, prio;
        if (ks == NULL || !PyArg_ParseTuple(v, "ii", &col, &prio) || col < 0 || col >= ncols || prio < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "keys must map str to (column, priority)");
            goto fail;
        }
        uint32_t h = key_hash((const uint8_t *)ks, (size_t)klen);
        size_t i = h & self->mask;
        while (self->tab[i].key != NULL)
            i = (i + 1) & self->mask;
        self->tab[i].key = (char *)malloc((size_t)klen + 1);
        if (self->tab[i].key == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        memcpy(self->tab[i].key, ks, (size_t)klen + 1);
        self->tab[i].klen = (size_t)klen;
        self->tab[i].hash = h;
        self->tab[i].col = col;
        self->tab[i].prio = prio;
    }
    Py_INCREF(fallback);
    self->fallback = fallback;
    Py_INCREF(coerce);
    self->coerce = coerce;
    Py_DECREF(kseq);
    Py_DECREF(sseq);
    Py_DECREF(tseq);
    return (PyObject *)self;
fail:
    Py_XDECREF(kseq);
    Py_XDECREF(sseq);
    Py_XDECREF(tseq);
    Py_DECREF(self);
    return NULL;
}

static PyTypeObject SpecType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "collector._otlpfast.Spec",
    .tp_doc = "Typed attribute columns of one table and the Python call-backs (see collector/otlp_c.py).",
    .tp_basicsize = sizeof(SpecObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Spec_new,
    .tp_dealloc = (destructor)Spec_dealloc,
};

/* ------------------------------------------------------------------ decoding context */

typedef struct {
    const uint8_t *key;
    size_t klen;
    uint32_t hash;
    int8_t vt;
    int8_t exact, last, gone;
    const uint8_t *s; /* V_STR: UTF-8; V_OTHER: JSON text */
    size_t slen;
    int64_t i;
    double f;
    int col; /* typed column this value can go to, or -1 */
    int prio;
    int64_t li; /* value converted for an integer column */
    double lf;  /* ... for a double column */
} Attr;

typedef struct {
    const uint8_t *p;
    size_t n;
} Span_;

typedef struct {
    const uint8_t *p;
    size_t n;
    Py_ssize_t rs;
} ResBlob;

/* span columns, in the order of collector.schema */
enum {
    S_TID, S_SID, S_PID, S_NAME, S_KIND, S_START, S_END, S_DUR, S_SCODE, S_SMSG, S_SCOPE, S_RES, S_ATTRS, S_N
};
enum { E_TID, E_SID, E_TIME, E_NAME, E_RES, E_ATTRS, E_N };
enum { L_TID, L_SID, L_LTID, L_LSID, L_ATTRS, L_N };

typedef struct {
    SpecObject *spec;
    size_t limit;
    PyThreadState *ts; /* non-NULL while the GIL is released */
    PyObject *cache;   /* fallback results by blob (their UTF-8 buffers are in use) */
    Col sp[S_N], ev[E_N], ln[L_N];
    Col *lift;
    Py_ssize_t n_spans, n_events, n_links, kept, ev_dropped, ln_dropped, trunc, n_rs;
    Py_ssize_t reasons[5];
    Buf res;                  /* ResBlob[] */
    Buf apos, epos, lpos;     /* Span_[]: attribute / event / link encodings of the current item */
    Buf attrs;                /* Attr[] */
    Buf order;                /* size_t[]: sort order for long attribute lists */
    int *win, *best;          /* per typed column */
} Ctx;

static void gil_take(Ctx *c)
{
    if (c->ts) {
        PyEval_RestoreThread(c->ts);
        c->ts = NULL;
    }
}

static void gil_drop(Ctx *c)
{
    if (!c->ts)
        c->ts = PyEval_SaveThread();
}

static int ctx_init(Ctx *c, SpecObject *spec, size_t limit)
{
    memset(c, 0, sizeof(*c));
    c->spec = spec;
    c->limit = limit;
    static const int sp_types[S_N] = {C_STR, C_STR, C_STR, C_STR, C_STR, C_I64, C_I64,
                                      C_F64, C_STR, C_STR, C_STR, C_I64, C_STR};
    static const int ev_types[E_N] = {C_STR, C_STR, C_I64, C_STR, C_I64, C_STR};
    int rc = ST_OK;
    for (int i = 0; i < S_N; i++)
        rc |= col_init(&c->sp[i], sp_types[i]);
    for (int i = 0; i < E_N; i++)
        rc |= col_init(&c->ev[i], ev_types[i]);
    for (int i = 0; i < L_N; i++)
        rc |= col_init(&c->ln[i], C_STR);
    int n = spec->ncols;
    c->lift = (Col *)calloc((size_t)n + 1, sizeof(Col));
    c->win = (int *)calloc((size_t)n + 1, sizeof(int));
    c->best = (int *)calloc((size_t)n + 1, sizeof(int));
    if (!c->lift || !c->win || !c->best)
        return ST_NOMEM;
    for (int i = 0; i < n; i++)
        rc |= col_init(&c->lift[i], spec->store[i]);
    return rc ? ST_NOMEM : ST_OK;
}

static void ctx_free(Ctx *c)
{
    for (int i = 0; i < S_N; i++)
        col_free(&c->sp[i]);
    for (int i = 0; i < E_N; i++)
        col_free(&c->ev[i]);
    for (int i = 0; i < L_N; i++)
        col_free(&c->ln[i]);
    if (c->lift)
        for (int i = 0; i < c->spec->ncols; i++)
            col_free(&c->lift[i]);
    free(c->lift);
    free(c->win);
    free(c->best);
    buf_free(&c->res);
    buf_free(&c->apos);
    buf_free(&c->epos);
    buf_free(&c->lpos);
    buf_free(&c->attrs);
    buf_free(&c->order);
    Py_CLEAR(c->cache);
}

/* ------------------------------------------------------------------ attributes */

/* A KeyValue the canonical reader does not take: collector.attributes.decode_kv_blob
 * decides (through the Python call-back), once per distinct encoding. */
static int attr_fallback(Ctx *c, const uint8_t *b, size_t n, Attr *a, Py_ssize_t *trunc)
{
    gil_take(c);
    PyObject *blob = PyBytes_FromStringAndSize((const char *)b, (Py_ssize_t)n);
    if (blob == NULL)
        return ST_PY;
    if (c->cache == NULL && (c->cache = PyDict_New()) == NULL) {
        Py_DECREF(blob);
        return ST_PY;
    }
    PyObject *res = PyDict_GetItemWithError(c->cache, blob); /* borrowed */
    if (res == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(blob);
            return ST_PY;
        }
        res = PyObject_CallFunction(c->spec->fallback, "On", blob, (Py_ssize_t)c->limit);
        if (res == NULL) {
            Py_DECREF(blob);
            return ST_PY;
        }
        int bad = PyDict_SetItem(c->cache, blob, res);
        Py_DECREF(res); /* the cache holds it until the end of the call */
        if (bad) {
            Py_DECREF(blob);
            return ST_PY;
        }
    }
    Py_DECREF(blob);
    if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 4 || !PyUnicode_Check(PyTuple_GET_ITEM(res, 0))) {
        PyErr_SetString(PyExc_TypeError, "attribute fallback must return (key, value, truncated, json)");
        return ST_PY;
    }
    Py_ssize_t klen, slen;
    const char *key = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(res, 0), &klen);
    if (key == NULL)
        return ST_PY;
    a->key = (const uint8_t *)key;
    a->klen = (size_t)klen;
    Py_ssize_t t = PyLong_AsSsize_t(PyTuple_GET_ITEM(res, 2));
    if (t == -1 && PyErr_Occurred())
        return ST_PY;
    *trunc += t;
    PyObject *v = PyTuple_GET_ITEM(res, 1);
    if (v == Py_None) {
        a->vt = V_NULL;
    } else if (PyBool_Check(v)) {
        a->vt = V_BOOL;
        a->i = v == Py_True;
    } else if (PyLong_CheckExact(v)) {
        int overflow;
        a->vt = V_INT;
        a->i = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (a->i == -1 && PyErr_Occurred())
            return ST_PY;
        if (overflow)
            return ST_PUNT;
    } else if (PyFloat_CheckExact(v)) {
        a->vt = V_FLT;
        a->f = PyFloat_AS_DOUBLE(v);
    } else if (PyUnicode_CheckExact(v)) {
        const char *s = PyUnicode_AsUTF8AndSize(v, &slen);
        if (s == NULL)
            return ST_PY;
        a->vt = V_STR;
        a->s = (const uint8_t *)s;
        a->slen = (size_t)slen;
    } else {
        PyObject *js = PyTuple_GET_ITEM(res, 3);
        const char *s = PyUnicode_Check(js) ? PyUnicode_AsUTF8AndSize(js, &slen) : NULL;
        if (s == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "attribute fallback gave no JSON for a nested value");
            return ST_PY;
        }
        a->vt = V_OTHER;
        a->s = (const uint8_t *)s;
        a->slen = (size_t)slen;
    }
    gil_drop(c);
    return ST_OK;
}

/* One serialized KeyValue. The canonical encoding of a scalar attribute (key,
 * then a value with one scalar field: what every SDK writes) is read here;
 * anything else goes to the Python fallback. */
static int decode_attr(Ctx *c, const uint8_t *b, size_t n, Attr *a, Py_ssize_t *trunc)
{
    a->vt = V_NULL;
    if (n >= 2 && b[0] == 0x0A) {
        Rd r = {b + 1, b + n};
        uint64_t kl;
        if (rd_varint(&r, &kl) == ST_OK && kl <= (uint64_t)(r.end - r.p) && kl <= c->limit) {
            const uint8_t *key = r.p;
            r.p += kl;
            a->key = key;
            a->klen = (size_t)kl;
            if (r.p == r.end) {
                if (!utf8_ok(key, a->klen))
                    return ST_PUNT;
                return ST_OK; /* no value: null */
            }
            if (*r.p == 0x12) {
                uint64_t vl;
                r.p++;
                if (rd_varint(&r, &vl) == ST_OK && vl == (uint64_t)(r.end - r.p)) {
                    int done = 0;
                    if (vl == 0) {
                        done = 1;
                    } else {
                        uint8_t tag = *r.p++;
                        uint64_t x;
                        switch (tag) {
                        case 0x0A:
                            if (rd_varint(&r, &x) == ST_OK && x == (uint64_t)(r.end - r.p) && x <= c->limit) {
                                if (!utf8_ok(r.p, (size_t)x))
                                    return ST_PUNT;
                                a->vt = V_STR;
                                a->s = r.p;
                                a->slen = (size_t)x;
                                done = 1;
                            }
                            break;
                        case 0x18:
                            if (rd_varint(&r, &x) == ST_OK && r.p == r.end) {
                                a->vt = V_INT;
                                a->i = (int64_t)x;
                                done = 1;
                            }
                            break;
                        case 0x21:
                            if (r.end - r.p == 8) {
                                uint64_t bits = 0;
                                for (int i = 7; i >= 0; i--)
                                    bits = (bits << 8) | r.p[i];
                                memcpy(&a->f, &bits, 8);
                                a->vt = V_FLT;
                                done = 1;
                            }
                            break;
                        case 0x10:
                            if (rd_varint(&r, &x) == ST_OK && r.p == r.end) {
                                a->vt = V_BOOL;
                                a->i = x != 0;
                                done = 1;
                            }
                            break;
                        }
                    }
                    if (done) {
                        if (!utf8_ok(key, a->klen))
                            return ST_PUNT;
                        return ST_OK;
                    }
                    a->vt = V_NULL;
                }
            }
        }
    }
    return attr_fallback(c, b, n, a, trunc);
}

static inline int same_key(const Attr *x, const Attr *y)
{
    return x->hash == y->hash && x->klen == y->klen && memcmp(x->key, y->key, x->klen) == 0;
}

/* qsort passes no context: the attributes being sorted, per thread (decodes run
 * on several threads at once, without the GIL). */
static _Thread_local const Attr *sort_base;

static int by_key(const void *pa, const void *pb)
{
    size_t i = *(const size_t *)pa, j = *(const size_t *)pb;
    const Attr *x = &sort_base[i], *y = &sort_base[j];
    size_t n = x->klen < y->klen ? x->klen : y->klen;
    int d = n ? memcmp(x->key, y->key, n) : 0;
    if (d == 0 && x->klen != y->klen)
        d = x->klen < y->klen ? -1 : 1;
    if (d == 0)
        d = i < j ? -1 : (i > j ? 1 : 0);
    return d;
}

/* Decode the attribute encodings in c->apos into c->attrs; marks each
 * attribute's last copy in its item (``last``). Returns the count or < 0. */
static Py_ssize_t decode_attrs(Ctx *c, Py_ssize_t *trunc)
{
    size_t m = c->apos.len / sizeof(Span_);
    c->attrs.len = 0;
    if (m == 0)
        return 0;
    if (m > ((size_t)-1) / sizeof(Attr) || (c->attrs.cap < m * sizeof(Attr) && buf_grow(&c->attrs, m * sizeof(Attr))))
        return ST_NOMEM;
    c->attrs.len = m * sizeof(Attr);
    Attr *a = (Attr *)c->attrs.p;
    const Span_ *pos = (const Span_ *)c->apos.p;
    for (size_t i = 0; i < m; i++) {
        int rc = decode_attr(c, pos[i].p, pos[i].n, &a[i], trunc);
        if (rc)
            return rc;
        a[i].hash = key_hash(a[i].key, a[i].klen);
        a[i].last = 1;
        a[i].gone = 0;
        a[i].exact = 0;
        a[i].col = -1;
    }
    if (m <= 24) {
        for (size_t i = 0; i + 1 < m; i++)
            for (size_t j = i + 1; j < m; j++)
                if (same_key(&a[j], &a[i])) {
                    a[i].last = 0;
                    break;
                }
        return (Py_ssize_t)m;
    }
    /* Long lists: sort positions by key (ties by position) and keep the last of
     * each run. O(m log m) whatever the keys, so no crafted set of colliding
     * keys can make it quadratic. */
    if (m > ((size_t)-1) / sizeof(size_t))
        return ST_NOMEM;
    c->order.len = 0;
    if (c->order.cap < m * sizeof(size_t) && buf_grow(&c->order, m * sizeof(size_t)))
        return ST_NOMEM;
    size_t *order = (size_t *)c->order.p;
    for (size_t i = 0; i < m; i++)
        order[i] = i;
    sort_base = a;
    qsort(order, m, sizeof(size_t), by_key);
    for (size_t k = 0; k + 1 < m; k++)
        if (same_key(&a[order[k]], &a[order[k + 1]]))
            a[order[k]].last = 0;
    return (Py_ssize_t)m;
}

/* A numeric column offered a string: collector.attributes.coerce decides. */
static int coerce_text(Ctx *c, Attr *a, int kind, int i32, int *ok)
{
    gil_take(c);
    *ok = 0;
    PyObject *text = PyUnicode_DecodeUTF8((const char *)a->s, (Py_ssize_t)a->slen, NULL);
    if (text == NULL)
        return ST_PY;
    PyObject *v = PyObject_CallFunction(c->spec->coerce, "Oss", text, kind == K_INT ? "int" : "float",
                                        i32 ? "INTEGER" : "BIGINT");
    Py_DECREF(text);
    if (v == NULL)
        return ST_PY;
    int rc = ST_OK;
    if (v != Py_None) {
        if (kind == K_INT && PyLong_CheckExact(v)) {
            int overflow;
            long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
            if (overflow || (x == -1 && PyErr_Occurred()))
                rc = PyErr_Occurred() ? ST_PY : ST_PUNT;
            else {
                a->li = x;
                *ok = 1;
            }
        } else if (kind == K_FLT && PyFloat_CheckExact(v)) {
            a->lf = PyFloat_AS_DOUBLE(v);
            *ok = 1;
        } else {
            rc = ST_PUNT;
        }
    }
    Py_DECREF(v);
    if (rc == ST_OK)
        gil_drop(c);
    return rc;
}

/* Typed columns of one item (collector.attributes.Lifter): per column the
 * value of its first key present (last copy of it), if the value fits; an
 * exact fit whose key has no later copy leaves the JSON. */
static int lift_item(Ctx *c, Attr *a, size_t m, int *gen_ai)
{
    SpecObject *sp = c->spec;
    int n = sp->ncols;
    for (int k = 0; k < n; k++) {
        c->win[k] = -1;
        c->best[k] = INT32_MAX;
    }
    *gen_ai = 0;
    for (size_t i = 0; i < m; i++) {
        Attr *x = &a[i];
        if (x->klen >= 7 && memcmp(x->key, "gen_ai.", 7) == 0)
            *gen_ai = 1;
        const KeyEnt *e = spec_find(sp, x->key, x->klen, x->hash);
        if (e == NULL)
            continue;
        int ci = e->col, kind = sp->kind[ci], i32 = sp->store[ci] == C_I32, ok = 0;
        if (kind == K_STR) {
            ok = x->vt == V_STR || x->vt == V_INT;
            x->exact = x->vt == V_STR;
        } else if (kind == K_INT) {
            if (x->vt == V_INT) {
                x->li = x->i;
                ok = 1;
            } else if (x->vt == V_FLT) {
                double f = x->f;
                if (isfinite(f) && floor(f) == f && fabs(f) < 9.2e18) {
                    x->li = (int64_t)f;
                    ok = 1;
                }
            } else if (x->vt == V_STR) {
                int rc = coerce_text(c, x, kind, i32, &ok);
                if (rc)
                    return rc;
                i32 = 0; /* coerce checked the range */
            }
            if (ok && i32 && (x->li < INT32_MIN || x->li > INT32_MAX))
                ok = 0;
            x->exact = ok && x->vt == V_INT;
        } else {
            if (x->vt == V_INT) {
                x->lf = (double)x->i;
                ok = 1;
            } else if (x->vt == V_FLT) {
                x->lf = x->f;
                ok = 1;
            } else if (x->vt == V_STR) {
                int rc = coerce_text(c, x, kind, 0, &ok);
                if (rc)
                    return rc;
            }
            x->exact = ok && x->vt == V_FLT;
        }
        if (!ok) {
            x->exact = 0;
            continue;
        }
        x->col = ci;
        x->prio = e->prio;
        if (e->prio <= c->best[ci]) {
            c->best[ci] = e->prio;
            c->win[ci] = (int)i;
        }
    }
    for (int k = 0; k < n; k++) {
        int w = c->win[k];
        if (w >= 0 && sp->strip[k] && a[w].exact && a[w].last)
            a[w].gone = 1;
    }
    return ST_OK;
}

static int json_double(Ctx *c, Buf *b, double f)
{
    if (isnan(f))
        return buf_put(b, "\"NaN\"", 5);
    if (isinf(f))
        return f > 0 ? buf_put(b, "\"Infinity\"", 10) : buf_put(b, "\"-Infinity\"", 11);
    gil_take(c);
    char *repr = PyOS_double_to_string(f, 'r', 0, 0, NULL);
    if (repr == NULL)
        return ST_PY;
    size_t start = b->len;
    int rc = arrow_double_text(b, repr);
    PyMem_Free(repr);
    gil_drop(c);
    if (rc)
        return rc;
    /* Arrow writes 5.0 as "5": keep it a double in JSON (collector.attributes.Values.json_text) */
    for (size_t i = start; i < b->len; i++) {
        char ch = b->p[i];
        if (ch == '.' || ch == 'e' || ch == 'n')
            return ST_OK;
    }
    return buf_put(b, ".0", 2);
}

/* The JSON object of one item's attributes into column ``col``: the last copy
 * of each key not stored in a typed column, in the order of those copies. */
static int emit_json(Ctx *c, Col *col, const Attr *a, size_t m)
{
    Buf *b = &col->data;
    int first = 1;
    if (buf_byte(b, '{'))
        return ST_NOMEM;
    for (size_t i = 0; i < m; i++) {
        const Attr *x = &a[i];
        if (!x->last || x->gone)
            continue;
        if (!first && buf_byte(b, ','))
            return ST_NOMEM;
        first = 0;
        if (json_str(b, x->key, x->klen) || buf_byte(b, ':'))
            return ST_NOMEM;
        int rc;
        switch (x->vt) {
        case V_NULL: rc = buf_put(b, "null", 4); break;
        case V_STR: rc = json_str(b, x->s, x->slen); break;
        case V_INT: rc = put_i64(b, x->i); break;
        case V_BOOL: rc = x->i ? buf_put(b, "true", 4) : buf_put(b, "false", 5); break;
        case V_FLT: rc = json_double(c, b, x->f); break;
        default: rc = buf_put(b, x->s, x->slen); break;
        }
        if (rc)
            return rc;
    }
    if (buf_byte(b, '}'))
        return ST_NOMEM;
    return col_str_end(col, 1);
}

/* ------------------------------------------------------------------ messages */

#define NEXT(r, f, rc) while (((rc) = next_field((r), (f))) > 0)
#define WANT(f, w) \
    if ((f).wt != (w)) \
    return ST_PUNT

static int check_utf8_field(const Field *f)
{
    if (f->wt != WT_LEN)
        return ST_PUNT;
    return utf8_ok(f->ptr, f->len) ? ST_OK : ST_PUNT;
}

static int push_pos(Buf *b, const uint8_t *p, size_t n)
{
    Span_ s = {p, n};
    return buf_put(b, &s, sizeof(s));
}

static inline int id_ok(const uint8_t *p, size_t n, size_t want)
{
    if (n != want)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 1;
    return 0;
}

static inline int in_range(uint64_t ns)
{
    return ns >= MIN_NS && ns <= MAX_NS;
}

static int col_hex(Col *col, const uint8_t *p, size_t n)
{
    char tmp[64];
    if (n > 32)
        return ST_PUNT;
    hex(tmp, p, n);
    return col_str(col, tmp, 2 * n);
}

static const char *KIND_NAMES[] = {"UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"};
static const char *STATUS_NAMES[] = {"UNSET", "OK", "ERROR"};

typedef struct {
    const uint8_t *tid, *sid;
    size_t tlen, slen;
    int emit;
    Py_ssize_t rs;
} Owner;

static int walk_event(Ctx *c, const uint8_t *p, size_t n, const Owner *o)
{
    Rd r = {p, p + n};
    Field f = {0};
    int rc;
    uint64_t t = 0;
    const uint8_t *name = NULL;
    size_t nlen = 0;
    c->apos.len = 0;
    NEXT(&r, &f, rc)
    {
        switch (f.num) {
        case 1: WANT(f, WT_I64); t = f.v; break;
        case 2:
            if ((rc = check_utf8_field(&f)))
                return rc;
            name = f.ptr;
            nlen = f.len;
            break;
        case 3:
            WANT(f, WT_LEN);
            if (push_pos(&c->apos, f.ptr, f.len))
                return ST_NOMEM;
            break;
        case 4: WANT(f, WT_VARINT); break;
        }
    }
    if (rc < 0)
        return rc;
    c->n_events++;
    size_t k = utf8_cut(name, nlen, c->limit);
    if (k != nlen)
        c->trunc++;
    Py_ssize_t m = decode_attrs(c, &c->trunc);
    if (m < 0)
        return (int)m;
    if (!o->emit)
        return ST_OK;
    if (!in_range(t)) {
        c->ev_dropped++;
        return ST_OK;
    }
    if ((rc = col_hex(&c->ev[E_TID], o->tid, o->tlen)) || (rc = col_hex(&c->ev[E_SID], o->sid, o->slen)) ||
        (rc = col_i64(&c->ev[E_TIME], (int64_t)(t / 1000))) ||
        (rc = col_str(&c->ev[E_NAME], (const char *)name, k)) || (rc = col_i64(&c->ev[E_RES], o->rs)))
        return rc;
    return emit_json(c, &c->ev[E_ATTRS], (const Attr *)c->attrs.p, (size_t)m);
}

static int walk_link(Ctx *c, const uint8_t *p, size_t n, const Owner *o)
{
    Rd r = {p, p + n};
    Field f = {0};
    int rc;
    const uint8_t *tid = NULL, *sid = NULL;
    size_t tlen = 0, slen = 0;
    c->apos.len = 0;
    NEXT(&r, &f, rc)
    {
        switch (f.num) {
        case 1: WANT(f, WT_LEN); tid = f.ptr; tlen = f.len; break;
        case 2: WANT(f, WT_LEN); sid = f.ptr; slen = f.len; break;
        case 3:
            if ((rc = check_utf8_field(&f)))
                return rc;
            break;
        case 4:
            WANT(f, WT_LEN);
            if (push_pos(&c->apos, f.ptr, f.len))
                return ST_NOMEM;
            break;
        case 5: WANT(f, WT_VARINT); break;
        case 6: WANT(f, WT_I32); break;
        }
    }
    if (rc < 0)
        return rc;
    c->n_links++;
    Py_ssize_t m = decode_attrs(c, &c->trunc);
    if (m < 0)
        return (int)m;
    if (!o->emit)
        return ST_OK;
    if (!id_ok(tid, tlen, 16) || !id_ok(sid, slen, 8)) {
        c->ln_dropped++;
        return ST_OK;
    }
    if ((rc = col_hex(&c->ln[L_TID], o->tid, o->tlen)) || (rc = col_hex(&c->ln[L_SID], o->sid, o->slen)) ||
        (rc = col_hex(&c->ln[L_LTID], tid, tlen)) || (rc = col_hex(&c->ln[L_LSID], sid, slen)))
        return rc;
    return emit_json(c, &c->ln[L_ATTRS], (const Attr *)c->attrs.p, (size_t)m);
}

static int walk_status(const uint8_t *p, size_t n, int32_t *code, const uint8_t **msg, size_t *mlen)
{
    Rd r = {p, p + n};
    Field f = {0};
    int rc;
    NEXT(&r, &f, rc)
    {
        switch (f.num) {
        case 2:
            if ((rc = check_utf8_field(&f)))
                return rc;
            *msg = f.ptr;
            *mlen = f.len;
            break;
        case 3: WANT(f, WT_VARINT); *code = (int32_t)(uint32_t)f.v; break;
        }
    }
    return rc;
}

static int emit_lifted(Ctx *c, const Attr *a, int role_default)
{
    SpecObject *sp = c->spec;
    int rc;
    for (int k = 0; k < sp->ncols; k++) {
        Col *col = &c->lift[k];
        int w = c->win[k];
        if (w < 0) {
            if (k == sp->role_col && role_default)
                rc = col_str(col, "request", 7);
            else
                rc = col_null(col);
        } else {
            const Attr *x = &a[w];
            switch (sp->store[k]) {
            case C_STR:
                if (x->vt == V_STR) {
                    rc = col_str(col, (const char *)x->s, x->slen);
                } else {
                    char tmp[24];
                    rc = col_str(col, tmp, fmt_i64(tmp, x->i));
                }
                break;
            case C_I64: rc = col_i64(col, x->li); break;
            case C_I32: rc = col_i32(col, (int32_t)x->li); break;
            default: rc = col_f64(col, x->lf); break;
            }
        }
        if (rc)
            return rc;
    }
    return ST_OK;
}

static int walk_span(Ctx *c, const uint8_t *p, size_t n, Py_ssize_t rs, const uint8_t *scope, size_t scope_len)
{
    Rd r = {p, p + n};
    Field f = {0};
    int rc;
    const uint8_t *tid = NULL, *sid = NULL, *pid = NULL, *name = NULL, *msg = NULL;
    size_t tlen = 0, slen = 0, plen = 0, nlen = 0, mlen = 0;
    int32_t kind = 0, code = 0;
    uint64_t start = 0, end = 0;
    c->apos.len = c->epos.len = c->lpos.len = 0;
    NEXT(&r, &f, rc)
    {
        switch (f.num) {
        case 1: WANT(f, WT_LEN); tid = f.ptr; tlen = f.len; break;
        case 2: WANT(f, WT_LEN); sid = f.ptr; slen = f.len; break;
        case 3:
            if ((rc = check_utf8_field(&f)))
                return rc;
            break;
        case 4: WANT(f, WT_LEN); pid = f.ptr; plen = f.len; break;
        case 5:
            if ((rc = check_utf8_field(&f)))
                return rc;
            name = f.ptr;
            nlen = f.len;
            break;
        case 6: WANT(f, WT_VARINT); kind = (int32_t)(uint32_t)f.v; break;
        case 7: WANT(f, WT_I64); start = f.v; break;
        case 8: WANT(f, WT_I64); end = f.v; break;
        case 9:
            WANT(f, WT_LEN);
            if (push_pos(&c->apos, f.ptr, f.len))
                return ST_NOMEM;
            break;
        case 10: case 12: case 14: WANT(f, WT_VARINT); break;
        case 11:
            WANT(f, WT_LEN);
            if (push_pos(&c->epos, f.ptr, f.len))
                return ST_NOMEM;
            break;
        case 13:
            WANT(f, WT_LEN);
            if (push_pos(&c->lpos, f.ptr, f.len))
                return ST_NOMEM;
            break;
        case 15:
            WANT(f, WT_LEN);
            if ((rc = walk_status(f.ptr, f.len, &code, &msg, &mlen)))
                return rc;
            break;
        case 16: WANT(f, WT_I32); break;
        }
    }
    if (rc < 0)
        return rc;
    c->n_spans++;
    int reason = 0;
    if (!id_ok(tid, tlen, 16))
        reason = 1;
    else if (!id_ok(sid, slen, 8))
        reason = 2;
    else if (plen != 0 && plen != 8)
        reason = 3;
    else if (!in_range(start) || !in_range(end))
        reason = 4;
    else if (end < start)
        reason = 5;
    if (reason)
        c->reasons[reason - 1]++;
    int emit = reason == 0;

    /* name and status message are cut (and counted) whether or not the span is kept */
    size_t ncut = utf8_cut(name, nlen, c->limit), mcut = utf8_cut(msg, mlen, c->limit);
    c->trunc += (ncut != nlen) + (mcut != mlen);

    Py_ssize_t m = decode_attrs(c, &c->trunc);
    if (m < 0)
        return (int)m;
    Attr *a = (Attr *)c->attrs.p;
    int gen_ai;
    if ((rc = lift_item(c, a, (size_t)m, &gen_ai)))
        return rc;
    if (emit) {
        Col *sp = c->sp;
        int parent = id_ok(pid, plen, 8);
        const char *kname = KIND_NAMES[kind >= 0 && kind <= 5 ? kind : 0];
        const char *sname = STATUS_NAMES[code >= 0 && code <= 2 ? code : 0];
        c->kept++;
        if ((rc = col_hex(&sp[S_TID], tid, tlen)) || (rc = col_hex(&sp[S_SID], sid, slen)) ||
            (rc = parent ? col_hex(&sp[S_PID], pid, plen) : col_null(&sp[S_PID])) ||
            (rc = col_str(&sp[S_NAME], (const char *)name, ncut)) ||
            (rc = col_str(&sp[S_KIND], kname, strlen(kname))) ||
            (rc = col_i64(&sp[S_START], (int64_t)(start / 1000))) || (rc = col_i64(&sp[S_END], (int64_t)(end / 1000))) ||
            (rc = col_f64(&sp[S_DUR], (double)((int64_t)end - (int64_t)start) / 1e6)) ||
            (rc = col_str(&sp[S_SCODE], sname, strlen(sname))) ||
            (rc = mlen ? col_str(&sp[S_SMSG], (const char *)msg, mcut) : col_null(&sp[S_SMSG])) ||
            (rc = scope_len ? col_str(&sp[S_SCOPE], (const char *)scope, scope_len) : col_null(&sp[S_SCOPE])) ||
            (rc = col_i64(&sp[S_RES], rs)))
            return rc;
        if ((rc = emit_lifted(c, a, !parent && kind == 2 && gen_ai)))
            return rc;
        if ((rc = emit_json(c, &sp[S_ATTRS], a, (size_t)m)))
            return rc;
    }

    Owner o = {tid, sid, tlen, slen, emit, rs};
    size_t ne = c->epos.len / sizeof(Span_), nl = c->lpos.len / sizeof(Span_);
    for (size_t i = 0; i < ne; i++) {
        const Span_ *e = (const Span_ *)c->epos.p + i;
        if ((rc = walk_event(c, e->p, e->n, &o)))
            return rc;
    }
    for (size_t i = 0; i < nl; i++) {
        const Span_ *l = (const Span_ *)c->lpos.p + i;
        if ((rc = walk_link(c, l->p, l->n, &o)))
            return rc;
    }
    return ST_OK;
}

static int walk_scope(const uint8_t *p, size_t n, const uint8_t **name, size_t *nlen)
{
    Rd r = {p, p + n};
    Field f = {0};
    int rc;
    NEXT(&r, &f, rc)
    {
        switch (f.num) {
        case 1:
            if ((rc = check_utf8_field(&f)))
                return rc;
            *name = f.ptr;
            *nlen = f.len;
            break;
        case 2:
            if ((rc = check_utf8_field(&f)))
                return rc;
            break;
        case 3: WANT(f, WT_LEN); break; /* attributes: not stored */
        case 4: WANT(f, WT_VARINT); break;
        }
    }
    return rc;
}

static int walk_scope_spans(Ctx *c, const uint8_t *p, size_t n, Py_ssize_t rs)
{
    Rd r = {p, p + n};
    Field f = {0};
    int rc;
    const uint8_t *scope = NULL;
    size_t scope_len = 0;
    /* the scope may come after the spans: read it first */
    NEXT(&r, &f, rc)
    {
        switch (f.num) {
        case 1:
            WANT(f, WT_LEN);
            if ((rc = walk_scope(f.ptr, f.len, &scope, &scope_len)))
                return rc;
            break;
        case 2: WANT(f, WT_LEN); break;
        case 3:
            if ((rc = check_utf8_field(&f)))
                return rc;
            break;
        }
    }
    if (rc < 0)
        return rc;
    r.p = p;
    NEXT(&r, &f, rc)
    {
        if (f.num == 2 && (rc = walk_span(c, f.ptr, f.len, rs, scope, scope_len)))
            return rc;
    }
    return rc;
}

static int walk_entity_ref(const uint8_t *p, size_t n)
{
    Rd r = {p, p + n};
    Field f = {0};
    int rc;
    NEXT(&r, &f, rc)
    {
        if (f.num >= 1 && f.num <= 4 && (rc = check_utf8_field(&f)))
            return rc;
    }
    return rc;
}

static int walk_resource(Ctx *c, const uint8_t *p, size_t n, Py_ssize_t rs)
{
    Rd r = {p, p + n};
    Field f = {0};
    int rc;
    NEXT(&r, &f, rc)
    {
        switch (f.num) {
        case 1: {
            WANT(f, WT_LEN);
            ResBlob b = {f.ptr, f.len, rs};
            if (buf_put(&c->res, &b, sizeof(b)))
                return ST_NOMEM;
            break;
        }
        case 2: WANT(f, WT_VARINT); break;
        case 3:
            WANT(f, WT_LEN);
            if ((rc = walk_entity_ref(f.ptr, f.len)))
                return rc;
            break;
        }
    }
    return rc;
}

static int walk_resource_spans(Ctx *c, const uint8_t *p, size_t n)
{
    Rd r = {p, p + n};
    Field f = {0};
    int rc;
    Py_ssize_t rs = c->n_rs++;
    NEXT(&r, &f, rc)
    {
        switch (f.num) {
        case 1:
            WANT(f, WT_LEN);
            if ((rc = walk_resource(c, f.ptr, f.len, rs)))
                return rc;
            break;
        case 2:
            WANT(f, WT_LEN);
            if ((rc = walk_scope_spans(c, f.ptr, f.len, rs)))
                return rc;
            break;
        case 3:
            if ((rc = check_utf8_field(&f)))
                return rc;
            break;
        }
    }
    return rc;
}

static int walk_request(Ctx *c, const uint8_t *p, size_t n)
{
    Rd r = {p, p + n};
    Field f = {0};
    int rc;
    NEXT(&r, &f, rc)
    {
        if (f.num == 1) {
            WANT(f, WT_LEN);
            if ((rc = walk_resource_spans(c, f.ptr, f.len)))
                return rc;
        }
    }
    return rc;
}

/* ------------------------------------------------------------------ result */

static PyObject *cols_py(Col *cols, int n)
{
    PyObject *t = PyTuple_New(n);
    if (t == NULL)
        return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *x = col_py(&cols[i]);
        if (x == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, x);
    }
    return t;
}

static PyObject *result_py(Ctx *c)
{
    PyObject *res = PyList_New(c->n_rs);
    if (res == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < c->n_rs; i++) {
        PyObject *l = PyList_New(0);
        if (l == NULL) {
            Py_DECREF(res);
            return NULL;
        }
        PyList_SET_ITEM(res, i, l);
    }
    const ResBlob *rb = (const ResBlob *)c->res.p;
    for (size_t i = 0; i < c->res.len / sizeof(ResBlob); i++) {
        PyObject *b = PyBytes_FromStringAndSize((const char *)rb[i].p, (Py_ssize_t)rb[i].n);
        if (b == NULL || PyList_Append(PyList_GET_ITEM(res, rb[i].rs), b)) {
            Py_XDECREF(b);
            Py_DECREF(res);
            return NULL;
        }
        Py_DECREF(b);
    }
    PyObject *sp = cols_py(c->sp, S_N);
    PyObject *lift = sp ? cols_py(c->lift, c->spec->ncols) : NULL;
    PyObject *ev = lift ? cols_py(c->ev, E_N) : NULL;
    PyObject *ln = ev ? cols_py(c->ln, L_N) : NULL;
    if (ln == NULL) {
        Py_DECREF(res);
        Py_XDECREF(sp);
        Py_XDECREF(lift);
        Py_XDECREF(ev);
        return NULL;
    }
    return Py_BuildValue("{s:n,s:n,s:n,s:n,s:(nnnnn),s:n,s:n,s:n,s:N,s:N,s:N,s:N,s:N}",
                         "spans", c->n_spans, "events", c->n_events, "links", c->n_links, "kept", c->kept,
                         "reasons", c->reasons[0], c->reasons[1], c->reasons[2], c->reasons[3], c->reasons[4],
                         "events_dropped", c->ev_dropped, "links_dropped", c->ln_dropped, "truncated", c->trunc,
                         "resources", res, "span_columns", sp, "lifted", lift, "event_columns", ev,
                         "link_columns", ln);
}

static PyObject *decode_traces(PyObject *module, PyObject *args)
{
    PyObject *body;
    Py_ssize_t limit;
    SpecObject *spec;
    if (!PyArg_ParseTuple(args, "O!nO!:decode_traces", &PyBytes_Type, &body, &limit, &SpecType, &spec))
        return NULL;
    if (limit < 0) {
        PyErr_SetString(PyExc_ValueError, "limit must be >= 0");
        return NULL;
    }
    Ctx c;
    int rc = ctx_init(&c, spec, (size_t)limit);
    if (rc == ST_OK) {
        Py_INCREF(body);
        gil_drop(&c);
        rc = walk_request(&c, (const uint8_t *)PyBytes_AS_STRING(body), (size_t)PyBytes_GET_SIZE(body));
        gil_take(&c);
        Py_DECREF(body);
    }
    PyObject *out = NULL;
    if (rc == ST_OK) {
        out = result_py(&c);
    } else if (rc == ST_PUNT) {
        out = Py_None;
        Py_INCREF(out);
    } else if (rc == ST_NOMEM) {
        PyErr_NoMemory();
    } else if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_SystemError, "OTLP decoder failed without an exception");
    }
    if (out == NULL && rc == ST_OK && !PyErr_Occurred())
        PyErr_SetString(PyExc_SystemError, "OTLP decoder result failed");
    ctx_free(&c);
    return out;
}

/* For tests: the text Arrow gives a float64 cast to string. */
static PyObject *arrow_double_str(PyObject *module, PyObject *arg)
{
    double x = PyFloat_AsDouble(arg);
    if (x == -1.0 && PyErr_Occurred())
        return NULL;
    if (!isfinite(x)) {
        PyErr_SetString(PyExc_ValueError, "finite doubles only");
        return NULL;
    }
    char *repr = PyOS_double_to_string(x, 'r', 0, 0, NULL);
    if (repr == NULL)
        return NULL;
    Buf b = {0};
    int rc = arrow_double_text(&b, repr);
    PyMem_Free(repr);
    PyObject *out = rc ? NULL : PyUnicode_FromStringAndSize(b.p, (Py_ssize_t)b.len);
    if (rc)
        PyErr_SetString(PyExc_ValueError, "cannot format");
    buf_free(&b);
    return out;
}

static PyMethodDef methods[] = {
    {"decode_traces", decode_traces, METH_VARARGS,
     "decode_traces(body: bytes, limit: int, spec: Spec) -> dict | None\n\n"
     "Columns of the spans, span events and links of an ExportTraceServiceRequest, or None when the\n"
     "body is not one this walker fully understands (the Python decoder then decides)."},
    {"arrow_double_str", arrow_double_str, METH_O, "The text Arrow gives a finite float64 cast to string (tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_otlpfast", "Compiled OTLP traces decoder (see collector/otlp_c.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__otlpfast(void)
{
    if (PyType_Ready(&SpecType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SpecType);
    if (PyModule_AddObject(m, "Spec", (PyObject *)&SpecType) < 0) {
        Py_DECREF(&SpecType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "ABI", 1) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
