// The Elman, LSTM and GRU recurrences as fused CPU loops, called from JAX through the XLA FFI.
//
// Shape legend: T time, B batch, D input, H hidden; gate blocks in PyTorch's order, LSTM
// (i | f | g | o), GRU (r | z | n). The reference definitions are `jaxrnn.cells.elman`,
// `jaxrnn.cells.lstm` and `jaxrnn.cells.gru` (pointwise and pointwise_bwd), unrolled by
// `jaxrnn.scan.recurrent_scan` / `jaxrnn.backward.recurrent_scan_bwd`; these loops compute the
// same numbers (tests/test_kernels.py checks them against it and against NumPy) with what
// XLA:CPU cannot do from a scan body: `U` and `W` packed once per sequence instead of once per
// step, `U x_t` and `W h_{t-1}` accumulated in one register tile, the gate arithmetic done on the
// accumulators, and each step split between threads, each on its own CPU: by hidden units, the
// threads meeting at one barrier per step, or, where the weights are small, by rows of the batch,
// with no barrier at all (`Part`).
//
// Elman forward, per step: h_t = f(U x_t + b + W h_{t-1} (+ bh)), f = tanh, sigmoid or relu.
// Elman backward, per step t = T-1 .. 0: delta_t = (d_hs[t] + delta_{t+1} W) f'(h_t), f' from h_t
//   (tanh: 1 - h_t^2), kept transposed [H, T, B].
// Every backward writes its gradients transposed and rolled by one step (step t's in column t - 1,
// step 0's in column T - 1), for the weight gradients (BackwardLoop).
// LSTM forward, per step (z = U x_t + b + W h_{t-1} + bh, the g block scaled by 2):
//   s_t = sigmoid(scale * z)  [B, 4H] (kept as 4 gate-major [H, T, B] arrays); i, f, o = blocks
//   of s;
//   g = 2 s_g - 1 (= tanh(z_g))
//   c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)
// LSTM backward, per step t = T-1 .. 0, with dh = d_hs[t] + (d_a_{t+1} W), dc carried:
//   dc += dh o (1 - tanh(c_t)^2)
//   d_a_t = [dc g, dc c_{t-1}, 4 dc i, dh tanh(c_t)] * s (1 - s);  dc <- dc f
// GRU forward, per step (a = U x_t + b, rec = W h_{t-1} + bh, blocks r | z | n):
//   r, z = sigmoid(a_rz + rec_rz);  n = tanh(a_n + r rec_n);  h_t = (1 - z) n + z h_{t-1}
//   residual [r | z | n | rec_n]  [B, 4H] (kept as 4 gate-major [H, T, B] arrays)
// GRU backward, per step, with dh = d_hs[t] + dh z_{t+1} + (d_rec_{t+1} W):
//   d_n = dh (1 - z)(1 - n^2);  d_r = d_n rec_n r (1 - r);  d_z = dh (h_{t-1} - n) z (1 - z)
//   d_a = [d_r | d_z | d_n] (for U, b);  d_rec = [d_r | d_z | d_n r] (for W, bh, and dh_{t-1})
// Each backward also returns its gradient rows summed over T and B (the biases' gradients).
// Each backward may fuse the readout z_t = V h_t + c: given dz [T, B, O] and V [O, H], it adds
//   d_hs[t] = dz_t V to the state gradient itself, by the step's GEMM code (`Readout`).
//
// Vectors are GCC/Clang vector extensions (16 floats): AVX-512 with -march=native on x86, split
// by the compiler into whatever the target has elsewhere.
#include <sched.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef double vd __attribute__((vector_size(128)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// A store that bypasses the caches (non-temporal) where p is 64-byte aligned, for whole lines not
// read again soon: no read-for-ownership of the line first. Weakly ordered: made visible to other
// threads by the writer's next `Fence` (each participant of `Parallel` ends with one).
inline void stream(float* p, vf v) {
#if defined(__AVX512F__)
  if (((uintptr_t)p & 63) == 0) {
    __m512 m;
    std::memcpy(&m, &v, sizeof(v));
    return _mm512_stream_ps(p, m);
  }
#endif
  store(p, v);
}

inline void Fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// Into L1, for the GEMM tiles' weights (`kPrefetchAhead`): the line `floats` floats after p,
// which may lie past the end of p's array (the address is formed as an integer: a prefetch never
// faults).
inline void PrefetchL1(const float* p, size_t floats) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) +
                                                   floats * sizeof(float)), 0, 3);
}

// Into L2, for what the backward loops read first at the next step (`BackwardLoop`): one step
// ahead a line arrives long before it is read (a step is tens of microseconds), and the thread's
// lines of one step (80 KB for the char-LM LSTM) would not all stay in L1.
inline void PrefetchL2(const float* p) { __builtin_prefetch(p, 0, 2); }

inline vf splat(float x) { return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

// exp(x) to ~1 ulp over the float range: Cody-Waite reduction by ln 2 and Cephes' polynomial.
inline vf vexp(vf x) {
  x = x < 88.0f ? x : splat(88.0f);
  x = x > -87.0f ? x : splat(-87.0f);
  const float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  vf t = x * 1.44269504088896341f + kShift;
  vf n = t - kShift;
  vi ni = (vi)t - (vi)splat(kShift);
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vf scale = (vf)((ni + 127) << 23);
  return p * scale;
}

inline vf sigmoid(vf z) { return 1.0f / (1.0f + vexp(-z)); }
inline vf tanh_(vf x) { return 2.0f * sigmoid(2.0f * x) - 1.0f; }

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Waits until `ready()`: a short spin (a step is tens of microseconds), then sched_yield, so
// that a thread XLA left runnable on the same core (its pool workers spin for a while after their
// own work), or the very helper being waited for, is not kept off that core for a whole time
// slice: spinning longer measured 6-14x slower inside a JAX process than 200 spins, and a pure
// spin while waiting for helpers to join 1.2-1.3x (experiments/PERF_NOTES.md).
template <typename Ready>
inline void SpinThenYield(Ready ready) {
  for (int spins = 0; !ready(); ++spins) {
    if (spins > 200) sched_yield();
    else Pause();
  }
}

// A barrier the threads of one call meet at once per step.
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void Wait() {
    if (n_ == 1) return;
    int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.store(gen + 1, std::memory_order_release);
    } else {
      SpinThenYield([&] { return gen_.load(std::memory_order_acquire) != gen; });
    }
  }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<int> gen_{0};
};

// Keeps the calling thread on one CPU while it lives (cpu < 0: leaves it be), then gives it back
// the affinity it had. Linux only; elsewhere a no-op.
class PinnedTo {
 public:
  explicit PinnedTo(int cpu) {
#if defined(__linux__)
    if (cpu < 0 || sched_getaffinity(0, sizeof(saved_), &saved_) != 0) return;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    pinned_ = sched_setaffinity(0, sizeof(one), &one) == 0;
#endif
  }
  ~PinnedTo() {
#if defined(__linux__)
    if (pinned_) sched_setaffinity(0, sizeof(saved_), &saved_);
#endif
  }
  PinnedTo(const PinnedTo&) = delete;
  PinnedTo& operator=(const PinnedTo&) = delete;

 private:
#if defined(__linux__)
  cpu_set_t saved_;
#endif
  bool pinned_ = false;
};

// The CPU for each of n participants: the caller's own, then the next ones it may run on, so that
// no two share one (all -1, nothing pinned, where the caller may use fewer than n CPUs or the
// OS does not say). Left to the scheduler, the helper woke on the caller's CPU in about half of
// the LSTM-medium training steps' forward loops (Linux wakes a thread near its waker), and the
// two then took turns on that CPU for the whole call, yielding at every step's barrier: 44
// instead of 21 us per step.
std::vector<int> DistinctCpus(int n) {
  std::vector<int> cpus(n, -1);
#if defined(__linux__)
  cpu_set_t allowed;
  const int here = sched_getcpu();
  if (n < 2 || here < 0 || sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return cpus;
  if (!CPU_ISSET(here, &allowed) || CPU_COUNT(&allowed) < n) return cpus;
  int k = 0;
  for (int i = 0; i < CPU_SETSIZE && k < n; ++i) {
    const int cpu = (here + i) % CPU_SETSIZE;
    if (CPU_ISSET(cpu, &allowed)) cpus[k++] = cpu;
  }
#endif
  return cpus;
}

// Runs body(p, n, barrier) for p in [0, n) with n <= threads: p = 0 on the caller, the others as
// tasks on XLA's CPU thread pool (its workers are idle while this call runs; a helper std::thread
// per call instead measured 1.5-2x slower, an extra runnable thread on the same cores). The bodies
// may meet at a barrier once per step (`Part`), so every one of them must be running: n counts
// only the tasks that started within kJoinWait of being scheduled. The pool may be busy, or its
// workers may be the very threads running other calls of these loops (several JAX computations at
// once: with a fixed n, two concurrent calls each waited at their barrier for a helper that could
// never start, and hung); a task that starts later finds the call sealed and returns without
// touching it. A task the pool runs inline on the caller (ffi::ThreadPool does that when
// scheduling fails) starts a std::thread for itself instead. Each participant stays on its own
// CPU for the call (`DistinctCpus`, `PinnedTo`).
template <typename Pool, typename F>
void Parallel(Pool& pool, int threads, F body) {
  if (threads <= 1) {
    SpinBarrier single(1);
    body(0, 1, single);
    Fence();
    return;
  }
  struct Join {
    std::atomic<int> joined{0};  // helpers admitted; -1 - k once sealed with k admitted
    std::atomic<int> n{0};       // the participant count, published after sealing
    std::atomic<int> pinned{0};  // admitted helpers on their own CPU
    std::atomic<int> done{0};    // admitted helpers finished
    SpinBarrier* barrier = nullptr;
    F* body = nullptr;
    std::vector<int> cpus;  // per participant, set before n is published
    // Set by the caller around each Schedule: a task that runs while it is set, on the caller's
    // thread, is being run inline by Schedule. (The thread id alone is not enough: when this call
    // itself runs on a pool worker, a task of it may run on that same worker after it returned.)
    std::atomic<bool> scheduling{false};
    std::vector<std::thread> fallback;  // touched by the caller's thread only
  };
  auto join = std::make_shared<Join>();
  join->body = &body;
  auto task = [join] {
    int v = join->joined.load(std::memory_order_acquire);
    do {
      if (v < 0) return;  // sealed without this task: the call may already be over
    } while (!join->joined.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel));
    int n = 0;
    SpinThenYield([&] { return (n = join->n.load(std::memory_order_acquire)) != 0; });
    {
      PinnedTo pin(join->cpus[v + 1]);
      join->pinned.fetch_add(1, std::memory_order_release);
      (*join->body)(v + 1, n, *join->barrier);
      Fence();
    }
    join->done.fetch_add(1, std::memory_order_release);
  };
  const std::thread::id caller = std::this_thread::get_id();
  for (int p = 1; p < threads; ++p) {
    join->scheduling.store(true);
    pool.Schedule([join, caller, task] {
      if (join->scheduling.load() && std::this_thread::get_id() == caller) {
        join->fallback.emplace_back(task);
      } else {
        task();
      }
    });
    join->scheduling.store(false);
  }
  constexpr auto kJoinWait = std::chrono::milliseconds(20);
  const auto deadline = std::chrono::steady_clock::now() + kJoinWait;
  SpinThenYield([&] {
    return join->joined.load(std::memory_order_acquire) == threads - 1 ||
           std::chrono::steady_clock::now() >= deadline;
  });
  int k = join->joined.load(std::memory_order_acquire);
  while (!join->joined.compare_exchange_weak(k, -1 - k, std::memory_order_acq_rel)) {
  }
  SpinBarrier barrier(1 + k);
  join->barrier = &barrier;
  join->cpus = DistinctCpus(1 + k);
  join->n.store(1 + k, std::memory_order_release);
  {
    PinnedTo pin(join->cpus[0]);
    // Until every helper is on its own CPU: a helper still waiting on the caller's CPU for `n`
    // would otherwise wait there until the caller's time slice ends, where a loop without a
    // barrier never yields (`Part`; 2.5 ms of a 2.6 ms LSTM-medium backward loop in a third of
    // the calls).
    SpinThenYield([&] { return join->pinned.load(std::memory_order_acquire) == k; });
    body(0, 1 + k, barrier);
    Fence();
  }
  while (join->done.load(std::memory_order_acquire) != k) sched_yield();  // helpers finishing
  for (auto& t : join->fallback) t.join();
}

// The 16-lane unit chunks [begin, end) that thread p of `threads` owns.
inline void Share(int chunks, int threads, int p, int* begin, int* end) {
  *begin = chunks * p / threads;
  *end = chunks * (p + 1) / threads;
}

// The part of every step that thread p of n computes: the 16-unit chunks [j0, j1) of the hidden
// units for the rows [b0, b1) of the batch. A loop splits its steps either by units (`by_rows`
// false: every thread needs all of h_{t-1}, so the threads meet at a barrier once per step) or by
// rows, in groups of 16 (the rows' sequences are independent: no barrier at all, each thread
// reads all the weights).
struct Part {
  int j0, j1, b0, b1;
};

inline Part PartOf(bool by_rows, int chunks, int B, int n, int p) {
  Part part{0, chunks, 0, B};
  if (!by_rows) {
    Share(chunks, n, p, &part.j0, &part.j1);
  } else {
    int g0, g1;
    Share((B + kLanes - 1) / kLanes, n, p, &g0, &g1);
    part.b0 = std::min(B, g0 * kLanes);
    part.b1 = std::min(B, g1 * kLanes);
  }
  return part;
}

// Whether a loop splits its steps by rows (`Part`): with two threads or more, at least 16 rows for
// each, and weights (packed, the bytes every thread reads at every step) that stay in a core's
// L2 beside the step's other data: up to 512 KB, or up to 1.5 MB where each thread has 32 rows
// or more to multiply them by. On the Intel Xeon of the ninth session, two one-thread processes
// of 16 rows each ran the LSTM medium backward loop (B = 32, H = 128) in 2.5-2.7 ms against 4.4-4.5
// for the loop split by units, its forward in 3.1-3.5 against 3.7-3.9; on the char-LM shapes
// (1.3 MB of forward weights, 16 rows each) the forward was slower split by rows (15.6-16.6
// against 14.5 ms), and on the large LSTM (5.2 MB, 32 rows each) too (187-205 against 155 ms);
// the large Elman cell's step (1.3 MB, 32 rows each) went 124-137 -> 115-119 ms
// (experiments/PERF_NOTES.md).
constexpr int64_t kByRowsMaxBytes = int64_t{512} << 10;
constexpr int64_t kByRowsMaxBytesWide = int64_t{1536} << 10;

inline bool ByRows(int threads, int64_t B, int64_t weight_floats) {
  if (threads < 2 || B < 2 * kLanes) return false;
  const int64_t bytes = weight_floats * 4;
  return bytes <= kByRowsMaxBytes || (B / threads >= 2 * kLanes && bytes <= kByRowsMaxBytesWide);
}

// Pack M [NB H, K] (NB gate blocks of H rows) as [H / 16][K][NB][16]: the NB x 16 weights one
// step of the tile GEMM reads are contiguous.
std::vector<float> Pack(const float* M, int NB, int64_t H, int64_t K) {
  std::vector<float> packed((size_t)NB * H * K);
  for (int64_t j = 0; j < H / kLanes; ++j)
    for (int64_t k = 0; k < K; ++k)
      for (int blk = 0; blk < NB; ++blk)
        for (int l = 0; l < kLanes; ++l)
          packed[((j * K + k) * NB + blk) * kLanes + l] = M[(blk * H + j * kLanes + l) * K + k];
  return packed;
}

// acc[r][Ts[b]] += src[r, k] w[k, b, :] for one k (`w` at its packed weights), for the rows r of
// the row-major `src` (stride K) and the packed blocks b: 16 units of each gate block, with the
// packed block b accumulating into accumulator Ts[b] (the GRU keeps `U x` and `W h` of its n block
// apart, so its two GEMMs map their three blocks to different accumulators).
template <int R, int T0, int T1, int T2, int T3>
inline void AccumulateOne(vf (&acc)[R][4], const float* src, int K, int k, const float* w) {
  constexpr int NB = T3 < 0 ? 3 : 4;
  vf w0 = load(w), w1 = load(w + kLanes), w2 = load(w + 2 * kLanes);
  vf w3 = NB == 4 ? load(w + 3 * kLanes) : vf{};
  // Keep the weight vectors in registers: left to itself GCC folds them into the FMAs as memory
  // operands, one load per row and block, and the tile ran at half the FMA rate.
#if defined(__x86_64__)
  __asm__("" : "+v"(w0), "+v"(w1), "+v"(w2), "+v"(w3));
#endif
  // Written out (not a loop over a table of targets): with the targets in an array GCC kept the
  // accumulators in memory, 2.3x slower.
  for (int r = 0; r < R; ++r) {
    vf v = splat(src[(size_t)r * K + k]);
    acc[r][T0] += v * w0;
    acc[r][T1] += v * w1;
    acc[r][T2] += v * w2;
    if constexpr (T3 >= 0) acc[r][T3] += v * w3;
  }
}

// How many steps of k (rows of the packed weights) ahead the tiles of 4 rows or more prefetch
// their weights into L1. A 16-unit chunk of the large LSTM's packed U and W (160 KB) does not stay
// in L1 between its row tiles, nor each thread's share of them (2.6 MB) in L2 between steps, and
// the hardware prefetchers left the forward tile waiting on its weight loads (its hottest
// instructions in `perf annotate`). The backward's tile keeps its K block in L1 and misses only in
// its first row tile. On the twelfth session's Intel Xeon, alternating fresh processes, rounds of
// 15-step medians: forward, LSTM large step 433-517 -> 393-412 ms (8 ahead 410-445, 16 ahead
// 397-422), GRU large 341-415 -> 326-385 (8 ahead); then the backward's, LSTM large backward loop
// alone 144-150 -> 141-154 ms, LSTM char-LM's 13.7-15.4 -> 12.8-14.8, GRU large step 325-352 ->
// 320-341 (experiments/PERF_NOTES.md).
constexpr int kPrefetchAhead = 12;

// The same summed over k < K: one tile of the step's GEMM. One row alone (B = 1) has only NB
// chains of K dependent FMAs, 4 cycles each, where two FMAs issue per cycle: there the odd k go to
// a second set of accumulators, added at the end (GRU small forward loop 5% faster).
template <int R, int T0, int T1, int T2, int T3 = -1>
inline void Accumulate(vf (&acc)[R][4], const float* src, int K, const float* w) {
  constexpr int NB = T3 < 0 ? 3 : 4;
  int k = 0;
  if constexpr (R == 1) {
    vf odd[1][4] = {};
    for (; k + 2 <= K; k += 2, w += 2 * NB * kLanes) {
      AccumulateOne<R, T0, T1, T2, T3>(acc, src, K, k, w);
      AccumulateOne<R, T0, T1, T2, T3>(odd, src, K, k + 1, w + NB * kLanes);
    }
    for (int b = 0; b < 4; ++b) acc[0][b] += odd[0][b];  // blocks not written are 0 in odd
  }
  for (; k < K; ++k, w += NB * kLanes) {
    // In the last kPrefetchAhead rows this runs past K, into the next chunk's rows (or past the
    // array), which the tile does not read next (it goes on to U, or to the next row tile's W):
    // those few lines are wasted, and the measurements behind kPrefetchAhead include them.
    if constexpr (R >= 4)
      for (int b = 0; b < NB; ++b) PrefetchL1(w, (kPrefetchAhead * NB + b) * kLanes);
    AccumulateOne<R, T0, T1, T2, T3>(acc, src, K, k, w);
  }
}

// Calls tile(std::integral_constant<int, R>{}, r) over the rows [b0, b1) of a step's GEMM: tiles of
// 6 rows, then of 4, 2 and 1 for the rest. The tiles keep R x 4 accumulators (24 of the 32 vector
// registers at R = 6); per weight vector loaded, R FMAs. On the Intel Xeon of the eighth session
// the 4-row tile ran at 128-140 GFLOP/s per core and the 6-row one at 164-170 (a one-core C++
// driver over the LSTM char-LM and large shapes, experiments/PERF_NOTES.md).
template <typename F>
inline void RowTiles(int b0, int b1, F tile) {
  int r = b0;
  for (; r + 6 <= b1; r += 6) tile(std::integral_constant<int, 6>{}, r);
  if (r + 4 <= b1) tile(std::integral_constant<int, 4>{}, r), r += 4;
  if (r + 2 <= b1) tile(std::integral_constant<int, 2>{}, r), r += 2;
  if (r < b1) tile(std::integral_constant<int, 1>{}, r);
}

// W [G, H] repacked chunk-major for the backward's GEMM, Wc[j][g][16] = W[g][16 j + l]: each
// 16-unit chunk's column strip contiguous (read in place, with a stride of H, the GEMM ran at
// 221-229 GFLOP/s on the char-LM and large LSTM; packed, 280-315).
std::vector<float> PackColumns(const float* W, int64_t G, int64_t H) {
  std::vector<float> packed((size_t)G * H);
  for (int64_t j = 0; j < H / kLanes; ++j)
    for (int64_t g = 0; g < G; ++g)
      for (int l = 0; l < kLanes; ++l) packed[(j * G + g) * kLanes + l] = W[g * H + j * kLanes + l];
  return packed;
}

// The backward loops' recurrent GEMM, rows [g0, g1) of its K = G: dh[r0:r0+R, 16 j : 16 (j + NV)]
// (+)= d_rec[r0:r0+R, g0:g1] W[g0:g1, those units], with `d_rec` row-major [B, G] (row stride
// ld >= G) and W packed by `PackColumns`. Overwrites dh, or with `add` adds to it (what the gate
// phase left there: the GRU's dh z term; or an earlier block of K).
template <int R, int NV>
inline void BwdTile(const float* d_rec, int ld, int G, const float* Wc, int H, float* dh, int r0,
                    int j, int g0, int g1, bool add) {
  const float* w = Wc + ((size_t)j * G + g0) * kLanes;
  d_rec += (size_t)r0 * ld;
  vf acc[R][NV] = {};
  int g = g0;
  if constexpr (R == 1) {  // NV chains only: four sets of accumulators over g mod 4 (as Accumulate)
    vf part[4][NV] = {};
    for (; g + 4 <= g1; g += 4, w += 4 * kLanes)
      for (int s = 0; s < 4; ++s) {
        vf d = splat(d_rec[g + s]);
        for (int v = 0; v < NV; ++v) part[s][v] += d * load(w + ((size_t)v * G + s) * kLanes);
      }
    for (int v = 0; v < NV; ++v) acc[0][v] = (part[0][v] + part[1][v]) + (part[2][v] + part[3][v]);
  }
  for (; g < g1; ++g, w += kLanes) {
    if constexpr (R >= 4)  // past g1: the next K block's (or column group's) first rows
      for (int v = 0; v < NV; ++v) PrefetchL1(w, ((size_t)v * G + kPrefetchAhead) * kLanes);
    vf wv[NV];
    for (int v = 0; v < NV; ++v) {
      wv[v] = load(w + (size_t)v * G * kLanes);
#if defined(__x86_64__)
      __asm__("" : "+v"(wv[v]));
#endif
    }
    for (int r = 0; r < R; ++r) {
      vf d = splat(d_rec[(size_t)r * ld + g]);
      for (int v = 0; v < NV; ++v) acc[r][v] += d * wv[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      float* out = dh + (size_t)(r0 + r) * H + (j + v) * kLanes;
      store(out, add ? load(out) + acc[r][v] : acc[r][v]);
    }
  }
}

// Rows of W per pass of the backward GEMM over its row tiles: a 64-unit group's block of the
// packed W (32 KB) stays in L1 while every row tile reads it, where the whole strip (128 KB for
// the LSTM medium, 512 KB large) came from L2 for each row tile again; the partial sums go through
// dh. In a one-core driver on the eighth session's Intel Xeon: 142 -> 167 (medium), 145 -> 153
// (char-LM), 132 -> 146 GFLOP/s (large) against unblocked; blocks of 64 and 256 measured less.
constexpr int kBwdBlockK = 128;

// One thread's part of the recurrent GEMM, units [16 j0, 16 j1) of the rows [b0, b1) (`Part`), in
// RowTiles x 64-unit tiles: column groups outer, then blocks of kBwdBlockK rows of W, rows of dh
// inner. After each block, between(s, S) for the blocks s = 0 .. S - 1.
template <bool kAdd, typename Between>
void BwdGemm(const float* d_rec, int ld, int G, const float* W, int H, float* dh,
             const Part& part, Between between) {
  const int j0 = part.j0, j1 = part.j1;
  const int kblocks = (G + kBwdBlockK - 1) / kBwdBlockK, S = (j1 - j0 + 3) / 4 * kblocks;
  for (int j = j0, s = 0; j < j1; j += 4) {
    const int nv = std::min(4, j1 - j);
    for (int g0 = 0; g0 < G; g0 += kBwdBlockK, ++s) {
      const int g1 = std::min(G, g0 + kBwdBlockK);
      const bool add = kAdd || g0 > 0;
      RowTiles(part.b0, part.b1, [&](auto rows, int r) {
        constexpr int R = decltype(rows)::value;
        if (nv == 4) BwdTile<R, 4>(d_rec, ld, G, W, H, dh, r, j, g0, g1, add);
        else
          for (int q = 0; q < nv; ++q)
            BwdTile<R, 1>(d_rec, ld, G, W, H, dh, r, j + q, g0, g1, add);
      });
      between(s, S);
    }
  }
}

template <bool kAdd>
void BwdGemm(const float* d_rec, int ld, int G, const float* W, int H, float* dh,
             const Part& part) {
  BwdGemm<kAdd>(d_rec, ld, G, W, H, dh, part, [](int, int) {});
}

// One stage of a 16 x 16 transpose in registers: rows i and i + D (bit D of i clear) exchange
// their lanes whose index has bit D set, i.e. bit D of the row index swaps with bit D of the lane
// index (two-source shuffles, vpermt2ps with AVX-512).
template <int D>
inline void TransposeStage(vf (&m)[16]) {
  for (int i = 0; i < 16; ++i) {
    if (i & D) continue;
    const vf a = m[i], b = m[i + D];
    if constexpr (D == 1) {
      m[i] = __builtin_shufflevector(a, b, 0, 16, 2, 18, 4, 20, 6, 22,
                                           8, 24, 10, 26, 12, 28, 14, 30);
      m[i + D] = __builtin_shufflevector(a, b, 1, 17, 3, 19, 5, 21, 7, 23,
                                               9, 25, 11, 27, 13, 29, 15, 31);
    } else if constexpr (D == 2) {
      m[i] = __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21,
                                           8, 9, 24, 25, 12, 13, 28, 29);
      m[i + D] = __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23,
                                               10, 11, 26, 27, 14, 15, 30, 31);
    } else if constexpr (D == 4) {
      m[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 16, 17, 18, 19,
                                           8, 9, 10, 11, 24, 25, 26, 27);
      m[i + D] = __builtin_shufflevector(a, b, 4, 5, 6, 7, 20, 21, 22, 23,
                                               12, 13, 14, 15, 28, 29, 30, 31);
    } else {
      m[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
      m[i + D] = __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15,
                                               24, 25, 26, 27, 28, 29, 30, 31);
    }
  }
}

// m[row][lane] -> m[lane][row].
inline void Transpose16(vf (&m)[16]) {
  TransposeStage<1>(m);
  TransposeStage<2>(m);
  TransposeStage<4>(m);
  TransposeStage<8>(m);
}

// The column sums of a backward's gradients over all steps, one set per group of 16 rows of the
// batch: `[ceil(B / 16)][G]` doubles, each group's added up by whichever thread has its rows and
// the groups added in order at the end, so that the result does not depend on how the threads
// split the steps (`Part`). Each step's 16 rows are summed in float, the steps in double.
struct Totals {
  double* data;
  size_t group_stride;  // G
  void Add(int b, int col, vf sum) const {  // rows of group b / 16, columns [col, col + 16)
    double* p = data + (size_t)(b / kLanes) * group_stride + col;
    vd acc;
    std::memcpy(&acc, p, sizeof(acc));
    acc += __builtin_convertvector(sum, vd);
    std::memcpy(p, &acc, sizeof(acc));
  }
};

// Adds the sums over the rows [b0, b1) (of one 16-row group) of the columns [g0, g0 + 16) of the
// row-major step block `rows` [B, ld] to the columns [out_g0, out_g0 + 16) of `total`.
inline void AddRowSums(const float* rows, int ld, int g0, int b0, int b1, int out_g0,
                       const Totals& total) {
  vf sum = {};
  for (int r = b0; r < b1; ++r) sum += load(rows + (size_t)r * ld + g0);
  total.Add(b0, out_g0, sum);
}

// Columns [g0, g0 + 16) of the steps whose gradients go to the columns [c0, c1) of the transposed
// output `d_t` [., T, B] (at most 16: column c is step c + 1's, rolled as in BackwardLoop), from
// the ring of 16 step blocks `ring` [16][B, ld] (step t's in slot t % 16), all B < 16 rows. For
// fewer than 16 rows StoreTransposed writes each step apart, a float or a few per unit, each unit
// on its own cache line (T B floats apart): 256 stores to 256 lines per GRU step at B = 1, a
// quarter of its backward loop. Here 16 steps of a unit are 16 B consecutive floats, written
// together, at B = 1 from a 16 x 16 transpose in registers.
inline void StoreSteps(const float* ring, int ld, int g0, int B, int T, int c0, int c1,
                       int out_g0, float* d_t) {
  const size_t slot = (size_t)B * ld;
  if (B == 1 && c1 - c0 == kLanes) {
    vf m[kLanes];
    for (int s = 0; s < kLanes; ++s)
      m[s] = load(ring + (size_t)((c0 + s + 1) % kLanes) * slot + g0);
    Transpose16(m);
    for (int l = 0; l < kLanes; ++l) store(d_t + (size_t)(out_g0 + l) * T + c0, m[l]);
    return;
  }
  for (int l = 0; l < kLanes; ++l) {
    float* dst = d_t + ((size_t)(out_g0 + l) * T + c0) * B;
    for (int c = c0; c < c1; ++c) {
      const float* src = ring + (size_t)((c + 1) % kLanes) * slot + g0 + l;
      for (int b = 0; b < B; ++b) *dst++ = src[(size_t)b * ld];
    }
  }
}

// Columns [g0, g0 + 16) of the rows [b0, b1) of the row-major step block `rows` [B, ld] into the
// transposed output `d_t` [., T, B] at step t. XLA transposed the row-major per-step gradients
// twice after the loop (for dW and for dU: 5.8 ms of a 48 ms LSTM char-LM step); this is one pass
// over L1 here. With `total`, the columns' sums over the rows are added to its columns
// [out_g0, out_g0 + 16).
template <bool kStream = false>
inline void StoreTransposed(const float* rows, int ld, int g0, int b0, int b1, int B, int T,
                            int t, int out_g0, float* d_t, const Totals* total = nullptr) {
  const size_t stride = (size_t)T * B;
  float* dst = d_t + ((size_t)out_g0 * T + t) * B;
  int b = b0;
  for (; b + kLanes <= b1; b += kLanes) {  // 16 x 16 blocks in registers
    vf m[kLanes];
    for (int i = 0; i < kLanes; ++i) m[i] = load(rows + (size_t)(b + i) * ld + g0);
    if (total) {
      vf sum[2] = {};
      for (int i = 0; i < kLanes; ++i) sum[i & 1] += m[i];
      total->Add(b, out_g0, sum[0] + sum[1]);
    }
    Transpose16(m);
    for (int l = 0; l < kLanes; ++l) {
      if constexpr (kStream) stream(dst + l * stride + b, m[l]);
      else store(dst + l * stride + b, m[l]);
    }
  }
  if (b == b1) return;
  if (total) AddRowSums(rows, ld, g0, b, b1, out_g0, *total);
  for (int l = 0; l < kLanes; ++l) {
    float* dst = d_t + ((size_t)(out_g0 + l) * T + t) * B;
    for (int r = b; r < b1; ++r) dst[r] = rows[(size_t)r * ld + g0 + l];
  }
}

// The forward's residuals are kept gate-major, one [H, T, B] array per block (element (g, t, b) at
// (g T + t) B + b), the layout of the backward's transposed output, which XLA places in the same
// buffers (`input_output_aliases`): the backward reads step t's residuals of its units, then
// writes gradients over them (step t + 1's: rolled, see BackwardLoop), so a training step holds
// one such set instead of two (GRU large 317 -> 244 ms, its page faults 91k -> 39k per step).
// Below 16 batch rows a gate-major row of one step is less than a cache line and the rows of a
// step lie T B floats apart (at B = 1 every unit in its own 4 KB page, all in one L1 set: the
// small LSTM's loops ran 1.5-2x slower), so there the residuals stay row-major, [T, B, H] per
// block, and are not aliased.
//
// One 16-unit-wide residual block of every step: gate-major from `base` (its first unit's row,
// `ld` = 0) or row-major (`base` its first column, rows `ld` floats apart).
struct Block {
  float* base;
  int ld;
};

// The blocks of an array (a "piece") of `nb` blocks of H units, gate-major [nb H, T, B] or
// row-major [T, B, nb H]. A cell's four residual (and gradient) blocks come as one or more pieces:
// one array where it fits XLA's temporary heaps (`jaxrnn.kernels.pieces`), else one array per
// block, since XLA:CPU allocates each array on its own and glibc maps any block over 32 MB fresh,
// and faults it in page by page, at every step (the large LSTM's [4H, T, B] gates are 105 MB).
inline void Blocks(float* data, int nb, int64_t H, int64_t T, int64_t B, bool gate_major,
                   Block* out) {
  for (int k = 0; k < nb; ++k)
    out[k] = gate_major ? Block{data + k * H * T * B, 0} : Block{data + k * H, (int)(nb * H)};
}

// Units [g0, g0 + 16) of step t, rows [b0, b1), from a gate-major array into those rows of
// `tile` [B, 16].
inline void LoadGateMajor(const float* in, int T, int B, int t, int g0, int b0, int b1,
                          float* tile) {
  const float* src = in + ((size_t)g0 * T + t) * B;
  const size_t stride = (size_t)T * B;
  int b = b0;
  for (; b + kLanes <= b1; b += kLanes) {  // 16 x 16 blocks in registers
    vf m[kLanes];
    for (int l = 0; l < kLanes; ++l) m[l] = load(src + l * stride + b);
    Transpose16(m);
    for (int i = 0; i < kLanes; ++i) store(tile + (size_t)(b + i) * kLanes, m[i]);
  }
  for (int l = 0; l < kLanes; ++l, src += stride)
    for (int r = b; r < b1; ++r) tile[(size_t)r * kLanes + l] = src[r];
}

// Units [u, u + 16) of block k at step t, rows [b0, b1) of B, as rows `stride` floats apart from
// `p` (indexed by the row): read in place where row-major, else transposed into `tile` [B, 16]
// first (GetBlock). And from `stage` [B, 16] into block k (PutBlock).
struct Rows {
  const float* p;
  size_t stride;
  vf operator[](int b) const { return load(p + b * stride); }
};

inline Rows GetBlock(const Block& k, int T, int B, int t, int u, int b0, int b1, float* tile) {
  if (k.ld != 0) return {k.base + (size_t)t * B * k.ld + u, (size_t)k.ld};
  LoadGateMajor(k.base, T, B, t, u, b0, b1, tile);
  return {tile, kLanes};
}

inline void PutBlock(const Block& k, const float* stage, int T, int B, int t, int u, int b0,
                     int b1, bool streaming) {
  if (k.ld == 0)
    return streaming ? StoreTransposed<true>(stage, kLanes, 0, b0, b1, B, T, t, u, k.base)
                     : StoreTransposed<false>(stage, kLanes, 0, b0, b1, B, T, t, u, k.base);
  for (int b = b0; b < b1; ++b)
    store(k.base + ((size_t)t * B + b) * k.ld + u, load(stage + (size_t)b * kLanes));
}

// Whether the forward writes its gate-major residuals with non-temporal stores (`stream`): where
// all of them pass 32 MB (about where they come as one array per block, `jaxrnn.kernels.pieces`),
// they are read back only in the backward, long after, so a normal store's read-for-ownership of
// each fresh line is wasted, and the lines evict the weights from L2. On the eleventh session's
// Intel Xeon, whole training steps, alternating fresh processes, four pairs of 20-step medians:
// GRU large 369-377 -> 340-353 ms, LSTM large 463-477 -> 449-482. Not below: there the backward
// reads them while they are still in cache, and the eighth session's LSTM char-LM (17 MB) and
// medium steps measured no faster with every residual streamed (experiments/PERF_NOTES.md).
constexpr size_t kStreamMinBytes = size_t{32} << 20;

inline bool StreamResiduals(const Block& first, int nres, int T, int B, int H) {
  return nres > 0 && first.ld == 0 && sizeof(float) * nres * H * (size_t)T * B > kStreamMinBytes;
}

// The forward loop shared by the cells: for every step, each thread runs `tile(R, t, r0, j, stage)`
// over the 16-unit chunks j and the rows of its `Part` in RowTiles (split by rows where `ByRows`
// says so for the packed `weight_floats`, else by units, after a barrier: h_{t-1} complete); the
// tiles leave the chunk's `nres` residual blocks (4, or none for the Elman cell) in `stage`
// [4][B, 16] (the thread's own), which then go to the residual blocks `res`, gate-major ones in
// whole rows of B (written by each tile, a few rows at a time, 16 units 16 KB apart, the char-LM
// forward loop ran 1.7x slower).
template <typename Pool, typename Tile>
void ForwardLoop(Pool& pool, int T, int B, int H, int threads, int64_t weight_floats, int nres,
                 const Block (&res)[4], Tile tile) {
  const bool by_rows = ByRows(threads, B, weight_floats);
  const bool streaming = StreamResiduals(res[0], nres, T, B, H);
  Parallel(pool, threads, [&](int p, int n, SpinBarrier& barrier) {
    const Part part = PartOf(by_rows, H / kLanes, B, n, p);
    std::vector<float> stage(4 * (size_t)B * kLanes);
    for (int t = 0; t < T; ++t) {
      if (t > 0 && !by_rows) barrier.Wait();
      for (int j = part.j0; j < part.j1; ++j) {
        RowTiles(part.b0, part.b1, [&](auto rows, int r) { tile(rows, t, r, j, stage.data()); });
        for (int blk = 0; blk < nres; ++blk)
          PutBlock(res[blk], stage.data() + (size_t)blk * B * kLanes, T, B, t, j * kLanes,
                   part.b0, part.b1, streaming);
      }
    }
  });
}

// The readout `z_t = V h_t + c` fused into a backward loop: its `d_hs[t] = dL/dz_t V` added to
// `dh` (each thread its own units, after the step's recurrent GEMM, by the same GEMM) instead of
// read from a `[T, B, H]` array, which is then never written (26 MB per large step). `dz` null:
// none. `vc` is V [O, H] packed by PackColumns.
struct Readout {
  const float* dz = nullptr;  // [T, B, O]
  const float* vc = nullptr;
  int O = 0;
};

// The row-major `[T, B, H]` array a cell's gates read anew at each step besides the residuals, and
// the step it reads relative to the gates' step: the LSTM's `c_{t-1}` (`cs`, -1: `c_t` was step
// t + 1's `c_{t-1}`), the GRU's `h_{t-1}` (`hs`, -1), the Elman cell's `h_t` (`hs`, 0).
struct Ahead {
  const float* rows = nullptr;
  int shift = 0;
};

// The backward loop shared by the cells: for every step, from the last, each thread takes the
// 16-unit chunks of its `Part` in turn: reads the chunk's `nres` residual blocks `res` (GetBlock,
// into its own [4][B, 16] scratch `tile` where they are gate-major), computes their `nd` blocks of
// gate gradients for its rows [b0, b1) into the step's `[B, nd H]` block of `rows` (slot t % 2 of
// [2][B, nd H]; below 16 rows, t % 16 of [16][B, nd H]) (`gates(t, u, b0, b1, res, rows)`), and
// writes those columns transposed into the gradient blocks `d` (gate-major [H, T, B] each: where
// the residuals are gate-major too, the same buffers, over what was just read; below 16 rows
// every 16 steps, StoreSteps). Then (split by units, after a barrier: the block complete; by rows
// where `ByRows` says so for W and the readout's V) its part of `dh_{t-1}` += the block's first G
// columns times W. Two blocks or more in turn: a thread may start step t-1's gates while the
// other still reads step t's.
// The gradients are rolled by one step: step t's go to column t - 1 of `d` and step 0's to column
// T - 1, so that the weight gradients multiply `hs` as it is, where `h_{t-1}` is a shifted copy of
// it (26 MB per large step). Where the residuals are gate-major, `d` has their buffers, and column
// t - 1 still holds step t - 1's residuals: before writing over them each thread moves its units
// of them into its own `saved` [its chunks][nres][B, 16] (the tiles GetBlock makes), where step
// t - 1 reads them.
// With a readout `ro`, `dh` takes its `d_hs[t]` before step t's gates (which then read no d_hs).
// `sums` [nd H] receives each gradient row's sum over all steps and rows (the biases' gradients),
// added up as each step's block is transposed into `d` (StoreTransposed, from registers, into
// `Totals`): after the loop XLA's reduction read the whole gradient array again, on one thread
// while the other began the weights' GEMM, which then waited for it (the LSTM char-LM step: 0.3 ms
// of reduction and 1.2 ms of an idle core).
// Spread over its part of each step's GEMM (after each block of it), each thread prefetches what
// its units will read first at step t - 1: the rows of `ahead` and, gate-major, step t - 2's
// residuals (which step t - 1 moves into `saved`). Both lie strided in memory (a row of B per
// unit, T B floats apart; rows H floats apart), a pattern the hardware prefetchers do not follow:
// without this, the char-LM LSTM's loop waited on these loads for about a third of its gate
// phase. Issued all at once after each chunk's gates, the prefetches themselves stalled the gate
// phase (a fifth of its samples in the large LSTM's step, on the instructions after them).
template <bool kAdd, typename Pool, typename Gates>
void BackwardLoop(Pool& pool, int T, int B, int H, int G, const float* W, int nres,
                  const Block (&res)[4], int nd, const Block (&d)[4], float* dh,
                  float* sums, int threads, Gates gates, const Readout& ro, const Ahead& ahead) {
  const bool by_rows = ByRows(threads, B, (int64_t)(G + ro.O) * H);
  const int ld = nd * H;
  const bool ring = B < kLanes;
  const int slots = ring ? kLanes : 2;
  std::vector<float> step_blocks((size_t)slots * B * ld);
  float* const rows = step_blocks.data();
  const bool major = nres > 0 && res[0].ld == 0;
  const size_t tile_floats = (size_t)B * kLanes;
  const int groups = (B + kLanes - 1) / kLanes;
  std::vector<double> totals((size_t)groups * ld);
  Parallel(pool, threads, [&](int p, int n, SpinBarrier& barrier) {
    const Part part = PartOf(by_rows, H / kLanes, B, n, p);
    const int j0 = part.j0, j1 = part.j1, b0 = part.b0, b1 = part.b1;
    std::vector<float> tile(4 * tile_floats);
    std::vector<float> saved(major ? (size_t)(j1 - j0) * nres * tile_floats : 0);
    if (ro.dz)  // d_hs[T - 1] of the readout, before the first step's gates
      BwdGemm<true>(ro.dz + (size_t)(T - 1) * B * ro.O, ro.O, ro.O, ro.vc, H, dh, part);
    for (int t = T - 1; t >= 0; --t) {
      float* block = rows + (size_t)(t % slots) * B * ld;
      for (int u = j0 * kLanes; u < j1 * kLanes; u += kLanes) {
        float* sv = major ? saved.data() + (size_t)(u / kLanes - j0) * nres * tile_floats : nullptr;
        Rows in[4];
        for (int blk = 0; blk < nres; ++blk)
          in[blk] = major && t < T - 1
                        ? Rows{sv + blk * tile_floats, (size_t)kLanes}
                        : GetBlock(res[blk], T, B, t, u, b0, b1, tile.data() + blk * tile_floats);
        gates(t, u, b0, b1, in, block);
        if (major && t > 0)
          for (int blk = 0; blk < nres; ++blk)
            LoadGateMajor(res[blk].base, T, B, t - 1, u, b0, b1, sv + blk * tile_floats);
        for (int blk = 0; blk < nd; ++blk) {
          const Totals total{totals.data() + (size_t)blk * H, (size_t)ld};
          if (!ring || t == 0) {
            StoreTransposed(block, ld, blk * H + u, b0, b1, B, T, (t + T - 1) % T, u, d[blk].base,
                            &total);
            continue;
          }
          AddRowSums(block, ld, blk * H + u, b0, b1, u, total);
          if (const int c = t - 1; c % kLanes == 0)
            StoreSteps(rows, ld, blk * H + u, B, T, c, std::min(c + kLanes, T - 1), u, d[blk].base);
        }
      }
      if (!by_rows) barrier.Wait();
      // What step t - 1 reads first, a share after each block of the GEMM: the lines of item i,
      // the thread's chunk i / per_chunk and residual block i % per_chunk.
      const int ta = t - 1 + ahead.shift, per_chunk = major ? nres : 1;
      const int items = (j1 - j0) * per_chunk;
      auto prefetch = [&](int s, int S) {
        for (int i = items * s / S; i < items * (s + 1) / S; ++i) {
          const int u = (j0 + i / per_chunk) * kLanes, blk = i % per_chunk;
          if (blk == 0 && ahead.rows && t > 0 && ta >= 0)
            for (int b = b0; b < b1; ++b) PrefetchL2(ahead.rows + ((size_t)ta * B + b) * H + u);
          if (major && t > 1)
            for (int l = 0; l < kLanes; ++l)
              for (int b = b0; b < b1; b += kLanes)
                PrefetchL2(res[blk].base + ((size_t)(u + l) * T + t - 2) * B + b);
        }
      };
      BwdGemm<kAdd>(block, ld, G, W, H, dh, part, prefetch);
      if (ro.dz && t > 0)
        BwdGemm<true>(ro.dz + (size_t)(t - 1) * B * ro.O, ro.O, ro.O, ro.vc, H, dh, part);
    }
  });
  for (int c = 0; c < ld; ++c) {
    double sum = 0;
    for (int g = 0; g < groups; ++g) sum += totals[(size_t)g * ld + c];
    sums[c] = (float)sum;
  }
}

// ---------------------------------------------------------------------------------------------
// LSTM

struct LstmFwd {
  int T, B, D, H;
  const float* xs;    // [T, B, D]
  const float* bias;  // [4H], b + bh
  const float* wp;    // Pack(W, 4, H, H)
  const float* up;    // Pack(U, 4, H, D)
  const float* h0;    // [B, H]
  const float* c0;    // [B, H]
  float* hs;          // [T, B, H]
  float* cs;          // [T, B, H]
};

// Rows [r0, r0 + R) of step t, units [16 j, 16 j + 16): the GEMM tile, then gates and states.
template <int R>
inline void LstmFwdTile(const LstmFwd& x, int t, int r0, int j, float* stage) {
  const int H = x.H, u = j * kLanes;
  const float* hprev = t == 0 ? x.h0 : x.hs + (size_t)(t - 1) * x.B * H;
  const float* cprev = t == 0 ? x.c0 : x.cs + (size_t)(t - 1) * x.B * H;
  vf acc[R][4] = {};
  Accumulate<R, 0, 1, 2, 3>(acc, hprev + (size_t)r0 * H, H, x.wp + (size_t)j * H * 4 * kLanes);
  Accumulate<R, 0, 1, 2, 3>(acc, x.xs + ((size_t)t * x.B + r0) * x.D, x.D,
                            x.up + (size_t)j * x.D * 4 * kLanes);
  const size_t next = (size_t)x.B * kLanes;  // stage [4][B, 16]: this chunk's gates, step t
  for (int r = 0; r < R; ++r) {
    const size_t row = (size_t)t * x.B + r0 + r;
    vf z[4];
    for (int blk = 0; blk < 4; ++blk) z[blk] = acc[r][blk] + load(x.bias + blk * H + u);
    vf si = sigmoid(z[0]), sf = sigmoid(z[1]), sg = sigmoid(2.0f * z[2]), so = sigmoid(z[3]);
    float* st = stage + (size_t)(r0 + r) * kLanes;
    store(st, si), store(st + next, sf), store(st + 2 * next, sg), store(st + 3 * next, so);
    vf c = sf * load(cprev + (size_t)(r0 + r) * H + u) + si * (2.0f * sg - 1.0f);
    store(x.cs + row * H + u, c);
    store(x.hs + row * H + u, so * tanh_(c));
  }
}

struct LstmBwd {
  int B, H;
  const float* cs;    // [T, B, H]
  const float* c0;    // [B, H]
  const float* d_hs;  // [T, B, H], or null (a fused readout adds it to dh)
  float* dh;          // [B, H]: d_hT in, then (d_a_{t+1} W), finally dL/dh_0
  float* dc;          // [B, H]: d_cT in, carried, finally dL/dc_0
};

// Step t's gate gradients for units [u, u + 16), rows [b0, b1), from the gates s (i | f | g | o)
// into the step's block `rows` [B, 4H].
inline void LstmBwdGates(const LstmBwd& x, int t, int u, int b0, int b1, const Rows (&s)[4],
                         float* rows) {
  const int H = x.H, G = 4 * H, B = x.B;
  for (int b = b0; b < b1; ++b) {
    const size_t row = (size_t)t * B + b;
    float* d_a = rows + (size_t)b * G;
    const size_t i = (size_t)b * H + u;
    vf dh = load(x.dh + i);
    if (x.d_hs) dh += load(x.d_hs + row * H + u);
    vf c = load(x.cs + row * H + u);
    vf c_prev = t == 0 ? load(x.c0 + i) : load(x.cs + (row - B) * H + u);
    vf si = s[0][b], sf = s[1][b], sg = s[2][b], so = s[3][b];
    vf th = tanh_(c);
    vf dc = load(x.dc + i) + dh * so * (1.0f - th * th);
    store(d_a + u, dc * (2.0f * sg - 1.0f) * si * (1.0f - si));
    store(d_a + H + u, dc * c_prev * sf * (1.0f - sf));
    store(d_a + 2 * H + u, 4.0f * dc * si * sg * (1.0f - sg));
    store(d_a + 3 * H + u, dh * th * so * (1.0f - so));
    store(x.dc + i, dc * sf);
  }
}

// ---------------------------------------------------------------------------------------------
// GRU

struct GruFwd {
  int T, B, D, H;
  const float* xs;    // [T, B, D]
  const float* b;     // [3H]
  const float* bh;    // [3H]
  const float* wp;    // Pack(W, 3, H, H)
  const float* up;    // Pack(U, 3, H, D)
  const float* h0;    // [B, H]
  float* hs;          // [T, B, H]
};

// Accumulators: 0 = r (U x + W h), 1 = z (U x + W h), 2 = U_n x, 3 = W_n h.
template <int R>
inline void GruFwdTile(const GruFwd& x, int t, int r0, int j, float* stage) {
  const int H = x.H, u = j * kLanes;
  const float* hprev = t == 0 ? x.h0 : x.hs + (size_t)(t - 1) * x.B * H;
  vf acc[R][4] = {};
  Accumulate<R, 0, 1, 3>(acc, hprev + (size_t)r0 * H, H, x.wp + (size_t)j * H * 3 * kLanes);
  Accumulate<R, 0, 1, 2>(acc, x.xs + ((size_t)t * x.B + r0) * x.D, x.D,
                         x.up + (size_t)j * x.D * 3 * kLanes);
  const size_t next = (size_t)x.B * kLanes;  // stage [4][B, 16]: this chunk's residuals, step t
  for (int r = 0; r < R; ++r) {
    const size_t row = (size_t)t * x.B + r0 + r;
    vf rg = sigmoid(acc[r][0] + load(x.b + u) + load(x.bh + u));
    vf zg = sigmoid(acc[r][1] + load(x.b + H + u) + load(x.bh + H + u));
    vf rec_n = acc[r][3] + load(x.bh + 2 * H + u);
    vf n = tanh_(acc[r][2] + load(x.b + 2 * H + u) + rg * rec_n);
    vf h = (1.0f - zg) * n + zg * load(hprev + (size_t)(r0 + r) * H + u);
    float* st = stage + (size_t)(r0 + r) * kLanes;
    store(st, rg), store(st + next, zg), store(st + 2 * next, n), store(st + 3 * next, rec_n);
    store(x.hs + row * H + u, h);
  }
}

struct GruBwd {
  int B, H;
  const float* hs;    // [T, B, H]
  const float* h0;    // [B, H]
  const float* d_hs;  // [T, B, H], or null (a fused readout adds it to dh)
  float* dh;          // [B, H]: d_hT in, then dh z + (d_rec W), finally dL/dh_0
};

// Step t's gradients for units [u, u + 16), rows [b0, b1), from the residuals r | z | n | rec_n
// into the step's block `rows` [B, 4H] = d_r | d_z | d_n r | d_n (d_rec_t: the first 3H).
inline void GruBwdGates(const GruBwd& x, int t, int u, int b0, int b1, const Rows (&res)[4],
                        float* rows) {
  const int H = x.H, B = x.B, ld = 4 * H;
  for (int b = b0; b < b1; ++b) {
    const size_t row = (size_t)t * B + b;
    float* d_rec = rows + (size_t)b * ld;
    const size_t i = (size_t)b * H + u;
    vf dh = load(x.dh + i);
    if (x.d_hs) dh += load(x.d_hs + row * H + u);
    vf h_prev = t == 0 ? load(x.h0 + i) : load(x.hs + (row - B) * H + u);
    vf rg = res[0][b], zg = res[1][b], n = res[2][b], rec_n = res[3][b];
    vf d_n = dh * (1.0f - zg) * (1.0f - n * n);
    store(d_rec + u, d_n * rec_n * rg * (1.0f - rg));
    store(d_rec + H + u, dh * (h_prev - n) * zg * (1.0f - zg));
    store(d_rec + 2 * H + u, d_n * rg);
    store(d_rec + 3 * H + u, d_n);
    store(x.dh + i, dh * zg);  // the GEMM adds d_rec W to it
  }
}

// ---------------------------------------------------------------------------------------------
// Elman

// The hidden activation f and its derivative written from its output h (jaxrnn.activations).
enum Activation : int64_t { kTanh = 0, kSigmoid = 1, kRelu = 2 };

template <int64_t kAct>
inline vf Activate(vf z) {
  if constexpr (kAct == kTanh) return tanh_(z);
  else if constexpr (kAct == kSigmoid) return sigmoid(z);
  else return z > 0.0f ? z : splat(0.0f);
}

template <int64_t kAct>
inline vf GradFromOutput(vf h) {
  if constexpr (kAct == kTanh) return 1.0f - h * h;
  else if constexpr (kAct == kSigmoid) return h * (1.0f - h);
  else return h > 0.0f ? splat(1.0f) : splat(0.0f);
}

// The Elman cell has one gate block, so its tile takes 16 units from each quarter of the hidden
// units instead: `W` and `U` packed as four blocks of H/4 rows (Pack(W, 4, H/4, K)), the same
// R-row (RowTiles) x 64-unit register tile as the LSTM's, chunk j holding units q H/4 + 16 j + l
// for quarter q (H a multiple of 64). A single 16-unit block per tile would load one weight vector
// per R FMAs instead of per 4 R.
struct ElmanFwd {
  int T, B, D, H;
  const float* xs;    // [T, B, D]
  const float* bias;  // [H], b (+ bh)
  const float* wp;    // Pack(W, 4, H / 4, H)
  const float* up;    // Pack(U, 4, H / 4, D)
  const float* h0;    // [B, H]
  float* hs;          // [T, B, H]
};

template <int R, int64_t kAct>
inline void ElmanFwdTile(const ElmanFwd& x, int t, int r0, int j) {
  const int H = x.H, quarter = H / 4;
  const float* hprev = t == 0 ? x.h0 : x.hs + (size_t)(t - 1) * x.B * H;
  vf acc[R][4] = {};
  Accumulate<R, 0, 1, 2, 3>(acc, hprev + (size_t)r0 * H, H, x.wp + (size_t)j * H * 4 * kLanes);
  Accumulate<R, 0, 1, 2, 3>(acc, x.xs + ((size_t)t * x.B + r0) * x.D, x.D,
                            x.up + (size_t)j * x.D * 4 * kLanes);
  for (int r = 0; r < R; ++r) {
    float* h = x.hs + ((size_t)t * x.B + r0 + r) * H;
    for (int q = 0; q < 4; ++q) {
      const int u = q * quarter + j * kLanes;
      store(h + u, Activate<kAct>(acc[r][q] + load(x.bias + u)));
    }
  }
}

struct ElmanBwd {
  int B, H;
  const float* hs;    // [T, B, H]
  const float* d_hs;  // [T, B, H], or null (a fused readout adds it to dh)
  float* dh;          // [B, H]: d_hT in, then delta_{t+1} W, finally dL/dh_0
};

// Step t's delta = (d_hs[t] + dh) f'(h_t) for units [u, u + 16), rows [b0, b1), into the step's
// block `rows` [B, H].
template <int64_t kAct>
inline void ElmanBwdGates(const ElmanBwd& x, int t, int u, int b0, int b1, float* rows) {
  const int H = x.H, B = x.B;
  for (int b = b0; b < b1; ++b) {
    const size_t row = (size_t)t * B + b;
    vf dh = load(x.dh + (size_t)b * H + u);
    if (x.d_hs) dh += load(x.d_hs + row * H + u);
    store(rows + (size_t)b * H + u, dh * GradFromOutput<kAct>(load(x.hs + row * H + u)));
  }
}

// ---------------------------------------------------------------------------------------------
// The FFI handlers

// Ask for transparent huge pages on the 2 MB-aligned part of an output buffer of at most 32 MB,
// before the loop first writes it. XLA:CPU allocates a step's temporaries as one block, which
// glibc maps fresh on every step once it passes 32 MB (the LSTM char-LM step's is 50 MB), so
// every 4 KB page of the outputs faults again each step: 8 ms of that step's 16.6 ms forward
// loop, 46.5 -> 35.0 ms for the step with the advice (THP in "madvise" mode, the common default;
// elsewhere a no-op). Not above 32 MB: with THP's synchronous defragmentation a fault may
// compact memory first, and on the large shapes (105 MB buffers), in a process holding many
// models, that stalled the loops (GRU large 290-300 -> 430-470 ms per step).
constexpr size_t kAdviseMaxBytes = size_t{32} << 20;

void AdviseHugePages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes > kAdviseMaxBytes) return;
  uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// Threads for one call: as asked, at most one per 16-unit chunk and one per pool worker + caller.
template <typename Pool>
int Threads(int64_t asked, const Pool& pool, int64_t H) {
  int64_t n = std::min<int64_t>(asked, H / kLanes);
  n = std::min<int64_t>(n, pool.num_threads() + 1);
  return (int)std::max<int64_t>(1, n);
}

// The shapes every handler checks (the Python wrappers check them first, with clearer messages):
// H a multiple of `units` (16 lanes; 64 for the Elman tile's four quarters).
ffi::Error CheckShapes(const char* cell, int64_t T, int64_t B, int64_t D, int64_t H, int64_t G,
                       int64_t blocks, int64_t units = kLanes) {
  if (H <= 0 || H % units != 0 || G != blocks * H || T < 1 || B < 1 || D < 1) {
    return ffi::Error::InvalidArgument(
        std::string("jaxrnn ") + cell + " kernel: expected H a positive multiple of " +
        std::to_string(units) + ", G = " + std::to_string(blocks) +
        " H, T, B, D >= 1; got T=" + std::to_string(T) + " B=" +
        std::to_string(B) + " D=" + std::to_string(D) + " H=" + std::to_string(H) + " G=" +
        std::to_string(G));
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

// The four blocks of the pieces `at(0) .. at(n - 1)` (each [nb H, T, B] gate-major or
// [T, B, nb H]; `dims(i)` its shape, `data(i)` its floats), checked to add up to four.
template <typename Dims, typename Data>
ffi::Error PieceBlocks(const char* cell, const char* name, size_t n, Dims dims, Data data,
                       int64_t T, int64_t B, int64_t H, bool gate_major, Block (&blocks)[4]) {
  int k = 0;
  for (size_t i = 0; i < n; ++i) {
    auto d = dims(i);
    const int64_t rows = d.size() == 3 ? d[gate_major ? 0 : 2] : 0;
    const int nb = rows % H == 0 ? (int)(rows / H) : 0;
    const bool ok = d.size() == 3 && nb >= 1 && k + nb <= 4 &&
                    d[gate_major ? 1 : 0] == T && d[gate_major ? 2 : 1] == B;
    if (!ok)
      return ffi::Error::InvalidArgument(
          std::string("jaxrnn ") + cell + " kernel: expected each " + name + " piece of shape " +
          (gate_major ? "[nb H, T, B]" : "[T, B, nb H]") + " with T=" + std::to_string(T) +
          " B=" + std::to_string(B) + " H=" + std::to_string(H) + ", 4 blocks in all");
    Blocks(data(i), nb, H, T, B, gate_major, blocks + k);
    k += nb;
  }
  if (k != 4)
    return ffi::Error::InvalidArgument(std::string("jaxrnn ") + cell + " kernel: expected " +
                                       name + " pieces of 4 blocks in all; got " +
                                       std::to_string(k));
  return ffi::Error::Success();
}

// From results (a forward's residuals, advised huge pages where all four together are at most
// 32 MB, as one output: see AdviseHugePages) or from arguments (a backward's residuals).
ffi::Error RetBlocks(const char* cell, const char* name, ffi::RemainingRets rets, int64_t T,
                     int64_t B, int64_t H, bool gate_major, Block (&blocks)[4],
                     bool advise = false) {
  std::vector<ffi::Result<F32>> out;
  for (size_t i = 0; i < rets.size(); ++i) {
    auto r = rets.get<F32>(i);
    if (!r.has_value()) return r.error();
    out.push_back(*r);
  }
  auto err = PieceBlocks(
      cell, name, out.size(), [&](size_t i) { return out[i]->dimensions(); },
      [&](size_t i) { return out[i]->typed_data(); }, T, B, H, gate_major, blocks);
  if (err.failure() || !advise || 4 * sizeof(float) * T * B * H > kAdviseMaxBytes) return err;
  for (auto& r : out) AdviseHugePages(r->typed_data(), sizeof(float) * r->element_count());
  return err;
}

ffi::Error ArgBlocks(const char* cell, const char* name, ffi::RemainingArgs args, int64_t T,
                     int64_t B, int64_t H, bool gate_major, Block (&blocks)[4]) {
  std::vector<F32> in;
  for (size_t i = 0; i < args.size(); ++i) {
    auto a = args.get<F32>(i);
    if (!a.has_value()) return a.error();
    in.push_back(*a);
  }
  return PieceBlocks(
      cell, name, in.size(), [&](size_t i) { return in[i].dimensions(); },
      [&](size_t i) { return const_cast<float*>(in[i].typed_data()); }, T, B, H, gate_major,
      blocks);
}

// The output cotangent of a backward loop: `d_hs` [T, B, H], or, with the readout fused, `dz`
// [T, B, O] and `v` [O, H] (then `d_hs` may be empty: no other use of the states). Empty `dz`
// and `v` ([0]): no readout.
struct Cotangent {
  const float* d_hs = nullptr;  // null: none
  std::vector<float> vc;        // V packed by PackColumns
  Readout ro;
};

ffi::Error ReadCotangent(const char* cell, F32 d_hs, F32 dz, F32 v, int64_t T, int64_t B,
                         int64_t H, Cotangent* out) {
  const std::string what = std::string("jaxrnn ") + cell + " kernel: ";
  const bool fused = dz.element_count() != 0 || v.element_count() != 0;
  const size_t states = (size_t)(T * B * H);
  if (d_hs.element_count() != states && !(fused && d_hs.element_count() == 0))
    return ffi::Error::InvalidArgument(what + "expected d_hs of T B H = " +
                                       std::to_string(states) + " floats" +
                                       (fused ? " (or none, with the readout)" : ""));
  out->d_hs = d_hs.element_count() ? d_hs.typed_data() : nullptr;
  if (!fused) return ffi::Error::Success();
  auto zd = dz.dimensions(), vd = v.dimensions();
  if (zd.size() != 3 || zd[0] != T || zd[1] != B || vd.size() != 2 || vd[0] != zd[2] ||
      vd[1] != H || zd[2] < 1)
    return ffi::Error::InvalidArgument(what + "expected dz [T, B, O] and V [O, H] with T=" +
                                       std::to_string(T) + " B=" + std::to_string(B) + " H=" +
                                       std::to_string(H));
  out->vc = PackColumns(v.typed_data(), zd[2], H);
  out->ro = Readout{dz.typed_data(), out->vc.data(), (int)zd[2]};
  return ffi::Error::Success();
}

// A backward's `sums` result: one float per gradient row.
ffi::Error CheckSums(const char* cell, F32Out sums, int64_t rows) {
  if (sums->element_count() == rows) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("jaxrnn ") + cell + " kernel: expected sums of " +
                                     std::to_string(rows) + " floats; got " +
                                     std::to_string(sums->element_count()));
}

ffi::Error LstmForwardImpl(F32 xs, F32 u, F32 w, F32 bias, F32 h0, F32 c0, F32Out hs, F32Out cs,
                           ffi::RemainingRets s, int64_t threads, int64_t gate_major,
                           ffi::ThreadPool pool) {
  auto dims = xs.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("jaxrnn lstm kernel: xs must be 3-D");
  const int64_t T = dims[0], B = dims[1], D = dims[2], H = w.dimensions()[1];
  const int64_t G = w.dimensions()[0];
  if (auto err = CheckShapes("lstm", T, B, D, H, G, 4); err.failure()) return err;
  Block res[4];
  if (auto err = RetBlocks("lstm", "s", s, T, B, H, gate_major, res, /*advise=*/true);
      err.failure())
    return err;
  std::vector<float> wp = Pack(w.typed_data(), 4, H, H), up = Pack(u.typed_data(), 4, H, D);
  AdviseHugePages(hs->typed_data(), sizeof(float) * T * B * H);
  AdviseHugePages(cs->typed_data(), sizeof(float) * T * B * H);
  LstmFwd x{(int)T, (int)B, (int)D, (int)H, xs.typed_data(), bias.typed_data(), wp.data(),
            up.data(), h0.typed_data(), c0.typed_data(), hs->typed_data(), cs->typed_data()};
  ForwardLoop(pool, x.T, x.B, x.H, Threads(threads, pool, H), G * (H + D), 4, res,
              [&](auto rows, int t, int r, int j, float* st) {
                LstmFwdTile<decltype(rows)::value>(x, t, r, j, st);
              });
  return ffi::Error::Success();
}

ffi::Error LstmBackwardImpl(F32 w, F32 cs, F32 c0, F32 d_hs, F32 dh_T, F32 dc_T, F32 dz,
                            F32 v, ffi::RemainingArgs s, F32Out dh0, F32Out dc0, F32Out db,
                            ffi::RemainingRets d_a,
                            int64_t threads, int64_t gate_major, ffi::ThreadPool pool) {
  auto dims = cs.dimensions();  // [T, B, H]
  if (dims.size() != 3) return ffi::Error::InvalidArgument("jaxrnn lstm kernel: cs must be 3-D");
  const int64_t T = dims[0], B = dims[1], G = w.dimensions()[0], H = w.dimensions()[1];
  if (auto err = CheckShapes("lstm", T, B, 1, H, G, 4); err.failure()) return err;
  Block res[4], d[4];
  if (auto err = ArgBlocks("lstm", "s", s, T, B, H, gate_major, res); err.failure()) return err;
  if (auto err = RetBlocks("lstm", "d_a", d_a, T, B, H, /*gate_major=*/true, d); err.failure())
    return err;
  if (auto err = CheckSums("lstm", db, G); err.failure()) return err;
  std::memcpy(dh0->typed_data(), dh_T.typed_data(), sizeof(float) * B * H);
  std::memcpy(dc0->typed_data(), dc_T.typed_data(), sizeof(float) * B * H);
  Cotangent ct;
  if (auto err = ReadCotangent("lstm", d_hs, dz, v, T, B, H, &ct); err.failure()) return err;
  std::vector<float> wc = PackColumns(w.typed_data(), G, H);
  LstmBwd x{(int)B, (int)H, cs.typed_data(), c0.typed_data(), ct.d_hs, dh0->typed_data(),
            dc0->typed_data()};
  BackwardLoop<false>(pool, (int)T, (int)B, (int)H, (int)G, wc.data(), 4, res, 4,
                      d, x.dh, db->typed_data(), Threads(threads, pool, H),
                      [&](int t, int u, int b0, int b1, const Rows (&s)[4], float* rows) {
                        LstmBwdGates(x, t, u, b0, b1, s, rows);
                      },
                      ct.ro, Ahead{x.cs, -1});
  return ffi::Error::Success();
}

ffi::Error GruForwardImpl(F32 xs, F32 u, F32 w, F32 b, F32 bh, F32 h0, F32Out hs,
                          ffi::RemainingRets res, int64_t threads, int64_t gate_major,
                          ffi::ThreadPool pool) {
  auto dims = xs.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("jaxrnn gru kernel: xs must be 3-D");
  const int64_t T = dims[0], B = dims[1], D = dims[2], H = w.dimensions()[1];
  const int64_t G = w.dimensions()[0];
  if (auto err = CheckShapes("gru", T, B, D, H, G, 3); err.failure()) return err;
  Block blocks[4];
  if (auto err = RetBlocks("gru", "res", res, T, B, H, gate_major, blocks, /*advise=*/true);
      err.failure())
    return err;
  std::vector<float> wp = Pack(w.typed_data(), 3, H, H), up = Pack(u.typed_data(), 3, H, D);
  AdviseHugePages(hs->typed_data(), sizeof(float) * T * B * H);
  GruFwd x{(int)T, (int)B, (int)D, (int)H, xs.typed_data(), b.typed_data(), bh.typed_data(),
           wp.data(), up.data(), h0.typed_data(), hs->typed_data()};
  ForwardLoop(pool, x.T, x.B, x.H, Threads(threads, pool, H), G * (H + D), 4, blocks,
              [&](auto rows, int t, int r, int j, float* st) {
                GruFwdTile<decltype(rows)::value>(x, t, r, j, st);
              });
  return ffi::Error::Success();
}

ffi::Error GruBackwardImpl(F32 w, F32 hs, F32 h0, F32 d_hs, F32 dh_T, F32 dz, F32 v,
                           ffi::RemainingArgs res,
                           F32Out dh0, F32Out sums, ffi::RemainingRets d, int64_t threads,
                           int64_t gate_major,
                           ffi::ThreadPool pool) {
  auto dims = hs.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("jaxrnn gru kernel: hs must be 3-D");
  const int64_t T = dims[0], B = dims[1], H = dims[2], G = w.dimensions()[0];
  if (auto err = CheckShapes("gru", T, B, 1, H, G, 3); err.failure()) return err;
  Block in[4], out[4];
  if (auto err = ArgBlocks("gru", "res", res, T, B, H, gate_major, in); err.failure()) return err;
  if (auto err = RetBlocks("gru", "d", d, T, B, H, /*gate_major=*/true, out); err.failure())
    return err;
  if (auto err = CheckSums("gru", sums, 4 * H); err.failure()) return err;
  std::memcpy(dh0->typed_data(), dh_T.typed_data(), sizeof(float) * B * H);
  Cotangent ct;
  if (auto err = ReadCotangent("gru", d_hs, dz, v, T, B, H, &ct); err.failure()) return err;
  std::vector<float> wc = PackColumns(w.typed_data(), G, H);
  GruBwd x{(int)B, (int)H, hs.typed_data(), h0.typed_data(), ct.d_hs, dh0->typed_data()};
  BackwardLoop<true>(pool, (int)T, (int)B, (int)H, (int)G, wc.data(), 4, in, 4,
                     out, x.dh, sums->typed_data(), Threads(threads, pool, H),
                     [&](int t, int u, int b0, int b1, const Rows (&r)[4], float* rows) {
                       GruBwdGates(x, t, u, b0, b1, r, rows);
                     },
                     ct.ro, Ahead{x.hs, -1});
  return ffi::Error::Success();
}


// The Elman loops' shapes (`CheckShapes`, H a multiple of 64) and activation.
ffi::Error CheckElman(int64_t T, int64_t B, int64_t D, int64_t H, int64_t G, int64_t activation) {
  if (auto err = CheckShapes("elman", T, B, D, H, G, 1, 4 * kLanes); err.failure()) return err;
  if (activation == kTanh || activation == kSigmoid || activation == kRelu)
    return ffi::Error::Success();
  return ffi::Error::InvalidArgument("jaxrnn elman kernel: expected activation 0 (tanh), 1 "
                                     "(sigmoid) or 2 (relu); got " + std::to_string(activation));
}

// Calls f(std::integral_constant<int64_t, kAct>) for the activation (checked by CheckElman).
template <typename F>
void WithActivation(int64_t activation, F f) {
  if (activation == kTanh) f(std::integral_constant<int64_t, kTanh>());
  else if (activation == kSigmoid) f(std::integral_constant<int64_t, kSigmoid>());
  else f(std::integral_constant<int64_t, kRelu>());
}

ffi::Error ElmanForwardImpl(F32 xs, F32 u, F32 w, F32 bias, F32 h0, F32Out hs, int64_t threads,
                            int64_t activation, ffi::ThreadPool pool) {
  auto dims = xs.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("jaxrnn elman kernel: xs must be 3-D");
  const int64_t T = dims[0], B = dims[1], D = dims[2], H = w.dimensions()[1];
  if (auto err = CheckElman(T, B, D, H, w.dimensions()[0], activation); err.failure()) return err;
  std::vector<float> wp = Pack(w.typed_data(), 4, H / 4, H);
  std::vector<float> up = Pack(u.typed_data(), 4, H / 4, D);
  AdviseHugePages(hs->typed_data(), sizeof(float) * T * B * H);
  ElmanFwd x{(int)T, (int)B, (int)D, (int)H, xs.typed_data(), bias.typed_data(), wp.data(),
             up.data(), h0.typed_data(), hs->typed_data()};
  Block none[4] = {};
  WithActivation(activation, [&](auto act) {
    constexpr int64_t kAct = decltype(act)::value;
    ForwardLoop(pool, x.T, x.B, (int)H / 4, Threads(threads, pool, H / 4), H * (H + D), 0, none,
                [&](auto rows, int t, int r, int j, float*) {
                  ElmanFwdTile<decltype(rows)::value, kAct>(x, t, r, j);
                });
  });
  return ffi::Error::Success();
}

ffi::Error ElmanBackwardImpl(F32 w, F32 hs, F32 d_hs, F32 dh_T, F32 dz, F32 v, F32Out d_t,
                             F32Out dh0, F32Out db,
                             int64_t threads, int64_t activation, ffi::ThreadPool pool) {
  auto dims = hs.dimensions();  // [T, B, H]
  if (dims.size() != 3) return ffi::Error::InvalidArgument("jaxrnn elman kernel: hs must be 3-D");
  const int64_t T = dims[0], B = dims[1], H = dims[2];
  if (auto err = CheckElman(T, B, 1, H, w.dimensions()[0], activation); err.failure()) return err;
  if (auto err = CheckSums("elman", db, H); err.failure()) return err;
  Cotangent ct;
  if (auto err = ReadCotangent("elman", d_hs, dz, v, T, B, H, &ct); err.failure()) return err;
  std::memcpy(dh0->typed_data(), dh_T.typed_data(), sizeof(float) * B * H);
  std::vector<float> wc = PackColumns(w.typed_data(), H, H);
  ElmanBwd x{(int)B, (int)H, hs.typed_data(), ct.d_hs, dh0->typed_data()};
  Block none[4] = {}, d[4];
  Blocks(d_t->typed_data(), 1, H, T, B, /*gate_major=*/true, d);
  WithActivation(activation, [&](auto act) {
    constexpr int64_t kAct = decltype(act)::value;
    BackwardLoop<false>(pool, (int)T, (int)B, (int)H, (int)H, wc.data(), 0, none, 1, d,
                        x.dh, db->typed_data(), Threads(threads, pool, H),
                        [&](int t, int u, int b0, int b1, const Rows (&)[4], float* rows) {
                          ElmanBwdGates<kAct>(x, t, u, b0, b1, rows);
                        },
                        ct.ro, Ahead{x.hs, 0});
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnElmanForward, ElmanForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // xs [T, B, D]
                                  .Arg<F32>()  // U [H, D]
                                  .Arg<F32>()  // W [H, H]
                                  .Arg<F32>()  // bias [H] (b, + bh where the cell has it)
                                  .Arg<F32>()  // h0 [B, H]
                                  .Ret<F32>()  // hs [T, B, H]
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("activation")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnElmanBackward, ElmanBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // W [H, H]
                                  .Arg<F32>()  // hs [T, B, H]
                                  .Arg<F32>()  // d_hs [T, B, H] (or [0] with a readout)
                                  .Arg<F32>()  // dh_T [B, H]
                                  .Arg<F32>()  // dz [T, B, O] of a fused readout, or [0]
                                  .Arg<F32>()  // V [O, H] of a fused readout, or [0]
                                  .Ret<F32>()  // delta^T [H, T, B]
                                  .Ret<F32>()  // dh_0 [B, H]
                                  .Ret<F32>()  // sum of delta over T, B [H] (db)
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("activation")
                                  .Ctx<ffi::ThreadPool>());

// The LSTM's and the GRU's residual and gradient blocks come last, as one or more pieces
// (`jaxrnn.kernels.pieces`: [4H, T, B] for the LSTM and [3H | H, T, B] for the GRU, or one
// [H, T, B] array per block).
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnLstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // xs [T, B, D]
                                  .Arg<F32>()  // U [4H, D]
                                  .Arg<F32>()  // W [4H, H]
                                  .Arg<F32>()  // bias [4H] (b + bh)
                                  .Arg<F32>()  // h0 [B, H]
                                  .Arg<F32>()  // c0 [B, H]
                                  .Ret<F32>()  // hs [T, B, H]
                                  .Ret<F32>()  // cs [T, B, H]
                                  .RemainingRets()  // s = i | f | g | o, gate-major or not
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("gate_major")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnLstmBackward, LstmBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // W [4H, H]
                                  .Arg<F32>()  // cs [T, B, H]
                                  .Arg<F32>()  // c0 [B, H]
                                  .Arg<F32>()  // d_hs [T, B, H] (or [0] with a readout)
                                  .Arg<F32>()  // dh_T [B, H]
                                  .Arg<F32>()  // dc_T [B, H]
                                  .Arg<F32>()  // dz [T, B, O] of a fused readout, or [0]
                                  .Arg<F32>()  // V [O, H] of a fused readout, or [0]
                                  .RemainingArgs()  // s (aliased with d_a where gate-major)
                                  .Ret<F32>()  // dh_0 [B, H]
                                  .Ret<F32>()  // dc_0 [B, H]
                                  .Ret<F32>()  // sum of d_a over T, B [4H] (db)
                                  .RemainingRets()  // d_a^T = (dL/da)^T, gate-major, as s
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("gate_major")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnGruForward, GruForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // xs [T, B, D]
                                  .Arg<F32>()  // U [3H, D]
                                  .Arg<F32>()  // W [3H, H]
                                  .Arg<F32>()  // b [3H]
                                  .Arg<F32>()  // bh [3H]
                                  .Arg<F32>()  // h0 [B, H]
                                  .Ret<F32>()  // hs [T, B, H]
                                  .RemainingRets()  // r | z | n | rec_n, gate-major or not
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("gate_major")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnGruBackward, GruBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // W [3H, H]
                                  .Arg<F32>()  // hs [T, B, H]
                                  .Arg<F32>()  // h0 [B, H]
                                  .Arg<F32>()  // d_hs [T, B, H] (or [0] with a readout)
                                  .Arg<F32>()  // dh_T [B, H]
                                  .Arg<F32>()  // dz [T, B, O] of a fused readout, or [0]
                                  .Arg<F32>()  // V [O, H] of a fused readout, or [0]
                                  .RemainingArgs()  // r | z | n | rec_n (aliased with d)
                                  .Ret<F32>()  // dh_0 [B, H]
                                  .Ret<F32>()  // sums of d over T, B [4H]
                                  .RemainingRets()  // d = (d_r | d_z | d_n r | d_n)^T
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("gate_major")
                                  .Ctx<ffi::ThreadPool>());
