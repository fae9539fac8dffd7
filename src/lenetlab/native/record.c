/* record.c: one concern, the argument record ln_args and the ABI stamp that abi.py checks. */

/* ------------------------------------------------------------------------------------------
 * The argument record: every argument of ln_train_step and ln_forward in one struct, which
 * lenetlab/native/abi.py mirrors field for field with a ctypes.Structure (StepArgs). LN_ARGS is its only
 * definition: the struct, and the names and offsets that ln_args_names and ln_args_offsets
 * report, are generated from it, so abi.py checks the whole layout at load (with LN_ABI for
 * a change of meaning) and refuses a library whose record differs instead of calling it.
 * ------------------------------------------------------------------------------------------ */
#define LN_ABI 1
#define LN_ARGS(X)                                                                                \
    X(float *const *, params)    /* the 14 parameter slots (batch-norm slots NULL without) */     \
    X(float *const *, run)       /* running mean, var of batch norm 1, then of batch norm 2 */    \
    X(int64_t *const *, nbt)     /* their num_batches_tracked */                                  \
    X(float *const *, s1)        /* per slot: exp_avg (Adam, AdamW) or momentum_buffer (SGD) */   \
    X(float *const *, s2)        /* per slot: exp_avg_sq */                                       \
    X(float *const *, steps)     /* per slot: step */                                             \
    X(const float *, x)          /* (rows, 784) images */                                         \
    X(const int64_t *, y)        /* (rows,) labels */                                             \
    X(const int64_t *, idx)      /* (batch,) the batch's rows of x, or NULL: rows 0..batch */     \
    X(const float *, drop)       /* (batch, 120) dropout scales, or NULL */                       \
    X(double *, totals)          /* += (summed loss, correct predictions) */                      \
    X(float *, out)              /* ln_forward: (rows, 10) logits */                              \
    X(const int64_t *, move)     /* augmentation (augment_t), from the batch's first image */     \
    X(const float *, erase_rows)                                                                  \
    X(const float *, erase_cols)                                                                  \
    X(const int64_t *, mix_with) /* mixing (mix_t), from the batch's first image, or NULL */      \
    X(const float *, mix_lam)                                                                     \
    X(const int64_t *, mix_box)                                                                   \
    X(const float *, targets)    /* (batch, 10) soft targets, or NULL: the labels (and mixing) */ \
    X(int64_t, rows)             /* rows of x (ln_forward: the images) */                         \
    X(int64_t, batch)            /* images in the batch */                                        \
    X(double, bn_eps)                                                                             \
    X(double, bn_momentum)                                                                        \
    X(double, lr)                                                                                 \
    X(double, beta1)                                                                              \
    X(double, beta2)                                                                              \
    X(double, eps)                                                                                \
    X(double, weight_decay)                                                                       \
    X(double, momentum)                                                                           \
    X(double, smoothing)         /* the loss's label smoothing, in [0, 1] */                      \
    X(double, background)        /* augmentation: the value outside the image */                  \
    X(int32_t, optimizer)        /* OPT_ADAM, OPT_ADAMW or OPT_SGD */                             \
    X(int32_t, relu)             /* ReLU, else tanh */                                            \
    X(int32_t, maxpool)          /* max pooling, else average */                                  \
    X(int32_t, pad)              /* augmentation: the largest shift */                            \
    X(int32_t, threads)          /* threads to run on (the same results for any count) */

#define LN_FIELD(type, name) type name;
typedef struct {
    LN_ARGS(LN_FIELD)
} ln_args;
#define LN_NAME(type, name) #name ","
#define LN_OFFSET(type, name) (int64_t) offsetof(ln_args, name),
static const char ARGS_NAMES[] = LN_ARGS(LN_NAME);
static const int64_t ARGS_OFFSETS[] = {LN_ARGS(LN_OFFSET)};

/* The stamp lenetlab/native/abi.py checks before any other call: the record's version, size,
 * and its fields' names (comma-separated, in order) and byte offsets, and the constants. */
int ln_abi(void) { return LN_ABI; }
int64_t ln_args_size(void) { return (int64_t)sizeof(ln_args); }
const char *ln_args_names(void) { return ARGS_NAMES; }
/* The constants of constants.h as this library has them: "NAME=value," for each, in order. */
#define LN_CONSTANT_TEXT(name, value) #name "=" #value ","
const char *ln_constants(void) { return LN_CONSTANTS(LN_CONSTANT_TEXT); }
/* Copies up to cap offsets into out; returns the number of fields. */
int ln_args_offsets(int64_t *out, int cap)
{
    const int n = (int)(sizeof ARGS_OFFSETS / sizeof ARGS_OFFSETS[0]);
    for (int i = 0; i < n && i < cap; i++)
        out[i] = ARGS_OFFSETS[i];
    return n;
}
