/* Drives PureFlash's client library directly, as fio drives pfnbd over NBD, so that
 * benchmarks/real_cluster.py can put the two side by side on the same cluster.
 *
 *   pf_loadgen LIBRARY CONF VOLUME MODE BLOCK_SIZE QUEUE_DEPTH SECONDS
 *
 * MODE: randread, randwrite (random block-aligned offsets), read, write (sequential,
 * wrapping at the volume's end). Keeps QUEUE_DEPTH submits in flight for SECONDS and
 * prints one JSON line: {"ios": N, "seconds": S, "iops": N/S, "mib_s": ...}.
 * The library (libs5common.so, from scripts/pureflash-cluster build) is dlopen()ed, and
 * its threads are placed as pfnbd places them (pf_client.h). */
#include "pf_client.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static sem_t slots;          /* free places in the queue */
static volatile long failed; /* completions with a non-zero status */

static void on_complete(void *arg, int status) /* on the library's thread */
{
    (void)arg;
    if (status != 0)
        __atomic_add_fetch(&failed, 1, __ATOMIC_RELAXED);
    sem_post(&slots);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void *symbol(void *library, const char *name)
{
    void *found = dlsym(library, name);
    if (!found) {
        fprintf(stderr, "pf_loadgen: %s\n", dlerror());
        exit(2);
    }
    return found;
}

int main(int argc, char **argv)
{
    if (argc != 8) {
        fprintf(stderr, "usage: pf_loadgen LIBRARY CONF VOLUME randread|randwrite|read|write BLOCK_SIZE QUEUE_DEPTH SECONDS\n");
        return 2;
    }
    const char *mode = argv[4];
    size_t block = strtoul(argv[5], NULL, 10);
    int depth = atoi(argv[6]);
    double seconds = atof(argv[7]);
    int is_write = strstr(mode, "write") != NULL;
    int random_offsets = strncmp(mode, "rand", 4) == 0;

    void *library = dlopen(argv[1], RTLD_NOW);
    if (!library) {
        fprintf(stderr, "pf_loadgen: %s\n", dlerror());
        return 2;
    }
    open_fn pf_open_volume = (open_fn)symbol(library, "pf_open_volume");
    close_fn pf_close_volume = (close_fn)symbol(library, "pf_close_volume");
    size_fn pf_get_volume_size = (size_fn)symbol(library, "pf_get_volume_size");
    iov_submit_fn pf_iov_submit = (iov_submit_fn)symbol(library, "pf_iov_submit");

    void *volume = open_placed(pf_open_volume, argv[3], argv[2]);
    if (!volume) {
        fprintf(stderr, "pf_loadgen: cannot open volume %s\n", argv[3]);
        return 1;
    }
    uint64_t blocks = pf_get_volume_size(volume) / block;
    /* One buffer per queue slot would be needed for reads to be meaningful; the library
     * copies into and out of its own buffers, so for load one shared buffer is enough. */
    char *buffer = aligned_alloc(4096, block);
    memset(buffer, 0x5a, block);
    const struct iovec iov = { buffer, block };
    sem_init(&slots, 0, (unsigned)depth);

    uint64_t state = 0x9e3779b97f4a7c15u, next_block = 0;
    long ios = 0;
    double start = now(), deadline = start + seconds;
    while (now() < deadline) {
        sem_wait(&slots);
        uint64_t index;
        if (random_offsets) {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17;
            index = state % blocks;
        } else {
            index = next_block++ % blocks;
        }
        int rc;
        while ((rc = pf_iov_submit(volume, &iov, 1, block, (off_t)(index * block), on_complete, NULL, is_write)) == -EAGAIN)
            usleep(50);
        if (rc != 0) {
            fprintf(stderr, "pf_loadgen: submit failed: %d\n", rc);
            return 1;
        }
        ios++;
    }
    for (int n = 0; n < depth; n++) /* every submit has called back */
        sem_wait(&slots);
    double elapsed = now() - start;
    pf_close_volume(volume);
    if (failed) {
        fprintf(stderr, "pf_loadgen: %ld I/Os failed\n", failed);
        return 1;
    }
    printf("{\"ios\": %ld, \"seconds\": %.3f, \"iops\": %.1f, \"mib_s\": %.2f}\n", ios, elapsed,
           (double)ios / elapsed, (double)ios * (double)block / elapsed / (1 << 20));
    return 0;
}
