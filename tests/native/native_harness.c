/* native_harness.c: one concern, replaying calls of the native library's entry points from files in a
 * plain C process, with no Python in it: tests/native/test_native_harness.py runs it natively and, built
 * for aarch64, under qemu-aarch64; cachegrind can run it too (--steps N, one thread).
 *
 * A case file is one call of ln_train_step or ln_forward as lenetlab.native made it: every field of
 * its argument record (ln_args) by the field's own name, so that this file knows nothing of what
 * the fields mean. The harness rebuilds the record (each buffer in its own 64-byte-aligned
 * allocation), makes the call --steps times on one workspace, and writes every buffer the call
 * may write (those its field's C type does not make const) as it is afterwards;
 * tests/support/harness.py writes the cases and copies those buffers back to where they came from.
 *
 * Format, of a case and of the output alike: one header line, then entries to the end of the
 * file, each a line "NAME TYPE COUNT" and COUNT elements of TYPE (f32, f64, i64, i32) in this
 * machine's byte order. NAME is a field of ln_args, or "FIELD[i]" for slot i of a field that
 * is an array of pointers (params, run, nbt, s1, s2, steps). Headers: "lncase 1 step" or
 * "lncase 1 forward"; "lnout 1 RC" (the call's return value).
 *
 * Usage:
 *     native_harness CASE OUT [--steps N] [--threads T]   (T: 1 by default, whatever the case says)
 *     native_harness --info     the build: vector bytes, the record's ABI, and per field of the
 *                               record its kind, element type and whether the call writes it
 * Built as one translation unit with the step's source:
 *     cc -O3 -march=native -std=gnu11 -ffp-contract=fast -pthread -Isrc/lenetlab/native \
 *        tests/native_harness.c -lm
 * (tests/support/harness.py inlines the library's source, native.source_text(), in place of the
 * #include, so that its build cache's key covers every file.)
 */
#include "lenet5.c"

#include <stdio.h>

enum { T_F32, T_F64, T_I64, T_I32 };
static const char *const TYPE_NAMES[] = {"f32", "f64", "i64", "i32"};
static const size_t TYPE_SIZES[] = {4, 8, 8, 4};
enum { K_SCALAR, K_BUFFER, K_SLOTS };

/* Each field's element type and kind, from its C type: a field of a type not listed here is a
 * compile error, so a new kind of field cannot be replayed wrongly. */
#define H_TYPE(e)                                                                                 \
    _Generic((e), double: T_F64, int64_t: T_I64, int32_t: T_I32, const float *: T_F32,          \
             float *: T_F32, double *: T_F64, const int64_t *: T_I64, float *const *: T_F32,      \
             int64_t *const *: T_I64)
#define H_KIND(e)                                                                                 \
    _Generic((e), double: K_SCALAR, int64_t: K_SCALAR, int32_t: K_SCALAR,                        \
             float *const *: K_SLOTS, int64_t *const *: K_SLOTS, default: K_BUFFER)
/* whether the call may write what the field points to (the output holds those entries only) */
#define H_OUT(e)                                                                                  \
    _Generic((e), float *const *: 1, int64_t *const *: 1, float *: 1, double *: 1, default: 0)
#define H_FIELD(type, name)                                                                       \
    {#name, offsetof(ln_args, name), H_TYPE(((ln_args *)0)->name), H_KIND(((ln_args *)0)->name),  \
     H_OUT(((ln_args *)0)->name)},

typedef struct {
    const char *name;
    size_t offset;
    int type, kind, out;
} field_t;
static const field_t FIELDS[] = {LN_ARGS(H_FIELD)};
enum { NFIELDS = sizeof FIELDS / sizeof FIELDS[0], MAX_BUFFERS = 128 };

typedef struct {
    char name[64];
    int type;
    int64_t count;
    void *data;
    const field_t *field;
} buffer_t;

static void fail(const char *what, const char *detail)
{
    fprintf(stderr, "native_harness: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(2);
}

static const field_t *field_named(const char *name)
{
    for (int i = 0; i < NFIELDS; i++)
        if (!strcmp(FIELDS[i].name, name))
            return &FIELDS[i];
    fail("no such field of ln_args", name);
    return NULL;
}

/* Reads one entry into b (its data in a fresh 64-byte-aligned allocation); 0 at the end of the file. */
static int read_entry(FILE *f, buffer_t *b)
{
    char type[8];
    long long count;
    const int got = fscanf(f, "%63s %7s %lld", b->name, type, &count);
    if (got == EOF)
        return 0;
    if (got != 3 || fgetc(f) != '\n' || count < 0)
        fail("a malformed entry", got > 0 ? b->name : NULL);
    b->type = -1;
    for (int t = 0; t < 4; t++)
        if (!strcmp(type, TYPE_NAMES[t]))
            b->type = t;
    if (b->type < 0)
        fail("an unknown type", type);
    b->count = count;
    const size_t bytes = TYPE_SIZES[b->type] * (size_t)count;
    b->data = zalloc(bytes ? bytes : 1);
    if (!b->data)
        fail("out of memory for", b->name);
    if (fread(b->data, 1, bytes, f) != bytes)
        fail("the file ends inside", b->name);
    return 1;
}

/* Puts entry b into the record: a scalar's value, a buffer's pointer, or a slot's pointer in
 * the field's array of NPARAM pointers (made on first use). */
static void place(ln_args *a, buffer_t *b, void **slots[])
{
    char name[64];
    int slot = -1;
    memcpy(name, b->name, sizeof name); /* b->name is NUL-terminated within its 64 bytes */
    char *bracket = strchr(name, '[');
    if (bracket) {
        slot = atoi(bracket + 1);
        *bracket = '\0';
    }
    const field_t *f = b->field = field_named(name);
    if (f->type != b->type)
        fail("the type in the file is not the field's", b->name);
    char *at = (char *)a + f->offset;
    if (f->kind == K_SCALAR) {
        if (b->count != 1 || slot >= 0)
            fail("a scalar field takes one value", b->name);
        memcpy(at, b->data, TYPE_SIZES[b->type]);
    } else if (f->kind == K_BUFFER) {
        if (slot >= 0)
            fail("not a field of slots", b->name);
        memcpy(at, &b->data, sizeof(void *));
    } else {
        if (slot < 0 || slot >= NPARAM)
            fail("a slot index out of range", b->name);
        const int k = (int)(f - FIELDS);
        if (!slots[k] && !(slots[k] = calloc(NPARAM, sizeof(void *))))
            fail("out of memory for", name);
        slots[k][slot] = b->data;
        memcpy(at, &slots[k], sizeof(void *));
    }
}

static void info(void)
{
    printf("vector_bytes %d\nabi %d\n", ln_vector_bytes(), ln_abi());
    static const char *const KINDS[] = {"scalar", "buffer", "slots"};
    for (int i = 0; i < NFIELDS; i++)
        printf("field %s %s %s %s\n", FIELDS[i].name, KINDS[FIELDS[i].kind], TYPE_NAMES[FIELDS[i].type],
               FIELDS[i].out ? "out" : "in");
}

int main(int argc, char **argv)
{
    if (argc == 2 && !strcmp(argv[1], "--info")) {
        info();
        return 0;
    }
    if (argc < 3)
        fail("usage: native_harness CASE OUT [--steps N] [--threads T] | --info", NULL);
    long steps = 1, threads = 1;
    for (int i = 3; i < argc; i++) {
        if (i + 1 < argc && !strcmp(argv[i], "--steps"))
            steps = atol(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--threads"))
            threads = atol(argv[++i]);
        else
            fail("unknown option", argv[i]);
    }
    if (steps < 1 || threads < 1)
        fail("--steps and --threads take a positive count", NULL);
    FILE *in = fopen(argv[1], "rb");
    if (!in)
        fail("cannot open", argv[1]);
    char entry[16];
    int version;
    if (fscanf(in, "lncase %d %15s", &version, entry) != 2 || version != 1 || fgetc(in) != '\n')
        fail("not a version 1 case file", argv[1]);
    const int forward = !strcmp(entry, "forward");
    if (!forward && strcmp(entry, "step"))
        fail("an unknown entry point", entry);
    ln_args a;
    memset(&a, 0, sizeof a);
    static buffer_t buffers[MAX_BUFFERS + 1];
    void **slots[NFIELDS] = {0};
    int n = 0;
    while (read_entry(in, &buffers[n])) {
        if (n == MAX_BUFFERS)
            fail("too many entries in", argv[1]);
        place(&a, &buffers[n++], slots);
    }
    fclose(in);
    a.threads = (int32_t)threads;
    ln_ws *ws = ln_ws_new();
    if (!ws)
        fail("out of memory for the workspace", NULL);
    int rc = 0;
    for (long s = 0; s < steps && rc == 0; s++)
        rc = forward ? ln_forward(ws, &a) : ln_train_step(ws, &a);
    ln_ws_free(ws);
    FILE *out = fopen(argv[2], "wb");
    if (!out)
        fail("cannot write", argv[2]);
    fprintf(out, "lnout 1 %d\n", rc);
    for (int i = 0; i < n; i++) {
        const buffer_t *b = &buffers[i];
        if (!b->field->out)
            continue;
        fprintf(out, "%s %s %lld\n", b->name, TYPE_NAMES[b->type], (long long)b->count);
        fwrite(b->data, TYPE_SIZES[b->type], (size_t)b->count, out);
    }
    if (fclose(out))
        fail("cannot write", argv[2]);
    return 0;
}
