/* Greedy NonMaxSuppression of ranked candidates (kiln.backends.cpu.nms; the semantics are those of
 * kiln.ops.detection, which ranks the candidates and assembles the output).
 *
 * Each row (one batch, one class) walks its candidates in rank order. A candidate of no positive area
 * (or NaN) is kept without any IoU test and never suppresses another; a candidate is otherwise kept
 * unless a box already kept in its row overlaps it with IoU > thr, computed with the reference's float32
 * operations in the reference's order (no contraction: this file is compiled as ISO C99, where GCC's
 * -ffp-contract defaults to off). A row stops after `limit` kept candidates.
 *
 * The kept boxes of positive area sit in a uniform grid over the row's candidates, filed by their
 * (x_min, y_min) into blocks of BL boxes per cell (unused lanes NaN, which overlaps nothing), and a
 * candidate is tested against a whole block at once (a vectorised loop); only cells that can hold an
 * overlapping box are visited. Two boxes with a positive
 * intersection satisfy x_min_k > x_min - W and x_min_k < x_max, where W bounds every candidate's
 * width (W is rounded up), and the same in y; the cell index is a monotone function of the coordinate
 * (double subtraction, division by a positive cell size, floor, clamp: each rounding is monotone and
 * x_min_k is exactly representable), so the visited cells contain every such box whatever the rounding.
 * Rows whose candidates have non-finite coordinates use one cell. Every pair in a visited cell is
 * tested exactly, so the grid only decides how much work is done, never the result.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_AXIS 4096
#define BL 16

typedef struct {
    float x0[BL], y0[BL], x1[BL], y1[BL], a[BL];
    int32_t next, fill;  /* the cell's next (older, full) block, -1 at the end; lanes in use */
} block_t;

/* Whether a kept box of the block overlaps the candidate with IoU > thr, as the reference decides it:
 * iw = min(x_max) - max(x_min) clamped at 0, likewise ih, inter = iw * ih; inter > 0 and
 * inter / ((area_a + area_b) - inter) > thr, all in float32. */
static int block_hits(const block_t *b, float ax0, float ay0, float ax1, float ay1, float aa, float thr) {
    int hit = 0;
    for (int l = 0; l < BL; l++) {
        float iw = (ax1 < b->x1[l] ? ax1 : b->x1[l]) - (ax0 > b->x0[l] ? ax0 : b->x0[l]);
        float ih = (ay1 < b->y1[l] ? ay1 : b->y1[l]) - (ay0 > b->y0[l] ? ay0 : b->y0[l]);
        iw = iw < 0 ? 0 : iw;
        ih = ih < 0 ? 0 : ih;
        float inter = iw * ih;
        float uni = (aa + b->a[l]) - inter;
        hit |= (inter > 0) & (inter / uni > thr);
    }
    return hit;
}

static long cell_of(double v, double lo, double size, long cells) {
    double c = floor((v - lo) / size);
    if (!(c > 0)) return 0;  /* also NaN */
    if (c >= (double)(cells - 1)) return cells - 1;
    return (long)c;
}

/* Cells along one axis and their size, for coordinates in [lo, hi] and boxes at most w wide. */
static long axis_cells(double lo, double hi, double w, long cap, double *size) {
    double range = hi - lo;
    long n = 1;
    if (isfinite(range) && isfinite(w) && w > 0 && range > 0) {
        double q = range / w;
        n = q >= (double)(cap - 1) ? cap : (long)q + 1;
    }
    *size = n > 1 ? range / (double)n : 1.0;
    if (!(*size > 0) || !isfinite(*size)) { n = 1; *size = 1.0; }
    return n;
}

/* rows: R rows of m ranks; order[r * m + j]: box index (in [0, n)) of rank j of row r; counts[r]: its
 * candidates (<= m); base[r]: offset of row r's batch in the box columns (each nb * n long); x0 .. area:
 * the reference's corner and area columns; none: no pair can be suppressed (iou threshold >= 1 or NaN).
 * keep[r * m + j] is set to 1 for each kept rank (the caller zeroes it). Returns 0, -1 when memory runs
 * out, -2 for an index out of range. */
int kiln_nms(long rows, long m, long n, const int64_t *order, const int64_t *counts, const int64_t *base,
             const float *x0, const float *y0, const float *x1, const float *y1, const float *area,
             long limit, float thr, int none, uint8_t *keep) {
    long most = 0;
    for (long r = 0; r < rows; r++) {
        if (counts[r] < 0 || counts[r] > m) return -2;
        if (counts[r] > most) most = counts[r];
    }
    if (most == 0 || limit <= 0) return 0;
    if (most > (1L << 29)) return -1;  /* block indices are int32 */
    block_t *pool = NULL;  /* blocks of kept boxes */
    int32_t *head = NULL;  /* each cell's newest block, -1 when empty */
    long head_cap = 0, pool_cap = 0;
    int status = 0;
    for (long r = 0; r < rows && status == 0; r++) {
        const int64_t *ord = order + r * m;
        uint8_t *kp = keep + r * m;
        long cnt = counts[r], kept = 0;
        int64_t off = base[r];
        for (long j = 0; j < cnt; j++)
            if (ord[j] < 0 || ord[j] >= n) { status = -2; break; }
        if (status) break;
        if (none) {
            for (long j = 0; j < cnt && kept < limit; j++, kept++) kp[j] = 1;
            continue;
        }
        /* the grid: bounds of the row's positive-area candidates */
        double xlo = INFINITY, xhi = -INFINITY, ylo = INFINITY, yhi = -INFINITY, wx = 0, wy = 0;
        for (long j = 0; j < cnt; j++) {
            int64_t i = off + ord[j];
            if (!(area[i] > 0)) continue;
            double a = x0[i], b = y0[i], w = (double)x1[i] - a, h = (double)y1[i] - b;
            if (a < xlo) xlo = a;
            if (a > xhi) xhi = a;
            if (b < ylo) ylo = b;
            if (b > yhi) yhi = b;
            if (w > wx || w != w) wx = w;
            if (h > wy || h != h) wy = h;
        }
        wx = nextafter(wx, INFINITY);  /* >= every width despite the rounding of the subtraction */
        wy = nextafter(wy, INFINITY);
        double sx, sy;
        long cap = 1;  /* cells per axis: cap^2 < 16 cnt, so the grid is linear in the candidates */
        while (cap < MAX_AXIS && cap * cap < 4 * cnt) cap *= 2;
        long gx = axis_cells(xlo, xhi, wx, cap, &sx), gy = axis_cells(ylo, yhi, wy, cap, &sy);
        if (gx * gy > head_cap) {
            free(head);
            head_cap = gx * gy;
            head = malloc(sizeof(int32_t) * (size_t)head_cap);
            if (head == NULL) { status = -1; break; }
        }
        long blocks = (gx * gy < cnt ? gx * gy : cnt) + cnt / BL + 1;  /* partial blocks: one per cell */
        if (blocks > pool_cap) {
            free(pool);
            pool_cap = blocks;
            pool = malloc(sizeof(block_t) * (size_t)pool_cap);
            if (pool == NULL) { status = -1; break; }
        }
        for (long c = 0; c < gx * gy; c++) head[c] = -1;
        long used = 0;
        for (long j = 0; j < cnt && kept < limit; j++) {
            int64_t i = off + ord[j];
            float ax0 = x0[i], ay0 = y0[i], ax1 = x1[i], ay1 = y1[i], aa = area[i];
            if (!(aa > 0)) { kp[j] = 1; kept++; continue; }
            long cx0 = cell_of((double)ax0 - wx, xlo, sx, gx), cx1 = cell_of(ax1, xlo, sx, gx);
            long cy0 = cell_of((double)ay0 - wy, ylo, sy, gy), cy1 = cell_of(ay1, ylo, sy, gy);
            int hit = 0;
            for (long cy = cy0; cy <= cy1 && !hit; cy++)
                for (long cx = cx0; cx <= cx1 && !hit; cx++)
                    for (int32_t k = head[cy * gx + cx]; k >= 0 && !hit; k = pool[k].next)
                        hit = block_hits(pool + k, ax0, ay0, ax1, ay1, aa, thr);
            if (hit) continue;
            kp[j] = 1;
            kept++;
            long c = cell_of(ax0, xlo, sx, gx) + gx * cell_of(ay0, ylo, sy, gy);
            block_t *b = head[c] >= 0 ? pool + head[c] : NULL;
            if (b == NULL || b->fill == BL) {
                block_t *nb = pool + used;
                for (int l = 0; l < BL; l++) nb->x0[l] = nb->y0[l] = nb->x1[l] = nb->y1[l] = nb->a[l] = NAN;
                nb->next = head[c];
                nb->fill = 0;
                head[c] = (int32_t)used++;
                b = nb;
            }
            b->x0[b->fill] = ax0; b->y0[b->fill] = ay0; b->x1[b->fill] = ax1; b->y1[b->fill] = ay1;
            b->a[b->fill] = aa;
            b->fill++;
        }
    }
    free(pool);
    free(head);
    return status;
}
