/* tiles.h: one concern, the register blocking of every kernel per vector width (how many
 * accumulators a tile holds), with the cache blocking of the 256-bit build. */

/* TILES: accumulators per register tile. 32 zmm registers hold 24 accumulators plus operands;
 * 16 ymm/xmm registers hold about 12. -DLN_WIDE_TILES selects the 512-bit blocking at any
 * width (slow there, but it runs every 512-bit tile loop on a host without AVX-512: the tests
 * build it so that the 512-bit blocking is exercised everywhere). */
#if VBYTES == 64 || defined(LN_WIDE_TILES)
#define CONV_VB 4    /* batch vectors per conv tile */
#define CONV1_OCB 6  /* conv1 forward: 6 x 4 = 24 accumulators */
#define CONV2_OCB 4  /* conv2 forward: 16 */
#define CONV2_VB 4
#define CONVI_OCB 6  /* conv2 input gradient (6 output maps): 24 */
#define WG1_OCB 3    /* conv1 weight gradient: 3 x 5 = 15 */
#define WG2_OCB 4    /* conv2 weight gradient: 20 */
#define LIN_VB 4
#define LIN_OB 6     /* linear forward: 24 */
#define LINI_OB 4    /* linear input gradient, 400 and 120 outputs: 16 */
#define LWG_OB 4     /* linear weight gradient: 4 x 4 = 16 */
#define LWT_OB 4     /* fc1 weight gradient, transposed input: 4 x 5 = 20 */
#define LWT2_OB 4    /* fc2's (256 bits and below only): 20 */
#define DA3_ROWS 4   /* fc1's outputs per unit of work in its backward: whole LINI_OB and LWT_OB tiles */
#define CONV2_CB C1  /* input maps per pass over an output row: all (see below) */
#define CONVI_CB C2
#define WG2_OG 1     /* conv2 weight gradient's output-map blocks per pass: one */
#else
#define CONV_VB 2
#define CONV1_OCB 6  /* 12 */
#define CONV2_OCB 8  /* 8 x 1: 8 accumulators, faster than 4 x 2 (docs/native.md) */
#define CONV2_VB 1
#define CONVI_OCB 6  /* 12 */
#define WG1_OCB 2    /* 10 */
#define WG2_OCB 2    /* 10 */
#define LIN_VB 2
#define LIN_OB 6     /* 12 */
#define LINI_OB 5    /* 10: faster for fc1's than 4 x 2 (docs/native.md) */
#define LWG_OB 3     /* 12 */
#define LWT_OB 2     /* 10 */
#define LWT2_OB 2    /* 10 */
#define DA3_ROWS 10
/* Blocking for the cache as well. At 256 bits and below a tile reads less than a whole pixel
 * (one 64-byte line of its four, or half of one), so the lines one tile reads fall in a quarter
 * of a 32 KB 8-way L1's sets: conv2's 150-pixel window no longer fits, and nearly every input
 * load missed (cachegrind: 227K of conv2 forward's 240K per step; half as many with a 48 KB
 * 12-way L1).
 * Hence conv2 and its input gradient pass over an output row CONV2_CB / CONVI_CB input maps at
 * a time (the accumulators stored and reloaded between passes, every sum in its old order),
 * and conv2's weight gradient takes WG2_OG blocks of output maps per pass over the input rows:
 * 1.0M -> 0.54M L1 misses per step, with fc1's weight gradient by input columns first. */
#ifndef CONV2_CB
#define CONV2_CB 2
#endif
#ifndef CONVI_CB
#define CONVI_CB 2
#endif
#ifndef WG2_OG
#define WG2_OG 4
#endif
#endif
#define LWG_IB 4
#define LINI84_OB 4  /* fc3's input gradient (84 outputs) */
/* fc2's input rows (120 floats) in whole 5-vector tiles: 256 bits and below, and not with
 * LN_WIDE_TILES (which takes the 512-bit code path wherever it differs) */
#if defined(LN_WIDE_TILES)
#define F1_FITS_VECTORS 0
#else
#define F1_FITS_VECTORS (120 % (5 * VW) == 0)
#endif
/* The largest register tile, output rows (maps) by batch vectors: the kernels' accumulator arrays
 * have this size, of which a tile's own constant shape uses a corner (arrays sized by the shape
 * itself, variable-length, kept GCC from keeping them in registers). */
#define TILE_MAX_O 8
#define TILE_MAX_V 4

