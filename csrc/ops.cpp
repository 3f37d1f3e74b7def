// The torch binding of unipruning._C: op schemas (torch.library, namespace `unipruning`), input
// checks with one-line messages, allocation, and the launches of the plain-CUDA code in pack24.cu
// and cslt_compress.cu. Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in
// cusparse.h), so this file also compiles against the CPU wheel's headers.

#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

int unipruning_pack24_cutlass(uint16_t* values, int16_t* meta, int* bad, const uint16_t* weight,
                              const uint8_t* keep, int64_t rows, int64_t cols, cudaStream_t stream);
#ifdef UNIPRUNING_WITH_CUSPARSELT
int unipruning_cslt_sizes(int64_t rows, int64_t cols, int dtype, size_t* compressed_bytes, size_t* buffer_bytes);
int unipruning_cslt_compress(void* compressed, void* buffer, const void* dense, int64_t rows, int64_t cols, int dtype,
                             cudaStream_t stream);
#endif

namespace {

// CUTLASS fp16/bf16 sparse GEMM limits: rows % 32, cols % 64 (PyTorch's semi-structured constraints)
void check_weight(const at::Tensor& weight, const char* op) {
  TORCH_CHECK(weight.is_cuda(), op, ": weight must be on a CUDA device, got ", weight.device());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D, got ", weight.dim(), "-D");
  TORCH_CHECK(weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16, op,
              ": weight must be float16 or bfloat16, got ", weight.scalar_type());
  TORCH_CHECK(weight.size(0) % 32 == 0 && weight.size(1) % 64 == 0, op, ": weight shape ", weight.sizes(),
              " must have rows % 32 == 0 and cols % 64 == 0");
}

std::tuple<at::Tensor, at::Tensor> pack24_cutlass(const at::Tensor& weight, const std::optional<at::Tensor>& mask) {
  check_weight(weight, "pack24_cutlass");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  at::Tensor keep;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "pack24_cutlass: mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK(mask->sizes() == weight.sizes(), "pack24_cutlass: mask shape ", mask->sizes(),
                " differs from the weight's ", weight.sizes());
    TORCH_CHECK(mask->device() == weight.device(), "pack24_cutlass: mask on ", mask->device(), ", weight on ",
                weight.device());
    keep = mask->contiguous();
  }
  const int64_t rows = w.size(0), cols = w.size(1);
  at::Tensor values = at::empty({rows, cols / 2}, w.options());
  at::Tensor meta = at::empty({rows, cols / 16}, w.options().dtype(at::kShort));
  at::Tensor bad = at::zeros({1}, w.options().dtype(at::kInt));
  const int err = unipruning_pack24_cutlass(
      reinterpret_cast<uint16_t*>(values.data_ptr()), meta.data_ptr<int16_t>(), bad.data_ptr<int>(),
      reinterpret_cast<const uint16_t*>(w.data_ptr()),
      keep.defined() ? reinterpret_cast<const uint8_t*>(keep.data_ptr()) : nullptr, rows, cols,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "pack24_cutlass: kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  TORCH_CHECK(bad.item<int>() == 0, "pack24_cutlass: ",
              keep.defined() ? "mask must keep exactly 2 of every 4 consecutive entries of a row"
                             : "weight is not 2:4 sparse (a group of 4 holds more than 2 non-zeros)");
  return {values, meta};
}

at::Tensor cslt_compress(const at::Tensor& dense) {
#ifdef UNIPRUNING_WITH_CUSPARSELT
  check_weight(dense, "cslt_compress");
  const c10::cuda::CUDAGuard guard(dense.device());
  const at::Tensor d = dense.contiguous();
  const int dtype = d.scalar_type() == at::kHalf ? 0 : 1;
  size_t compressed_bytes = 0, buffer_bytes = 0;
  int status = unipruning_cslt_sizes(d.size(0), d.size(1), dtype, &compressed_bytes, &buffer_bytes);
  TORCH_CHECK(status == 0, "cslt_compress: cuSPARSELt size query failed (status ", status, ")");
  // the size torch._cslt_compress allocates (9/16 of the dense elements), so the two are interchangeable
  const int64_t elements = d.numel() * 9 / 16;
  TORCH_CHECK(compressed_bytes <= static_cast<size_t>(elements) * 2, "cslt_compress: cuSPARSELt needs ",
              compressed_bytes, " bytes, more than the ", elements * 2, " of torch's layout");
  at::Tensor compressed = at::zeros({elements}, d.options());
  at::Tensor buffer = at::empty({static_cast<int64_t>(buffer_bytes)}, d.options().dtype(at::kByte));
  status = unipruning_cslt_compress(compressed.data_ptr(), buffer.data_ptr(), d.data_ptr(), d.size(0), d.size(1),
                                    dtype, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == 0, "cslt_compress: cuSPARSELt compress failed (status ", status, ")");
  return compressed;
#else
  TORCH_CHECK(false, "cslt_compress: unipruning._C was built without cuSPARSELt (UNIPRUNING_CUSPARSELT=0 or no "
              "cusparseLt.h): rebuild with it, or use torch._cslt_compress");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(unipruning, m) {
  m.def("pack24_cutlass(Tensor weight, Tensor? mask) -> (Tensor, Tensor)");
  m.def("cslt_compress(Tensor dense) -> Tensor");
}

TORCH_LIBRARY_IMPL(unipruning, CUDA, m) {
  m.impl("pack24_cutlass", &pack24_cutlass);
  m.impl("cslt_compress", &cslt_compress);
}

// `import unipruning._C` loads this library, which registers the ops above; the module holds one flag,
// with_cusparselt, so that pack_24 falls back to torch._cslt_compress where cslt_compress would refuse.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
#ifdef UNIPRUNING_WITH_CUSPARSELT
  const long with_cusparselt = 1;
#else
  const long with_cusparselt = 0;
#endif
  if (m != nullptr && PyModule_AddIntConstant(m, "with_cusparselt", with_cusparselt) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
