// The per-device record in which CUDA kernels report bad inputs (torch glue, host side).
//
// Each device has one OpError in mapped pinned host memory: kernels write it directly, and the
// host reads it without a device-to-host copy. By default an op synchronises its stream after
// the launch and raises the recorded error at once. With synchronous checks off (or while a
// stream is being captured into a CUDA graph), the error is raised by the next paged_kv op on
// that device, or by check_errors().
#pragma once

#include <cuda_runtime.h>

#include "core/op_error.h"

namespace paged_kv::cuda {

// Device-visible pointer to `device`'s record; raises any error still pending there first.
OpError* op_error_record(int device);

// Raises "paged_kv: <what> failed: <CUDA's message>" unless `status` is cudaSuccess.
void check_cuda(cudaError_t status, const char* what);

// Raises a failed launch's error (for kernels that record no input errors).
void check_launch_status(int launch_status);

// After a launch: raises the launch error, and when checks are synchronous and `stream` is not
// capturing, waits for the stream and raises any recorded input error.
void check_launch(int launch_status, int device, cudaStream_t stream);

// Synchronises `device` and raises its pending error, if any.
void check_errors(int device);

// Whether launches on the calling thread wait for their input checks (default true).
void set_sync_checks(bool enabled);
bool sync_checks();

}  // namespace paged_kv::cuda
