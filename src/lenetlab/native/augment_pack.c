/* augment_pack.c: one concern, a batch's images augmented (and mixed: mix.c) and packed into the
 * batch-innermost input layout. */

/* A batch's augmentation, drawn in Python (augment.py): image i of the batch takes move[i], the
 * row of augment._moves' table (shift dy, dx in -pad..pad, then mirrored or not, in that order),
 * filling what comes from outside the image with background; with erasing, it is multiplied by
 * 1 - rows[i][y] cols[i][x]. The same float arithmetic as EpochDraws.apply, so both paths see
 * bit-identical images (a test holds them so). Done row by row while pack_input copies the
 * image anyway: cheaper than gathering through the 784-entry table (docs/native.md). */
typedef struct {
    const int64_t *move;       /* NULL: no translation or flip */
    int pad;                   /* the largest shift, pixels */
    const float *rows, *cols;  /* NULL: no erasing */
    float background;
} augment_t;

static void fill(float *d, int n, float v)
{
    for (int i = 0; i < n; i++)
        d[i] = v;
}

static void augment_image(const augment_t *aug, int64_t i, const float *s, float *restrict d)
{
    if (aug->move) {
        const int side = 2 * aug->pad + 1;
        const int k = (int)aug->move[i], mirrored = k >= side * side;
        const int dy = k % (side * side) / side - aug->pad, dx = k % side - aug->pad;
        const float bg = aug->background;
        for (int y = 0; y < IMG; y++, d += IMG) {
            if (y + dy < 0 || y + dy >= IMG) {
                fill(d, IMG, bg);
                continue;
            }
            const float *r = s + (y + dy) * IMG;
            if (!mirrored) {  /* d[x] = r[x + dx] where 0 <= x + dx < IMG */
                const int lo = dx < 0 ? -dx : 0, hi = dx > 0 ? IMG - dx : IMG;
                fill(d, lo, bg);
                memcpy(d + lo, r + lo + dx, sizeof(float) * (hi - lo));
                fill(d + hi, IMG - hi, bg);
            } else {  /* d[x] = r[IMG - 1 - x + dx] where that is inside */
                const int lo = dx > 0 ? dx : 0, hi = dx < 0 ? IMG + dx : IMG;
                fill(d, lo, bg);
                for (int x = lo; x < hi; x++)
                    d[x] = r[IMG - 1 - x + dx];
                fill(d + hi, IMG - hi, bg);
            }
        }
        d -= IMGPIX;
    } else {
        memcpy(d, s, sizeof(float) * IMGPIX);
    }
    if (aug->rows) {
        const float *r = aug->rows + i * IMG, *q = aug->cols + i * IMG;
        for (int y = 0; y < IMG; y++)
            if (r[y] != 0.f)  /* else the factor is exactly 1 */
                for (int x = 0; x < IMG; x++)
                    d[y * IMG + x] *= 1.0f - r[y] * q[x];
    }
}

/* Image i of the batch (from row s of the images) into d, augmented where aug says so. */
static void load_image(const augment_t *aug, int64_t i, const float *s, float *restrict d)
{
    if (aug && (aug->move || aug->rows))
        augment_image(aug, i, s, d);
    else
        memcpy(d, s, sizeof(float) * IMGPIX);
}

#define LANE_GROUPS (BATCH / 16)

/* Lanes [b0, b0 + 16) of the chunk's images into the padded [32][32][64] input: the rows are
 * copied first and then transposed (faster than transposing while gathering: docs/native.md),
 * through a 50 KB stage on the stack, which stays in cache (a
 * 200 KB stage per chunk missed a 512 KB cache on every step: cachegrind, 3,100 misses per
 * step). Padding lanes are zero. A thread packs whole 16-lane groups: one 64-byte line of
 * every pixel. */
static void pack_input(chunk *c, const float *src, const int64_t *idx, int64_t first, const augment_t *aug,
                       const mix_t *mix, int b0)
{
    float stage[16 * IMGPIX] __attribute__((aligned(64)));
    float other[IMGPIX] __attribute__((aligned(64))); /* a mixed image's partner, augmented */
    for (int b = b0; b < b0 + 16; b++) {
        float *d = stage + (b - b0) * IMGPIX;
        if (b >= c->n) {
            memset(d, 0, sizeof(float) * IMGPIX);
            continue;
        }
        const float *s = src + (idx ? idx[first + b] : first + b) * IMGPIX;
        if (aug && (aug->move || aug->rows))
            augment_image(aug, first + b, s, d);
        else
            memcpy(d, s, sizeof(float) * IMGPIX);
        if (mix && mix->box && mix_takes(mix, first + b)) {
            const int64_t p = mix->with[first + b];
            load_image(aug, p, src + (idx ? idx[p] : p) * IMGPIX, other);
            mix_image(mix, first + b, other, d);
        }
    }
#if HAVE_TRANSPOSE8
    /* 8 images x 8 pixels at a time (an image is 98 such runs) in registers: the stores of
     * lanes scattered 256 bytes apart were most of the copy (docs/native.md) */
    for (int g = 0; g < 16; g += 8)
        for (int p0 = 0; p0 < IMGPIX; p0 += 8) {
            v8f r[8], o[8];
            UNROLL for (int i = 0; i < 8; i++) r[i] = *(const v8f *)(stage + (g + i) * IMGPIX + p0);
            transpose8(r, o);
            UNROLL for (int j = 0; j < 8; j++) {
                const int y = (p0 + j) / IMG, x = (p0 + j) % IMG;
                *(v8f *)(c->x + ((size_t)(y + 2) * XP + x + 2) * BATCH + b0 + g) = o[j];
            }
        }
#else
    for (int y = 0; y < IMG; y++)
        for (int b = b0; b < b0 + 16; b++) {
            const float *s = stage + (b - b0) * IMGPIX + y * IMG;
            float *d = c->x + ((size_t)(y + 2) * XP + 2) * BATCH + b;
            for (int x = 0; x < IMG; x++)
                d[x * BATCH] = s[x];
        }
#endif
}
