// 2:4 packing into the CUTLASS layout of PyTorch's semi-structured tensors, in one pass.
//
// Plain CUDA (no torch headers): the torch binding is ops.cpp. The maths is the torch twin's,
// unipruning/packing/formats.py (pack_cutlass_torch), which pins the format bit for bit.
//
// Weight (m, k) of 16-bit floats (fp16 or bf16: the kernel moves bit patterns and tests
// (bits & 0x7fff) != 0 for "non-zero", so one kernel serves both), row-major, m % 32 == 0,
// k % 64 == 0; optional keep mask (m, k) of bytes (a torch.bool tensor) with exactly two kept per
// group of 4. Outputs: values (m, k/2), the two kept entries of each group in index order; metadata
// (m, k/16) int16, the nibble i0 | i1 << 2 of 4 consecutive groups per element, stored in CUTLASS's
// interleaved order: element (r, c), r = 32g + 16a1 + 8a0 + b, c = 2h + e, lands at flat offset
// 2m*h + 64g + 8b + 4a1 + 2e + a0.
//
// One thread per metadata element, numbered in OUTPUT order, so metadata stores are coalesced; a
// warp then reads 16 rows x 64 contiguous bytes and writes 16 rows x 32 contiguous bytes of values:
// full 32-byte sectors everywhere.

#include <cuda_runtime.h>
#include <stdint.h>

namespace {

__host__ __device__ __forceinline__ bool nonzero16(uint16_t bits) { return (bits & 0x7fffu) != 0; }

// The work of one metadata element, numbered t in output order; returns true when its 16 entries
// break 2:4. Host and device: the host loop below lets CPU tests run this exact code.
__host__ __device__ __forceinline__ bool pack24_element(uint16_t* __restrict__ values, int16_t* __restrict__ meta,
                                                        const uint16_t* __restrict__ weight,
                                                        const uint8_t* __restrict__ keep, int64_t rows,
                                                        int64_t cols, int64_t t) {
  // decode the output position t = 2m*h + 64g + 8b + 4a1 + 2e + a0 into (row, meta column)
  const int64_t a0 = t & 1, e = (t >> 1) & 1, a1 = (t >> 2) & 1, b = (t >> 3) & 7;
  const int64_t rest = t >> 6;
  const int64_t bands = rows / 32;
  const int64_t g = rest % bands, h = rest / bands;
  const int64_t row = 32 * g + 16 * a1 + 8 * a0 + b;
  const int64_t col = 16 * (2 * h + e);  // first of the 16 weight columns this element describes

  const uint4* src = reinterpret_cast<const uint4*>(weight + row * cols + col);
  uint16_t w[16];
  *reinterpret_cast<uint4*>(w) = src[0];
  *reinterpret_cast<uint4*>(w + 8) = src[1];
  uint8_t k[16];
  if (keep != nullptr) *reinterpret_cast<uint4*>(k) = *reinterpret_cast<const uint4*>(keep + row * cols + col);

  uint16_t out[8];
  uint32_t nibbles = 0;
  bool invalid = false;
#pragma unroll
  for (int grp = 0; grp < 4; ++grp) {
    bool kept[4];
    int count = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      kept[j] = keep != nullptr ? (k[4 * grp + j] != 0) : nonzero16(w[4 * grp + j]);
      count += kept[j];
    }
    if (keep != nullptr ? count != 2 : count > 2) invalid = true;
    // fewer than two kept: fill with the (zero) entries at position 2, then 3
    if (count < 2 && !kept[2]) { kept[2] = true; ++count; }
    if (count < 2 && !kept[3]) { kept[3] = true; ++count; }
    int i0 = -1, i1 = -1;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (kept[j]) {
        if (i0 < 0) i0 = j;
        else if (i1 < 0) i1 = j;
      }
    }
    if (i1 < 0) { i0 = 2; i1 = 3; }  // only reachable on invalid input; keeps the output defined
    out[2 * grp] = w[4 * grp + i0];
    out[2 * grp + 1] = w[4 * grp + i1];
    nibbles |= static_cast<uint32_t>(i0 | (i1 << 2)) << (4 * grp);
  }
  *reinterpret_cast<uint4*>(values + row * (cols / 2) + col / 2) = *reinterpret_cast<const uint4*>(out);
  meta[t] = static_cast<int16_t>(static_cast<uint16_t>(nibbles));
  return invalid;
}

__global__ void pack24_cutlass_kernel(uint16_t* __restrict__ values, int16_t* __restrict__ meta,
                                      int* __restrict__ bad, const uint16_t* __restrict__ weight,
                                      const uint8_t* __restrict__ keep, int64_t rows, int64_t cols) {
  const int64_t total = rows * (cols / 16);
  bool invalid = false;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    invalid |= pack24_element(values, meta, weight, keep, rows, cols, t);
  }
  if (invalid) atomicOr(bad, 1);
}

}  // namespace

// Launches the packer on `stream`. Pointers must be 16-byte aligned (torch allocations and
// contiguous tensors with k % 64 == 0 are). `bad` (one device int, zeroed by the caller) becomes
// non-zero when a group breaks 2:4 (more than two non-zeros, or a mask not keeping exactly two).
// Returns the launch's cudaError_t.
int unipruning_pack24_cutlass(uint16_t* values, int16_t* meta, int* bad, const uint16_t* weight,
                              const uint8_t* keep, int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t total = rows * (cols / 16);
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t wanted = (total + threads - 1) / threads;
  const int blocks = static_cast<int>(wanted < 65535 * 8 ? wanted : 65535 * 8);  // grid-stride beyond
  pack24_cutlass_kernel<<<blocks, threads, 0, stream>>>(values, meta, bad, weight, keep, rows, cols);
  return static_cast<int>(cudaGetLastError());
}

// The same packing on the host, element by element (CPU tests of this file's logic; not a fast path).
// Returns 1 when a group breaks 2:4, else 0.
extern "C" int unipruning_pack24_cutlass_host(uint16_t* values, int16_t* meta, const uint16_t* weight,
                                              const uint8_t* keep, int64_t rows, int64_t cols) {
  bool invalid = false;
  for (int64_t t = 0; t < rows * (cols / 16); ++t) invalid |= pack24_element(values, meta, weight, keep, rows, cols, t);
  return invalid ? 1 : 0;
}
