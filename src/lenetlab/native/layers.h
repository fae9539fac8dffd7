/* layers.h: one concern, LeNet5V1's layer sizes and parameter slots, and the checks that every
 * register tile divides what it tiles. */

/* Layer sizes. */
enum {
    IMG = 28, IMGPIX = IMG * IMG,
    XP = 32,              /* conv1 input, zero-padded by 2 */
    C1 = 6, H1 = 28, Q1 = 14,
    C2 = 16, H2 = 10, Q2 = 5,
    FEAT = C2 * Q2 * Q2, F1 = 120, F2 = 84, F3 = 10,
};

/* Parameter slots (constants.h), in LeNet5V1.parameters() order: batch-norm slots NULL when absent. */
/* Every register tile divides what it tiles, at every width and blocking (the loops assume it). */
_Static_assert(NV % CONV_VB == 0 && NV % CONV2_VB == 0 && NV % LIN_VB == 0, "batch vector tiles");
_Static_assert(C1 % CONV1_OCB == 0 && C2 % CONV2_OCB == 0 && C1 % CONVI_OCB == 0, "conv channel tiles");
_Static_assert(C1 % WG1_OCB == 0 && C2 % WG2_OCB == 0, "conv weight-gradient tiles");
_Static_assert(F1 % LIN_OB == 0 && F2 % LIN_OB == 0 && F3 % 5 == 0, "linear forward tiles");
_Static_assert(FEAT % LINI_OB == 0 && F1 % LINI_OB == 0 && F2 % LINI84_OB == 0, "linear input-gradient tiles");
_Static_assert(FEAT % 8 == 0 && F1 % 8 == 0, "transpose blocks");
_Static_assert(F2 % LWG_OB == 0 && F1 % LWG_IB == 0 && F3 % 2 == 0 && F2 % LWG_IB == 0, "linear wgrad tiles");
/* the threads' units of work are whole register tiles (step_job) */
_Static_assert(F1 % DA3_ROWS == 0 && DA3_ROWS % LINI_OB == 0 && DA3_ROWS % LWT_OB == 0, "fc1 backward units");
_Static_assert(F2 % 4 == 0 && 4 % LINI84_OB == 0 && 4 % (F1_FITS_VECTORS ? LWT2_OB : LWG_OB) == 0, "fc2 backward units");
_Static_assert(FEAT % 16 == 0 && FEAT % LINI_OB == 0 && F1 % LIN_OB == 0 && F2 % LIN_OB == 0, "classifier units");
_Static_assert(CONV1_OCB <= TILE_MAX_O && CONV2_OCB <= TILE_MAX_O && CONVI_OCB <= TILE_MAX_O
               && WG1_OCB <= TILE_MAX_O && WG2_OCB <= TILE_MAX_O && LIN_OB <= TILE_MAX_O && LINI_OB <= TILE_MAX_O
               && LWG_OB <= TILE_MAX_O && LWT_OB <= TILE_MAX_O && LWT2_OB <= TILE_MAX_O, "tiles' output rows");
_Static_assert(CONV_VB <= TILE_MAX_V && CONV2_VB <= TILE_MAX_V && LIN_VB <= TILE_MAX_V && LWG_IB <= TILE_MAX_V,
               "tiles' vectors");
static const int PSIZE[NPARAM] = {150, 6, 6, 6, 2400, 16, 16, 16, 48000, 120, 10080, 84, 840, 10};
