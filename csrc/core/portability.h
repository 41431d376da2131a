// Lets core headers be used from host C++ and from CUDA device code alike.
#pragma once

#if defined(__CUDACC__)
#define PKV_HOST_DEVICE __host__ __device__
#else
#define PKV_HOST_DEVICE
#endif
