/* constants.h: one concern, every constant that both the library and the Python side use, in one
 * table. The C side makes an enum of it; lenetlab/native/abi.py reads this file for Python's
 * values, and checks them against the ones the library was built with (ln_constants, part of
 * the stamp), so that a library built from another table is rebuilt, never called. */
#define LN_CONSTANTS(X)                                                                           \
    /* the optimiser, ln_args.optimizer */                                                        \
    X(OPT_ADAM, 0) X(OPT_ADAMW, 1) X(OPT_SGD, 2)                                                  \
    /* what ln_train_step and ln_forward return */                                                \
    X(LN_OK, 0) X(LN_BAD_INDEX, -1) X(LN_BAD_LABEL, -2) X(LN_NO_MEMORY, -3) X(LN_BAD_BATCH, -4)    \
    X(LN_BAD_MIX, -5) X(LN_BAD_TARGET, -6)                                                        \
    /* threads a call runs on at most (more run as this many) */                                  \
    X(LN_MAX_THREADS, 64)                                                                         \
    /* the parameter slots of ln_args.params, in LeNet5V1.parameters() order */                   \
    X(P_C1W, 0) X(P_C1B, 1) X(P_BN1W, 2) X(P_BN1B, 3) X(P_C2W, 4) X(P_C2B, 5) X(P_BN2W, 6)        \
    X(P_BN2B, 7) X(P_F1W, 8) X(P_F1B, 9) X(P_F2W, 10) X(P_F2B, 11) X(P_F3W, 12) X(P_F3B, 13)      \
    X(NPARAM, 14)                                                                                 \
    /* the batch norms' running statistics, ln_args.run */                                        \
    X(R_MEAN1, 0) X(R_VAR1, 1) X(R_MEAN2, 2) X(R_VAR2, 3)

#define LN_ENUM(name, value) name = (value),
enum { LN_CONSTANTS(LN_ENUM) };
