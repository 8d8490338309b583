/* TopK of float32 rows (kiln.backends.cpu.topk), in the order of the reference's stable sort
 * (kiln.ops.reduce.TopK): largest first (or smallest first), NaN above every number, -0.0 equal to 0.0,
 * and equal values in ascending index order.
 *
 * Each element becomes one 64-bit key whose unsigned order is exactly that order: the high 32 bits are
 * the float's bits made monotone (sign flipped for positives, all bits for negatives; -0.0 read as 0.0,
 * every NaN as one NaN above +inf), complemented for `largest`; the low 32 bits are the index, so all
 * keys differ. The k smallest keys are selected (quickselect with branch-free partitions) and sorted
 * (quicksort, insertion sort below 17); past 64 rounds either falls back to a heap, so the work is
 * bounded by O(64 n + n log n) whatever the input.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline uint64_t key_of(float v, int64_t j, int largest) {
    uint32_t u;
    if (v != v) u = 0x7fc00000u;  /* every NaN: one NaN, above +inf */
    else {
        if (v == 0.0f) v = 0.0f;  /* -0.0 equals 0.0 */
        memcpy(&u, &v, 4);
    }
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    if (largest) u = ~u;
    return ((uint64_t)u << 32) | (uint64_t)(uint32_t)j;
}

static void sift_down(uint64_t *h, long n, long i) {  /* max-heap */
    for (;;) {
        long l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && h[l] > h[m]) m = l;
        if (r < n && h[r] > h[m]) m = r;
        if (m == i) return;
        uint64_t t = h[i]; h[i] = h[m]; h[m] = t;
        i = m;
    }
}

/* a[0..k) := the k smallest of a[0..n), in place (a k-entry max-heap: O(n log k)). */
static void heap_select(uint64_t *a, long n, long k) {
    for (long i = k / 2 - 1; i >= 0; i--) sift_down(a, k, i);
    for (long j = k; j < n; j++)
        if (a[j] < a[0]) { uint64_t t = a[0]; a[0] = a[j]; a[j] = t; sift_down(a, k, 0); }
}

static void heap_sort(uint64_t *a, long n) {
    for (long i = n / 2 - 1; i >= 0; i--) sift_down(a, n, i);
    for (long e = n - 1; e > 0; e--) {
        uint64_t t = a[0]; a[0] = a[e]; a[e] = t;
        sift_down(a, e, 0);
    }
}

static void insertion_sort(uint64_t *a, long n) {
    for (long i = 1; i < n; i++) {
        uint64_t v = a[i];
        long j = i;
        for (; j > 0 && a[j - 1] > v; j--) a[j] = a[j - 1];
        a[j] = v;
    }
}

/* Partition a[0..n) (n > 16, distinct keys) around the median of three: returns i, 0 < i < n, with
 * a[0..i) < pivot <= a[i..n). Branch-free Lomuto: every element is swapped, the boundary advances by the
 * comparison. The median of three distinct keys has a smaller and a larger one, so neither side is empty. */
static long partition(uint64_t *a, long n) {
    uint64_t x = a[0], y = a[n / 2], z = a[n - 1];
    uint64_t p = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
    long i = 0;
    for (long j = 0; j < n; j++) {
        uint64_t v = a[j];
        a[j] = a[i];
        a[i] = v;
        i += v < p;
    }
    return i;
}

/* a[0..k) := the k smallest of a[0..n) (quickselect; the heap past a depth bound, so O(n log k) at worst). */
static void select_k(uint64_t *a, long n, long k) {
    long lo = 0, hi = n;
    int depth = 64;
    while (hi - lo > 16) {
        if (depth-- == 0) { heap_select(a + lo, hi - lo, k - lo); return; }
        long i = lo + partition(a + lo, hi - lo);
        if (i == k) return;
        if (k < i) hi = i; else lo = i;
    }
    insertion_sort(a + lo, hi - lo);
}

/* ascending sort (quicksort on the smaller side, the larger in the loop; heap sort past a depth bound) */
static void sort_keys(uint64_t *a, long n, int depth) {
    while (n > 16) {
        if (depth-- == 0) { heap_sort(a, n); return; }
        long i = partition(a, n);
        if (i < n - i) { sort_keys(a, i, depth); a += i; n -= i; }
        else { sort_keys(a + i, n - i, depth); n = i; }
    }
    insertion_sort(a, n);
}

static void top_row(const float *x, long n, long inner, long k, int largest, uint64_t *keys,
                    float *vals, int64_t *idx) {
    for (long j = 0; j < n; j++) keys[j] = key_of(x[j * inner], j, largest);
    if (k < n) select_k(keys, n, k);
    sort_keys(keys, k, 64);
    for (long r = 0; r < k; r++) {
        int64_t j = (int64_t)(uint32_t)keys[r];
        vals[r * inner] = x[j * inner];
        idx[r * inner] = j;
    }
}

/* x: contiguous [outer, n, inner]; vals, idx: contiguous [outer, k, inner]; 0 < k <= n < 2^32.
 * Returns 0, or -1 when memory runs out. */
int kiln_topk_f32(const float *x, long outer, long n, long inner, long k, int largest, float *vals,
                  int64_t *idx) {
    long rows = outer * inner;
    int failed = 0;
    if (rows == 1) {  /* no parallel region: entering one costs more than a small row */
        uint64_t *h = malloc(sizeof(uint64_t) * (size_t)n);
        if (h == NULL) return -1;
        top_row(x, n, inner, k, largest, h, vals, idx);
        free(h);
        return 0;
    }
    #pragma omp parallel if (rows > 1 && rows * n >= (1L << 16)) reduction(|:failed)
    {
        uint64_t *h = malloc(sizeof(uint64_t) * (size_t)n);
        if (h == NULL) failed = 1;
        #pragma omp for schedule(static)  /* every thread meets it, with or without its heap */
        for (long r = 0; r < rows; r++) {
            long o = r / inner, i = r % inner;
            if (h != NULL)
                top_row(x + o * n * inner + i, n, inner, k, largest, h, vals + o * k * inner + i,
                        idx + o * k * inner + i);
        }
        free(h);
    }
    return failed ? -1 : 0;
}
