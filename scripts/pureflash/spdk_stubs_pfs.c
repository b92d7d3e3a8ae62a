/* The further SPDK symbols pfs references. pfs runs with [engine] name=aio, so the NVMe
 * and environment calls belong to engine=spdk and abort if reached; strtol, u32log2 and
 * unaffinitize_thread are called on the aio path and get real bodies. */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

long int spdk_strtol(const char *nptr, int base)
{
    char *end;
    errno = 0;
    long value = strtol(nptr, &end, base);
    if (errno != 0 || end == nptr || *end != '\0') {
        return -EINVAL;
    }
    return value < 0 ? -ERANGE : value;
}

uint32_t spdk_u32log2(uint32_t x)
{
    return x == 0 ? 0 : 31u - (uint32_t)__builtin_clz(x);
}

void spdk_unaffinitize_thread(void) {}

#define NEVER_CALLED(name) \
    void name(void) { fprintf(stderr, "pfnbd stub: %s called without SPDK\n", #name); abort(); }

NEVER_CALLED(spdk_env_init)
NEVER_CALLED(spdk_env_opts_init)
NEVER_CALLED(spdk_nvme_ctrlr_alloc_io_qpair)
NEVER_CALLED(spdk_nvme_ctrlr_connect_io_qpair)
NEVER_CALLED(spdk_nvme_ctrlr_free_io_qpair)
NEVER_CALLED(spdk_nvme_ctrlr_get_data)
NEVER_CALLED(spdk_nvme_ctrlr_get_default_io_qpair_opts)
NEVER_CALLED(spdk_nvme_ctrlr_get_first_active_ns)
NEVER_CALLED(spdk_nvme_ctrlr_get_next_active_ns)
NEVER_CALLED(spdk_nvme_ctrlr_get_ns)
NEVER_CALLED(spdk_nvme_ctrlr_get_pci_device)
NEVER_CALLED(spdk_nvme_ns_cmd_copy)
NEVER_CALLED(spdk_nvme_ns_cmd_read_with_md)
NEVER_CALLED(spdk_nvme_ns_cmd_write_with_md)
NEVER_CALLED(spdk_nvme_ns_get_extended_sector_size)
NEVER_CALLED(spdk_nvme_ns_get_id)
NEVER_CALLED(spdk_nvme_ns_get_md_size)
NEVER_CALLED(spdk_nvme_ns_get_num_sectors)
NEVER_CALLED(spdk_nvme_ns_get_size)
NEVER_CALLED(spdk_nvme_ns_is_active)
NEVER_CALLED(spdk_nvme_ns_supports_extended_lba)
NEVER_CALLED(spdk_nvme_poll_group_add)
NEVER_CALLED(spdk_nvme_poll_group_create)
NEVER_CALLED(spdk_nvme_poll_group_destroy)
NEVER_CALLED(spdk_nvme_poll_group_process_completions)
NEVER_CALLED(spdk_nvme_probe)
NEVER_CALLED(spdk_nvme_qpair_process_completions)
NEVER_CALLED(spdk_nvme_transport_id_parse)
NEVER_CALLED(spdk_pci_addr_parse)
NEVER_CALLED(spdk_pci_device_get_id)
