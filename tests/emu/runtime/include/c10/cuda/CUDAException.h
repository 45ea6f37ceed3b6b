// Stand-in for c10's CUDA error header, for the emulated build (tests/emu): the launch check reports
// the emulated launch's error, as the real one reports cudaGetLastError().
#pragma once

#include <c10/util/Exception.h>

#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::emu::check_last_launch(__FILE__, __LINE__)
