// The (o, lse) merge of DESIGN.md section 5 fused into one pass (hpcattn/merge.py is the
// definition; this is its device form). Rows where both sides are empty give (0, -inf).
#include "mask.cuh"

__global__ void merge_states(const float* __restrict__ o_a, const float* __restrict__ lse_a,
                             const float* __restrict__ o_b, const float* __restrict__ lse_b,
                             float* __restrict__ o, float* __restrict__ lse, long long rows, int D) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= rows * D) return;
    const long long r = e / D;
    const float la = lse_a[r], lb = lse_b[r], mx = fmaxf(la, lb);
    if (mx == -INFINITY) {
        o[e] = 0.f;
        if (e == r * D) lse[r] = -INFINITY;
        return;
    }
    const float wa = __expf(la - mx), wb = __expf(lb - mx), inv = 1.f / (wa + wb);
    o[e] = (wa * o_a[e] + wb * o_b[e]) * inv;
    if (e == r * D) lse[r] = mx + __logf(wa + wb);
}
