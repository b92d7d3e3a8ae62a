/* What the C clients that real_cluster.py measures pfnbd against (pf_loadgen.c,
 * nbdkit_pureflash.c) share: the few declarations of PureFlash's client API they use
 * (its header needs PureFlash's whole source tree; the library is dlopen()ed), and
 * where they put their threads. They place them as pfnbd places its own (pfnbd/cpus.py
 * says why): the submitting threads on one CPU, the threads the library starts in
 * pf_open_volume (some at real-time priority, guarding queues with spin locks the
 * submitters take too) on the others. Left where the scheduler put them, the library
 * driven directly ran at a fifth of the placed rate on an Intel Xeon VM
 * (benchmarks/README.md, "The real path"). */
#ifndef PF_CLIENT_H
#define PF_CLIENT_H

#define _GNU_SOURCE
#include <dirent.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/uio.h>

#define S5_LIB_VER 0x00010000
#define PF_MAX_IO_SIZE (128 << 10)

typedef void (*ulp_io_handler)(void *cbk_arg, int complete_status);
typedef void *(*open_fn)(const char *, const char *, const char *, int);
typedef void (*close_fn)(void *);
typedef uint64_t (*size_fn)(void *);
/* pf_iov_submit, the call pfnbd makes: the iovecs must stay alive until the callback,
 * which copies a read into them */
typedef int (*iov_submit_fn)(void *, const struct iovec *, unsigned int, size_t, off_t, ulp_io_handler, void *, int);

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
 * threads the library starts kept on the rest; with one CPU, just opens it. Threads the
 * caller starts afterwards inherit its CPU. */
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
        perror("sched_setaffinity");
    static pid_t before[MAX_THREADS], after[MAX_THREADS];
    int before_count = list_threads(before);
    void *handle = pf_open_volume(volume, conf, NULL, S5_LIB_VER);
    int after_count = before_count ? list_threads(after) : 0; /* else any thread might look new */
    CPU_CLR(first, &allowed);
    for (int n = 0; n < after_count; n++)
        if (!listed(before, before_count, after[n]) && sched_setaffinity(after[n], sizeof allowed, &allowed) != 0)
            perror("sched_setaffinity of a library thread");
    return handle;
}

#endif
