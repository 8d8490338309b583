/* dwconv.c on 8-float vectors: on an AVX-512 CPU a layer of 8 channels (or a channel slice of such) wastes half of
 * every 16-float vector, and the autotuner times both builds (kiln.backends.cpu.dwconv). */
#define KILN_VEC_256
#include "dwconv.c"
