// Stand-in for the CUDA runtime header, for the emulated build (tests/emu): the types launch.h names.
#pragma once

struct CUstream_st;
using cudaStream_t = CUstream_st*;
