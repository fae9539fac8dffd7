/* workspace.c: one concern, the buffers a step keeps between calls (per-chunk activations,
 * gradients, partial sums) and the thread pool. */

/* ------------------------------------------------------------------------------------------
 * Workspace: per-chunk activation buffers, gradients, the conv weight-gradient partials and
 * the thread pool.
 * ------------------------------------------------------------------------------------------ */
/* A chunk's per-row sums of the activation backward (act_pool_bwd's rs1, rs2), per layer */
enum { RS1A = 0, RS1B = C1 * H1, RS2A = 2 * C1 * H1, RS2B = 2 * C1 * H1 + C2 * H2,
       RS_FLOATS = 2 * (C1 * H1 + C2 * H2) };
typedef struct {
    float *x;          /* [1][32][32][64] padded input */
    float *z1;         /* [6][28][28][64] with batch norm, conv1 output, normalised in place */
    float *a1;         /* [6][28][28][64] activation (without batch norm conv1's output first, in
                        * place); in the backward, the gradient w.r.t. conv1 output */
    float *p1, *dp1;   /* [6][14][14][64] */
    float *z2, *a2;    /* [16][10][10][64], as z1 and a1 */
    float *p2, *dp2;   /* [400][64] */
    float *drop;       /* [120][64] dropout scale */
    float *a3, *da3;   /* [120][64] */
    float *a4, *da4;   /* [84][64] */
    float *lg, *dlg;   /* [10][64] */
    float *mask;       /* [64]: 1 on lanes in use, 0 on padding */
    float *rs;         /* [RS_FLOATS] */
    int n;             /* lanes in use */
} chunk;

/* each buffer's floats, in BATCH-float rows */
static const size_t CHUNK_ROWS[] = {
    XP * XP, C1 * H1 * H1, C1 * H1 * H1, C1 * Q1 * Q1, C1 * Q1 * Q1, C2 * H2 * H2, C2 * H2 * H2,
    FEAT, FEAT, F1, F1, F1, F2, F2, F3, F3, 1, (RS_FLOATS + BATCH - 1) / BATCH};
#define NBUF (sizeof(CHUNK_ROWS) / sizeof(CHUNK_ROWS[0]))

typedef struct {
    int cap;
    chunk *ch;
    float **mem;       /* one allocation per chunk */
    float *grad;       /* gradients, each slot at goff(slot); zero between steps: the update
                        * zeroes each gradient it reads (while in cache: a memset at the
                        * step's start missed a 512 KB cache, 2,800 misses per step) */
    vf *pw1, *pw2;     /* conv weight-gradient partials */
    float *w2t;        /* conv2 weights flipped and transposed: [6][16][5][5] */
    float *featT;      /* [64][400]: fc1's input transposed, for its weight gradient */
    float *a3T;        /* [64][120]: fc2's, where fc2_wgrad takes it transposed */
    pool_t pool;
} ln_ws;

static void *zalloc(size_t bytes)
{
    bytes = (bytes + 63) & ~(size_t)63;
    void *p = aligned_alloc(64, bytes);
    if (p)
        memset(p, 0, bytes);
    return p;
}

static int goff(int slot)
{
    int off = 0;
    for (int s = 0; s < slot; s++)
        off += (PSIZE[s] + 15) & ~15;
    return off;
}

void ln_ws_free(ln_ws *ws)
{
    if (!ws)
        return;
    pool_stop(&ws->pool);
    barrier_destroy(&ws->pool.bar);
    for (int i = 0; i < ws->cap; i++)
        free(ws->mem[i]);
    free(ws->mem);
    free(ws->ch);
    free(ws->grad);
    free(ws->pw1);
    free(ws->pw2);
    free(ws->w2t);
    free(ws->featT);
    free(ws->a3T);
    free(ws);
}

ln_ws *ln_ws_new(void)
{
    ln_ws *ws = calloc(1, sizeof *ws);
    if (!ws)
        return NULL;
    pool_init(&ws->pool);
    ws->grad = zalloc(sizeof(float) * goff(NPARAM));
    ws->pw1 = zalloc(sizeof(vf) * C1 * 25);
    ws->pw2 = zalloc(sizeof(vf) * C2 * C1 * 25);
    ws->w2t = zalloc(sizeof(float) * C2 * C1 * 25);
    ws->featT = zalloc(sizeof(float) * BATCH * FEAT);
    ws->a3T = zalloc(sizeof(float) * BATCH * F1);
    if (!ws->grad || !ws->pw1 || !ws->pw2 || !ws->w2t || !ws->featT || !ws->a3T) {
        ln_ws_free(ws);
        return NULL;
    }
    return ws;
}

static int ws_reserve(ln_ws *ws, int chunks)
{
    if (chunks <= ws->cap)
        return 0;
    chunk *ch = realloc(ws->ch, sizeof(chunk) * chunks);
    if (!ch)
        return -1;
    ws->ch = ch;
    float **mem = realloc(ws->mem, sizeof(float *) * chunks);
    if (!mem)
        return -1;
    ws->mem = mem;
    size_t total = 0;
    for (size_t i = 0; i < NBUF; i++)
        total += CHUNK_ROWS[i] * BATCH;
    for (int k = ws->cap; k < chunks; k++) {
        float *m = zalloc(sizeof(float) * total); /* zero: the padding rows and columns stay 0 */
        if (!m)
            return -1;
        ws->mem[k] = m;
        float **dst[] = {&ch[k].x, &ch[k].z1, &ch[k].a1, &ch[k].p1, &ch[k].dp1, &ch[k].z2, &ch[k].a2,
                         &ch[k].p2, &ch[k].dp2, &ch[k].drop, &ch[k].a3, &ch[k].da3,
                         &ch[k].a4, &ch[k].da4, &ch[k].lg, &ch[k].dlg, &ch[k].mask, &ch[k].rs};
        _Static_assert(sizeof dst / sizeof dst[0] == NBUF, "a row count per chunk buffer");
        for (size_t i = 0; i < NBUF; i++) {
            *dst[i] = m;
            m += CHUNK_ROWS[i] * BATCH;
        }
        ws->cap = k + 1;
    }
    return 0;
}

static void set_lanes(chunk *c, int n)
{
    c->n = n;
    for (int b = 0; b < BATCH; b++)
        c->mask[b] = b < n ? 1.f : 0.f;
}
