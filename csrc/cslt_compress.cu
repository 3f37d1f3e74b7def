// cuSPARSELt packing through the library's own compress routine (its compressed layout is
// undocumented and changes between versions, so it is never re-implemented here).
//
// Plain CUDA host code (no torch headers); the torch binding is ops.cpp. The descriptor is the one
// torch._cslt_compress builds (row-major (rows, cols), leading dimension cols, 16-byte alignment,
// 50% structured sparsity), so the bytes match it, and torch's cuSPARSELt matmul reads the result.
// Built only when the cusparseLt.h header is found (setup.py: CUSPARSELT_HOME or the
// nvidia-cusparselt wheel that CUDA builds of torch install).

#include <cuda_runtime.h>
#include <cusparseLt.h>
#include <stdint.h>

namespace {

// one library handle per thread, initialised on first use (cuSPARSELt handles are not pooled by torch)
thread_local cusparseLtHandle_t handle;
thread_local bool handle_ready = false;

int ensure_handle() {
  if (!handle_ready) {
    const cusparseStatus_t status = cusparseLtInit(&handle);
    if (status != CUSPARSE_STATUS_SUCCESS) return static_cast<int>(status);
    handle_ready = true;
  }
  return 0;
}

// dtype: 0 = float16, 1 = bfloat16
int describe(cusparseLtMatDescriptor_t* descriptor, int64_t rows, int64_t cols, int dtype) {
  const cudaDataType type = dtype == 0 ? CUDA_R_16F : CUDA_R_16BF;
  return static_cast<int>(cusparseLtStructuredDescriptorInit(&handle, descriptor, rows, cols, cols, 16, type,
                                                             CUSPARSE_ORDER_ROW, CUSPARSELT_SPARSITY_50_PERCENT));
}

}  // namespace

// Bytes of the compressed output and of the scratch buffer for a (rows, cols) matrix. Returns a
// cusparseStatus_t (0 on success).
int unipruning_cslt_sizes(int64_t rows, int64_t cols, int dtype, size_t* compressed_bytes, size_t* buffer_bytes) {
  int status = ensure_handle();
  if (status != 0) return status;
  cusparseLtMatDescriptor_t descriptor;
  status = describe(&descriptor, rows, cols, dtype);
  if (status != 0) return status;
  status = static_cast<int>(cusparseLtSpMMACompressedSize2(&handle, &descriptor, compressed_bytes, buffer_bytes));
  cusparseLtMatDescriptorDestroy(&descriptor);
  return status;
}

// Compress the 2:4-sparse dense matrix `dense` (device memory) into `compressed` on `stream`, with
// `buffer` as scratch (sizes from unipruning_cslt_sizes). Returns a cusparseStatus_t.
int unipruning_cslt_compress(void* compressed, void* buffer, const void* dense, int64_t rows, int64_t cols, int dtype,
                             cudaStream_t stream) {
  int status = ensure_handle();
  if (status != 0) return status;
  cusparseLtMatDescriptor_t descriptor;
  status = describe(&descriptor, rows, cols, dtype);
  if (status != 0) return status;
  status = static_cast<int>(cusparseLtSpMMACompress2(&handle, &descriptor, 1, CUSPARSE_OPERATION_NON_TRANSPOSE, dense,
                                                     compressed, buffer, stream));
  cusparseLtMatDescriptorDestroy(&descriptor);
  return status;
}
