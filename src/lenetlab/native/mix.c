/* mix.c: one concern, mixup and CutMix of one image of a batch with its partner image. */

/* A batch's mixing, drawn in Python (mixing.py's MixDraws), from the batch's first image: image
 * i is mixed with image with[i] of the batch; inside its box (rows box[4i]..box[4i+1] - 1,
 * columns box[4i+2]..box[4i+3] - 1) it takes the partner's pixels (CutMix); with an empty box
 * and lam[i] != 1 it is lam x + (1 - lam) x_partner (mixup); else it stays as it is. lam[i] is
 * also the weight of its own label in the loss (loss.c). The same float arithmetic as
 * MixDraws.images, so both paths see bit-identical images (a test holds them so). */
typedef struct {
    const int64_t *with; /* NULL: no mixing */
    const float *lam;
    const int64_t *box;  /* NULL: the images come mixed, only the targets are (loss.c) */
} mix_t;

/* Whether image i takes anything from its partner. */
static int mix_takes(const mix_t *m, int64_t i)
{
    const int64_t *b = m->box + 4 * i;
    return (b[0] < b[1] && b[2] < b[3]) || m->lam[i] != 1.f;
}

/* Whether the batch's mixing is one mix_t describes: partners inside the batch of B, weights in
 * [0, 1], boxes inside the image. */
static int mix_valid(const mix_t *m, int B)
{
    for (int i = 0; i < B; i++) {
        if (m->with[i] < 0 || m->with[i] >= B || !(m->lam[i] >= 0.f && m->lam[i] <= 1.f))
            return 0;
        const int64_t *b = m->box ? m->box + 4 * i : NULL;
        if (b && (b[0] < 0 || b[0] > b[1] || b[1] > IMG || b[2] < 0 || b[2] > b[3] || b[3] > IMG))
            return 0;
    }
    return 1;
}

/* a * b rounded to float on its own, as torch's separate multiply rounds it: never fused
 * (-ffp-contract=fast) with the add after it into one FMA, which rounds once */
static inline vf mul_rounded(vf a, vf b)
{
    vf p = a * b;
    __asm__("" : "+m"(p));
    return p;
}

/* Image i of the batch (d, as packed so far) mixed with its partner's pixels o, in place;
 * both 64-byte aligned (whole vectors: an image is IMGPIX floats, a multiple of every width). */
static void mix_image(const mix_t *m, int64_t i, const float *restrict o, float *restrict d)
{
    const int64_t *b = m->box + 4 * i;
    if (b[0] < b[1] && b[2] < b[3]) {
        for (int64_t y = b[0]; y < b[1]; y++)
            memcpy(d + y * IMG + b[2], o + y * IMG + b[2], sizeof(float) * (size_t)(b[3] - b[2]));
        return;
    }
    const vf l = splat(m->lam[i]), r = splat(1.f - m->lam[i]);
    for (int p = 0; p < IMGPIX; p += VW)
        ST(d + p, mul_rounded(l, LD(d + p)) + mul_rounded(r, LD(o + p)));
}
