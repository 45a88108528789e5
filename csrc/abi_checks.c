/* Compile-time checks that the ABI structs have ggml's block sizes. */
#include <assert.h>
#include <stddef.h>

#include "wanrt.h"

static_assert(sizeof(wanrt_block_q8_0) == 2 + 32, "q8_0 block is 34 bytes");
static_assert(sizeof(wanrt_block_q4_0) == 2 + 16, "q4_0 block is 18 bytes");
static_assert(sizeof(wanrt_block_q4_1) == 4 + 16, "q4_1 block is 20 bytes");
static_assert(sizeof(wanrt_block_q5_0) == 2 + 4 + 16, "q5_0 block is 22 bytes");
static_assert(sizeof(wanrt_block_q5_1) == 4 + 4 + 16, "q5_1 block is 24 bytes");
static_assert(offsetof(wanrt_block_q5_0, qs) == 6, "q5_0 nibbles follow d and qh");
static_assert(offsetof(wanrt_block_q5_1, qs) == 8, "q5_1 nibbles follow d, m and qh");
static_assert(sizeof(wanrt_status) == sizeof(int), "status is passed as a C int");
