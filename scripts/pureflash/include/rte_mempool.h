/* Empty on purpose: common/src/pf_spdk_ring.cpp includes DPDK's rte_mempool.h, but the
 * client library and pfs (engine=aio) never use a DPDK mempool, and DPDK is not built. */
