// CPU kernels for IET's attention, as XLA FFI custom calls: its two sorts and its three
// gather primitives. Built on first use by iet_jax/kernels/native.py; the XLA programs they
// replace (iet_jax/model/attention.py, iet_jax/kernels/reference.py) are the tests' oracle.
// Rows are split over XLA's intra-op thread pool.
//
// XLA:CPU sorts through a generated comparator that it calls once per comparison. The sort
// kernels avoid comparison sorts where they can: top-k selects by radix (a byte of the key at
// a time) and then radix-sorts only the k it keeps; the merge marks tokens in a bitmap and
// reads them back in order.
//
//   iet_top_k_f32(x[R, n] f32) -> positions[R, k] i32
//     jax.lax.top_k(x, k, is_stable=True)'s positions: the k largest, descending, equal
//     values in position order, -0.0 below +0.0, NaNs by sign at the ends.
//   iet_merge_i32(a[R, m] i32, b[R, e] i32; tokens) -> out[R, size] i32
//     The union of a row's two lists of token indices in [-1, tokens), ascending, each value
//     once (so an empty slot, -1, survives once, first), cut to `size`, -1 padded.
//
// XLA's gather path copies each chunk of queries' candidate rows into a block and multiplies
// it. The gather kernels read the rows where they are instead, with the d channels
// vectorised (an AVX2 clone where the CPU has it, chosen when the library loads). Shapes are
// (..., N, .): all but the last two axes are heads; idx holds token indices in [-1, N), -1
// an empty slot.
//   iet_qk_f32(x[.., N, d], y[.., N, d], idx[.., N, K]) -> [.., N, K]
//     x[i] . y[idx[i, t]], 0 for an empty slot.
//   iet_av_f32(w[.., N, K], y[.., N, d], idx[.., N, K]) -> [.., N, d]
//     sum over t of w[i, t] * y[idx[i, t]], empty slots skipped.
//   iet_scatter_f32(w[.., N, K], x[.., N, d], idx[.., N, K]) -> [.., N, d]
//     out[j] = sum over (i, t) with idx[i, t] = j of w[i, t] * x[i], in (i, t) order.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Rows per task for the row-wise kernels: enough work that scheduling costs nothing.
constexpr int64_t kRowsPerTask = 256;

// Work shared by the calling thread and the pool's threads. A task that starts after every
// block is taken finds nothing to do, so the caller never waits on a task that has not
// started: it waits only for blocks that another thread is already working on.
struct Blocks {
  std::function<void(int64_t, int64_t)> work;  // (first row, end row)
  int64_t rows = 0;
  int64_t rows_per_block = 0;
  int64_t blocks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::mutex mutex;
  std::condition_variable all_finished;

  void Run() {
    for (int64_t b = next.fetch_add(1); b < blocks; b = next.fetch_add(1)) {
      work(b * rows_per_block, std::min(rows, (b + 1) * rows_per_block));
      if (finished.fetch_add(1) + 1 == blocks) {
        std::lock_guard<std::mutex> lock(mutex);
        all_finished.notify_all();
      }
    }
  }
};

void ForEachRowBlock(ffi::ThreadPool& pool, int64_t rows,
                     std::function<void(int64_t, int64_t)> work,
                     int64_t rows_per_block = kRowsPerTask) {
  auto shared = std::make_shared<Blocks>();
  shared->rows = rows;
  shared->rows_per_block = rows_per_block;
  shared->blocks = (rows + rows_per_block - 1) / rows_per_block;
  if (shared->blocks <= 1) {
    work(0, rows);
    return;
  }
  // The work refers to the caller's buffers; late tasks never call it (see Blocks).
  shared->work = std::move(work);
  int64_t helpers = std::min<int64_t>(pool.num_threads(), shared->blocks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([shared] { shared->Run(); });
  shared->Run();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->all_finished.wait(lock, [&] { return shared->finished.load() == shared->blocks; });
}

int64_t RowLength(ffi::Span<const int64_t> dims) { return dims.size() == 0 ? 1 : dims.back(); }

int64_t RowCount(ffi::Span<const int64_t> dims) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  return rows;
}

// A 32-bit key whose ascending order is the order top_k ranks values in, largest first:
// the value's order-preserving bits (negative floats' magnitude bits flipped, so -0.0 sorts
// below +0.0 and NaNs sit at the ends by sign), complemented, read as unsigned.
inline uint32_t DescendingKey(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if (bits < 0) bits ^= 0x7fffffff;
  return ~static_cast<uint32_t>(bits) ^ 0x80000000u;
}

// Sorts packed (key << 32 | position) entries by key with a stable least-significant-digit
// radix sort of the key's four bytes, so equal keys keep their (ascending) positions. A byte
// that all entries share is skipped. `scratch` holds as many entries as `items`.
void RadixSortByKey(uint64_t* items, uint64_t* scratch, int64_t count) {
  uint32_t histogram[256];
  for (int shift = 32; shift < 64; shift += 8) {
    std::fill(histogram, histogram + 256, 0u);
    for (int64_t i = 0; i < count; ++i) ++histogram[(items[i] >> shift) & 0xff];
    if (histogram[(items[0] >> shift) & 0xff] == count) continue;
    uint32_t offset = 0;
    for (int d = 0; d < 256; ++d) {
      uint32_t c = histogram[d];
      histogram[d] = offset;
      offset += c;
    }
    for (int64_t i = 0; i < count; ++i) scratch[histogram[(items[i] >> shift) & 0xff]++] = items[i];
    std::copy(scratch, scratch + count, items);
  }
}

// The k-th smallest of `keys` (1-based), found by radix selection a byte at a time from the
// top, with how many keys equal it and how many of those belong to the k smallest.
struct Kth {
  uint32_t key;
  int64_t equal;
  int64_t equal_wanted;
};

Kth KthSmallest(const uint32_t* keys, int64_t n, int64_t k, std::vector<uint32_t>& candidates) {
  candidates.assign(keys, keys + n);
  uint32_t prefix = 0;
  int64_t rank = k;  // rank of the wanted key among the candidates
  for (int shift = 24; shift >= 0; shift -= 8) {
    // Four histograms, so runs of one digit (common: nearby floats share their top bytes)
    // do not wait on each other's increments.
    uint32_t partial[4][256] = {{0}};
    const size_t count = candidates.size();
    size_t i = 0;
    for (; i + 4 <= count; i += 4)
      for (int j = 0; j < 4; ++j) ++partial[j][(candidates[i + j] >> shift) & 0xff];
    for (; i < count; ++i) ++partial[0][(candidates[i] >> shift) & 0xff];
    int digit = 0;
    for (;; ++digit) {
      int64_t in_digit = partial[0][digit] + partial[1][digit] + partial[2][digit] +
                         partial[3][digit];
      if (rank <= in_digit) break;
      rank -= in_digit;
    }
    prefix |= static_cast<uint32_t>(digit) << shift;
    size_t kept = 0;
    for (uint32_t key : candidates) {  // branch-free: the digit test is a coin toss
      candidates[kept] = key;
      kept += ((key >> shift) & 0xff) == static_cast<uint32_t>(digit);
    }
    candidates.resize(kept);
  }
  return {prefix, static_cast<int64_t>(candidates.size()), rank};
}

// Below this many entries std::sort beats the radix sort's four histograms.
constexpr int64_t kRadixSortFrom = 64;

ffi::Error TopKF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                   ffi::ResultBuffer<ffi::S32> positions) {
  const int64_t n = RowLength(x.dimensions());
  const int64_t rows = RowCount(x.dimensions());
  const int64_t k = RowLength(positions->dimensions());
  if (k < 1 || k > n || RowCount(positions->dimensions()) != rows)
    return ffi::Error::InvalidArgument("iet_top_k_f32: k must be in [1, n], rows must match");
  if (n > (int64_t{1} << 31))
    return ffi::Error::InvalidArgument("iet_top_k_f32: rows longer than 2^31");
  const float* in = x.typed_data();
  int32_t* out = positions->typed_data();
  ForEachRowBlock(pool, rows, [=](int64_t first, int64_t end) {
    std::vector<uint32_t> keys(n), candidates;
    std::vector<uint64_t> chosen(k + 1), scratch(k);  // +1: branch-free writes
    for (int64_t r = first; r < end; ++r) {
      const float* row = in + r * n;
      for (int64_t i = 0; i < n; ++i) keys[i] = DescendingKey(row[i]);
      // The k smallest keys, collected in position order; sorting them by key alone, stably,
      // then leaves equal values in position order.
      const Kth kth = KthSmallest(keys.data(), n, k, candidates);
      int64_t count = 0;
      if (kth.equal == kth.equal_wanted) {  // no tie cut in two: take every key <= the k-th
        for (int64_t i = 0; i < n; ++i) {
          chosen[count] = (static_cast<uint64_t>(keys[i]) << 32) | static_cast<uint64_t>(i);
          count += keys[i] <= kth.key;
        }
      } else {  // equal keys, lowest positions first (the stable tie rule)
        int64_t equal_left = kth.equal_wanted;
        for (int64_t i = 0; i < n; ++i) {
          if (keys[i] < kth.key || (keys[i] == kth.key && equal_left-- > 0))
            chosen[count++] = (static_cast<uint64_t>(keys[i]) << 32) | static_cast<uint64_t>(i);
        }
      }
      if (k >= kRadixSortFrom) {
        RadixSortByKey(chosen.data(), scratch.data(), k);
      } else {
        std::sort(chosen.begin(), chosen.begin() + k);
      }
      int32_t* row_out = out + r * k;
      for (int64_t j = 0; j < k; ++j) row_out[j] = static_cast<int32_t>(chosen[j] & 0xffffffffu);
    }
  });
  return ffi::Error::Success();
}

// Rows whose token range needs more 64-bit words than this many per list entry are merged by
// sorting instead of through a bitmap of the tokens.
constexpr int64_t kBitmapWordsPerEntry = 2;

ffi::Error MergeI32(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> a, ffi::Buffer<ffi::S32> b,
                    ffi::ResultBuffer<ffi::S32> merged, int64_t tokens) {
  const int64_t m = RowLength(a.dimensions());
  const int64_t e = RowLength(b.dimensions());
  const int64_t size = RowLength(merged->dimensions());
  const int64_t rows = RowCount(a.dimensions());
  if (RowCount(b.dimensions()) != rows || RowCount(merged->dimensions()) != rows)
    return ffi::Error::InvalidArgument("iet_merge_i32: the lists' rows must match");
  const int32_t* in_a = a.typed_data();
  const int32_t* in_b = b.typed_data();
  int32_t* out = merged->typed_data();
  const int64_t words = (tokens + 63) / 64;
  const bool bitmap = words <= kBitmapWordsPerEntry * (m + e);
  std::atomic<bool> out_of_range{false};
  ForEachRowBlock(pool, rows, [=, &out_of_range](int64_t first, int64_t end) {
    std::vector<int32_t> both(m + e);
    std::vector<uint64_t> present(bitmap ? words : 0);
    for (int64_t r = first; r < end; ++r) {
      std::copy(in_a + r * m, in_a + (r + 1) * m, both.begin());
      std::copy(in_b + r * e, in_b + (r + 1) * e, both.begin() + m);
      int32_t* row_out = out + r * size;
      int64_t kept = 0;
      if (bitmap) {
        // An empty slot (-1) in either list survives once, first; then tokens ascending.
        bool empty = false;
        for (int32_t v : both) {
          if (v < -1 || v >= tokens) {
            out_of_range = true;
            continue;
          }
          if (v < 0) {
            empty = true;
          } else {
            present[v >> 6] |= uint64_t{1} << (v & 63);
          }
        }
        if (empty && kept < size) row_out[kept++] = -1;
        for (int64_t w = 0; w < words; ++w) {
          uint64_t bits = present[w];
          present[w] = 0;
          while (bits != 0 && kept < size) {
            row_out[kept++] = static_cast<int32_t>(w * 64 + __builtin_ctzll(bits));
            bits &= bits - 1;
          }
        }
      } else {
        std::sort(both.begin(), both.end());
        int64_t unique = std::unique(both.begin(), both.end()) - both.begin();
        kept = std::min(unique, size);
        std::copy(both.begin(), both.begin() + kept, row_out);
      }
      std::fill(row_out + kept, row_out + size, -1);
    }
  });
  if (out_of_range)
    return ffi::Error::InvalidArgument("iet_merge_i32: a list holds an entry outside [-1, tokens)");
  return ffi::Error::Success();
}


// ----------------------------------------------------------------------------- gathers

// An AVX2 clone beside the baseline one. No AVX-512 clone: at IET's d of 18-40 its 16 lanes
// leave long remainders, and it measured 1.4-1.8x slower than AVX2.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define IET_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define IET_VECTOR_CLONES
#endif

// Each returns false if an index lies outside [-1, n) (its slot then counts as empty).

IET_VECTOR_CLONES
bool QkRows(const float* x, const float* y, const int32_t* idx, float* out, int64_t n,
            int64_t kk, int64_t d, int64_t first, int64_t end) {
  bool in_range = true;
  for (int64_t r = first; r < end; ++r) {
    const float* xr = x + r * d;
    const float* yh = y + (r / n) * n * d;
    for (int64_t t = 0; t < kk; ++t) {
      const int32_t j = idx[r * kk + t];
      float s = 0;
      if (j >= 0 && j < n) {
        const float* yj = yh + j * d;
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < d; ++c) s += xr[c] * yj[c];
      } else {
        in_range &= j == -1;
      }
      out[r * kk + t] = s;
    }
  }
  return in_range;
}

IET_VECTOR_CLONES
bool AvRows(const float* w, const float* y, const int32_t* idx, float* out, int64_t n,
            int64_t kk, int64_t d, int64_t first, int64_t end) {
  bool in_range = true;
  for (int64_t r = first; r < end; ++r) {
    float* o = out + r * d;
    std::fill(o, o + d, 0.0f);
    const float* yh = y + (r / n) * n * d;
    for (int64_t t = 0; t < kk; ++t) {
      const int32_t j = idx[r * kk + t];
      if (j < 0 || j >= n) {
        in_range &= j == -1;
        continue;
      }
      const float weight = w[r * kk + t];
      const float* yj = yh + j * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) o[c] += weight * yj[c];
    }
  }
  return in_range;
}

IET_VECTOR_CLONES
bool ScatterHeads(const float* w, const float* x, const int32_t* idx, float* out, int64_t n,
                  int64_t kk, int64_t d, int64_t first, int64_t end) {
  bool in_range = true;
  for (int64_t h = first; h < end; ++h) {
    float* oh = out + h * n * d;
    std::fill(oh, oh + n * d, 0.0f);
    for (int64_t r = h * n; r < (h + 1) * n; ++r) {
      const float* xr = x + r * d;
      for (int64_t t = 0; t < kk; ++t) {
        const int32_t j = idx[r * kk + t];
        if (j < 0 || j >= n) {
          in_range &= j == -1;
          continue;
        }
        const float weight = w[r * kk + t];
        float* oj = oh + j * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) oj[c] += weight * xr[c];
      }
    }
  }
  return in_range;
}

using GatherRows = bool (*)(const float*, const float*, const int32_t*, float*, int64_t,
                            int64_t, int64_t, int64_t, int64_t);

// Checks the shapes (a and b as the primitive takes them, idx (.., N, K)) and runs `rows`
// over the (head x token) rows, or with `per_head` over whole heads (the scatter's outputs
// are shared by a head's rows).
ffi::Error RunGather(const char* name, ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& a,
                     const ffi::Buffer<ffi::F32>& b, const ffi::Buffer<ffi::S32>& idx,
                     ffi::Result<ffi::Buffer<ffi::F32>>& out, GatherRows rows,
                     bool weights_first, bool per_head) {
  const auto dims = idx.dimensions();
  if (dims.size() < 2 || b.dimensions().size() != dims.size())
    return ffi::Error::InvalidArgument(std::string(name) + ": wants (..., N, K) indices");
  const int64_t n = dims[dims.size() - 2];
  const int64_t kk = dims.back();
  const int64_t d = b.dimensions().back();
  const int64_t all_rows = RowCount(dims);
  if (n == 0 || all_rows == 0) return ffi::Error::Success();
  // qk takes x (.., N, d) and gives (.., N, K); av and scatter take weights (.., N, K) first
  // and give (.., N, d).
  const int64_t a_last = weights_first ? kk : d;
  const int64_t out_last = weights_first ? d : kk;
  if (RowCount(a.dimensions()) != all_rows || RowCount(b.dimensions()) != all_rows ||
      RowCount(out->dimensions()) != all_rows || RowLength(a.dimensions()) != a_last ||
      RowLength(out->dimensions()) != out_last)
    return ffi::Error::InvalidArgument(std::string(name) + ": operands' shapes differ");
  const float* pa = a.typed_data();
  const float* pb = b.typed_data();
  const int32_t* pi = idx.typed_data();
  float* po = out->typed_data();
  std::atomic<bool> in_range{true};
  auto work = [=, &in_range](int64_t first, int64_t end) {
    if (!rows(pa, pb, pi, po, n, kk, d, first, end)) in_range = false;
  };
  if (per_head) {
    ForEachRowBlock(pool, all_rows / n, work, 1);
  } else {
    ForEachRowBlock(pool, all_rows, work);
  }
  if (!in_range)
    return ffi::Error::InvalidArgument(std::string(name) + ": an index lies outside [-1, N)");
  return ffi::Error::Success();
}

ffi::Error QkF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> y,
                 ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> out) {
  return RunGather("iet_qk_f32", pool, x, y, idx, out, QkRows, false, false);
}

ffi::Error AvF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> y,
                 ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> out) {
  return RunGather("iet_av_f32", pool, w, y, idx, out, AvRows, true, false);
}

ffi::Error ScatterF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> x,
                      ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> out) {
  return RunGather("iet_scatter_f32", pool, w, x, idx, out, ScatterHeads, true, true);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(IetTopKF32, TopKF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(IetMergeI32, MergeI32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("tokens"));

#define IET_GATHER_HANDLER(symbol, impl)                       \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                  \
                                ffi::Ffi::Bind()               \
                                    .Ctx<ffi::ThreadPool>()    \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::S32>>() \
                                    .Ret<ffi::Buffer<ffi::F32>>());

IET_GATHER_HANDLER(IetQkF32, QkF32)
IET_GATHER_HANDLER(IetAvF32, AvF32)
IET_GATHER_HANDLER(IetScatterF32, ScatterF32)
