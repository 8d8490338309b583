/* Denormal handling of the calling thread and of its OpenMP team (kiln.backends.cpu.fpmode).
 *
 * A float below 2^-126 in a multiply or add costs x86 cores a microcode assist, a hundred cycles or more on
 * Intel (far less on AMD Zen): a trained network whose weights or activations hold such values runs several
 * times slower (measured: PP-OCRv6's detector, 228 -> 48 ms on a Xeon with AMX). Flushing them (FTZ: results
 * below 2^-126 become 0; DAZ: such inputs read as 0) moves no output by more than ~1e-38 times the
 * magnitudes it sums.
 *
 * The mode lives in each thread's control register (x86 MXCSR, Arm FPCR), so it is set inside one OpenMP
 * region as wide as the calling thread's team: libgomp reuses those pool threads for every later region of
 * that size (torch's, oneDNN's and Kiln's C kernels share the one libgomp the process loads).
 *
 * kiln_denormals(flush, threads): set (flush=1) or clear (flush=0) the flush mode in the calling thread and
 * `threads`-1 pool threads; returns the calling thread's mode before the call (1 flushed, 0 not), or -1 where
 * the architecture has no such mode here.
 */
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define FLUSH_BITS 0x8040u /* MXCSR bit 15 FTZ, bit 6 DAZ */
static int get_mode(void) { return (_mm_getcsr() & FLUSH_BITS) == FLUSH_BITS; }
static void set_mode(int flush) {
    unsigned csr = _mm_getcsr() & ~FLUSH_BITS;
    _mm_setcsr(flush ? csr | FLUSH_BITS : csr);
}
#define HAVE_MODE 1
#elif defined(__aarch64__)
#define FZ_BIT (1ul << 24) /* FPCR.FZ: flush inputs and results */
static unsigned long fpcr(void) { unsigned long v; __asm__ volatile("mrs %0, fpcr" : "=r"(v)); return v; }
static int get_mode(void) { return (fpcr() & FZ_BIT) != 0; }
static void set_mode(int flush) {
    unsigned long v = fpcr() & ~FZ_BIT;
    if (flush) v |= FZ_BIT;
    __asm__ volatile("msr fpcr, %0" : : "r"(v));
}
#define HAVE_MODE 1
#else
#define HAVE_MODE 0
#endif

int kiln_denormals(int flush, int threads) {
#if HAVE_MODE
    int before = get_mode();
    set_mode(flush);
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        set_mode(flush);
    }
#else
    (void)threads;
#endif
    return before;
#else
    (void)flush; (void)threads;
    return -1;
#endif
}

/* The calling thread's mode: 1 flushed, 0 not, -1 where the architecture has none here. */
int kiln_denormals_mode(void) {
#if HAVE_MODE
    return get_mode();
#else
    return -1;
#endif
}
