/* Drives PureFlash's client library directly, as fio drives pfnbd over NBD, so that
 * benchmarks/real_cluster.py can put the two side by side on the same cluster.
 *
 *   pf_loadgen LIBRARY CONF VOLUME MODE BLOCK_SIZE QUEUE_DEPTH SECONDS
 *
 * MODE: randread, randwrite (random block-aligned offsets), read, write (sequential,
 * wrapping at the volume's end). Keeps QUEUE_DEPTH submits in flight for SECONDS and
 * prints one JSON line: {"ios": N, "seconds": S, "iops": N/S, "mib_s": ...}.
 * The library is dlopen()ed: libs5common.so comes from scripts/pureflash-cluster build,
 * and its header needs PureFlash's source tree, so the few declarations are here.
 *
 * Its threads are placed as pfnbd places them (pfnbd/cpus.py, which says why): the
 * submitting thread on one CPU, the threads the library starts in pf_open_volume (some
 * at real-time priority, guarding queues with spin locks the submitter takes too) on the
 * others. Left where the scheduler put them, the library driven directly ran at a fifth
 * of this rate on an Intel Xeon VM, slower than pfnbd driving it (benchmarks/README.md,
 * "The real path"). */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define S5_LIB_VER 0x00010000

typedef void (*ulp_io_handler)(void *cbk_arg, int complete_status);
typedef void *(*open_fn)(const char *, const char *, const char *, int);
typedef void (*close_fn)(void *);
typedef uint64_t (*size_fn)(void *);
typedef int (*submit_fn)(void *, void *, size_t, off_t, ulp_io_handler, void *, int);

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

#define MAX_THREADS 1024

/* The process's thread ids, at most MAX_THREADS; how many there are. */
static int list_threads(pid_t *threads)
{
    DIR *tasks = opendir("/proc/self/task");
    if (!tasks)
        return 0;
    int count = 0;
    struct dirent *entry;
    while ((entry = readdir(tasks)) && count < MAX_THREADS)
        if (entry->d_name[0] != '.')
            threads[count++] = (pid_t)atoi(entry->d_name);
    closedir(tasks);
    return count;
}

static int listed(const pid_t *threads, int count, pid_t thread)
{
    for (int n = 0; n < count; n++)
        if (threads[n] == thread)
            return 1;
    return 0;
}

/* Opens the volume with the calling thread kept on the first CPU it may use and the
 * threads the library starts kept on the rest; with one CPU, just opens it. */
static void *open_placed(open_fn pf_open_volume, const char *volume, const char *conf)
{
    cpu_set_t allowed, submitter;
    int first = -1;
    if (sched_getaffinity(0, sizeof allowed, &allowed) == 0 && CPU_COUNT(&allowed) >= 2)
        for (int cpu = 0; cpu < CPU_SETSIZE && first < 0; cpu++)
            if (CPU_ISSET(cpu, &allowed))
                first = cpu;
    if (first < 0)
        return pf_open_volume(volume, conf, NULL, S5_LIB_VER);
    CPU_ZERO(&submitter);
    CPU_SET(first, &submitter);
    if (sched_setaffinity(0, sizeof submitter, &submitter) != 0)
        perror("pf_loadgen: sched_setaffinity");
    static pid_t before[MAX_THREADS], after[MAX_THREADS];
    int before_count = list_threads(before);
    void *handle = pf_open_volume(volume, conf, NULL, S5_LIB_VER);
    int after_count = before_count ? list_threads(after) : 0; /* else any thread might look new */
    CPU_CLR(first, &allowed);
    for (int n = 0; n < after_count; n++)
        if (!listed(before, before_count, after[n]) && sched_setaffinity(after[n], sizeof allowed, &allowed) != 0)
            perror("pf_loadgen: sched_setaffinity of a library thread");
    return handle;
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
    submit_fn pf_io_submit = (submit_fn)symbol(library, "pf_io_submit");

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
        while ((rc = pf_io_submit(volume, buffer, block, (off_t)(index * block), on_complete, NULL, is_write)) == -EAGAIN)
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
