/* The SPDK symbols libs5common's objects reference. The client never runs SPDK
 * (pf_client_api.cpp:1834 only takes the SPDK path for an spdk engine): the ticks pair
 * is used for timing, trace registration is a no-op, and the rest abort if ever called,
 * so a path nobody measured cannot silently do nothing. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

uint64_t spdk_get_ticks(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

uint64_t spdk_get_ticks_hz(void) { return 1000000000u; }

void spdk_trace_add_register_fn(void *reg_fn) { (void)reg_fn; }
void spdk_trace_register_description_ext(void) {}
void spdk_trace_register_object(void) {}
void spdk_trace_register_owner(void) {}

#define NEVER_CALLED(name) \
    void name(void) { fprintf(stderr, "pfnbd stub: %s called without SPDK\n", #name); abort(); }

NEVER_CALLED(spdk_dma_free)
NEVER_CALLED(spdk_dma_zmalloc)
NEVER_CALLED(spdk_mempool_create)
NEVER_CALLED(spdk_mempool_free)
NEVER_CALLED(spdk_mempool_get_bulk)
NEVER_CALLED(spdk_ring_create)
NEVER_CALLED(spdk_ring_dequeue)
NEVER_CALLED(spdk_ring_enqueue)
NEVER_CALLED(spdk_ring_free)
