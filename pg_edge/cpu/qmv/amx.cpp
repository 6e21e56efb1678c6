// The AMX inner kernel of pg_edge's bf16 many-row products (bf16_gemm.cpp has the job and the
// layouts): Intel's tile unit, TDPBF16PS C += A . B.
//
// Tiles: A = 16 weight rows x 32 k (bfloat16, fill_w's blocks), B = 16 k-pairs x 16 tokens (each
// 32-bit element a pair of bfloat16 at k = 2i, 2i + 1: bf16_gemm.cpp packs x so), C = 16 weight
// rows x 16 tokens in float32, transposed into out on the way out. Registers: C 0-3, A 4-5,
// B 6-7 (2 x 2 blocks of 16).
//
// Blocking: each worker takes its weight rows in superblocks of <= SB rows and K in chunks of
// KC: per chunk it writes the superblock's weights as A tiles into a per-thread buffer, then runs
// every 2 x 2 block of the superblock against every token block, the partial sums in a
// per-thread float32 buffer between chunks (the chunk's weights, x's chunk and the sums stay in
// the core's L2).
#include <algorithm>
#include <vector>

#include "bf16_kernels.h"

namespace pg_edge::bf16 {

#ifdef QMV_BF16

#define AMX_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// One block of NA x NB tiles over `steps` k steps: C[i][jj] (+)= A[i] . B[jj]. a: the A tile of
// the block's first row block at the chunk's first step (the next row block `a_next` further on,
// each k step 512 further); b: the B tile of the first token block (the next `b_next` further,
// each k step 256 further); c[2 i + jj]: the sums (zero: start from zero, not from c).
template <int NA, int NB>
AMX_ATTR void block(const uint16_t* a, size_t a_next, const uint32_t* b, size_t b_next, int steps, float* const* c,
                    bool zero) {
  if (zero) {
    _tile_zero(0);
    if constexpr (NB > 1) _tile_zero(1);
    if constexpr (NA > 1) _tile_zero(2);
    if constexpr (NA > 1 && NB > 1) _tile_zero(3);
  } else {
    _tile_loadd(0, c[0], 64);
    if constexpr (NB > 1) _tile_loadd(1, c[1], 64);
    if constexpr (NA > 1) _tile_loadd(2, c[2], 64);
    if constexpr (NA > 1 && NB > 1) _tile_loadd(3, c[3], 64);
  }
  for (int s = 0; s < steps; ++s) {
    _tile_loadd(4, a + s * 512, 64);
    if constexpr (NA > 1) _tile_loadd(5, a + a_next + s * 512, 64);
    _tile_loadd(6, b + s * 256, 64);
    if constexpr (NB > 1) _tile_loadd(7, b + b_next + s * 256, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (NA > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (NA > 1 && NB > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c[0], 64);
  if constexpr (NB > 1) _tile_stored(1, c[1], 64);
  if constexpr (NA > 1) _tile_stored(2, c[2], 64);
  if constexpr (NA > 1 && NB > 1) _tile_stored(3, c[3], 64);
}

// The sums of one superblock (acc[nb][mb]: 16 weight rows x 16 tokens each) into out, transposed.
// Token blocks outer: the 16 output rows a block writes stay the same over the superblock's
// columns (a row of out is N * 4 bytes long: walking all rows per column block missed the TLB).
AMX_ATTR void write_out_tiles(const Job& j, int n0, int nrows, const float* acc) {
  const int blocks = (nrows + 15) / 16, mbs = j.Mp / 16;
  for (int mb = 0; mb < mbs; ++mb) {
    for (int nb = 0; nb < blocks; ++nb) {
      const __mmask16 mask = first(nrows - nb * 16);
      const float* tile = acc + (static_cast<size_t>(nb) * mbs + mb) * 256;
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(tile + 16 * i);
      transpose16(r);  // row i: token mb * 16 + i, weight rows n0 + nb * 16 + 0..15
      for (int i = 0; i < 16 && mb * 16 + i < j.M; ++i) {
        _mm512_mask_storeu_ps(j.out + static_cast<size_t>(mb * 16 + i) * j.N + n0 + nb * 16, mask, r[i]);
      }
    }
  }
}

}  // namespace

AMX_ATTR void rows_amx(const Job& j, int lo, int hi) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);  // per thread: the pool's workers each configure their own tiles
  const int mbs = j.Mp / 16, ksteps_all = j.Kp / 32;
  thread_local std::vector<uint16_t> ws;
  thread_local std::vector<float> acc, tmp;
  ws.resize(static_cast<size_t>(SB / 16) * (KC / 32) * 512);
  acc.resize(static_cast<size_t>(SB / 16) * mbs * 256);
  tmp.resize(KC + 32);
  const size_t b_next = 256 * static_cast<size_t>(ksteps_all);
  for (int n0 = lo; n0 < hi; n0 += SB) {
    const int nrows = std::min(SB, hi - n0), blocks = (nrows + 15) / 16;
    for (int k0 = 0; k0 < j.K; k0 += KC) {
      const int kn = std::min(KC, j.K - k0), kcp = (kn + 31) / 32 * 32, steps = kcp / 32;
      fill_w(j, n0, nrows, k0, kn, kcp, ws.data(), tmp.data());
      const size_t a_next = static_cast<size_t>(steps) * 512;
      for (int nb = 0; nb < blocks; nb += 2) {
        const uint16_t* a = ws.data() + nb * a_next;
        const bool two_n = nb + 1 < blocks;
        for (int mb = 0; mb < mbs; mb += 2) {
          const bool two_m = mb + 1 < mbs;
          const uint32_t* b = j.x + (static_cast<size_t>(mb) * ksteps_all + k0 / 32) * 256;
          float* c[4];
          c[0] = acc.data() + (static_cast<size_t>(nb) * mbs + mb) * 256;
          c[1] = c[0] + 256;
          c[2] = c[0] + static_cast<size_t>(mbs) * 256;
          c[3] = c[2] + 256;
          const bool zero = k0 == 0;
          if (two_n && two_m) block<2, 2>(a, a_next, b, b_next, steps, c, zero);
          else if (two_n) block<2, 1>(a, a_next, b, b_next, steps, c, zero);
          else if (two_m) block<1, 2>(a, a_next, b, b_next, steps, c, zero);
          else block<1, 1>(a, a_next, b, b_next, steps, c, zero);
        }
      }
    }
    write_out_tiles(j, n0, nrows, acc.data());
  }
  _tile_release();
}

#endif  // QMV_BF16

}  // namespace pg_edge::bf16
