/* An nbdkit plugin serving one PureFlash volume through the client library: the C NBD
 * server that benchmarks/real_cluster.py runs beside pfnbd, so that what NBD costs on
 * a cluster (fio's nbd engine, the socket, a server's request handling) is told apart
 * from what Python costs.
 *
 *   gcc -O2 -shared -fPIC -o nbdkit-pureflash-plugin.so nbdkit_pureflash.c -ldl -lpthread
 *   nbdkit --foreground --unix SOCK --exportname bench --threads 32 \
 *       ./nbdkit-pureflash-plugin.so library=libs5common.so conf=pf.conf volume=bench
 *
 * It does what pfnbd's bridge does with the library, no less: a request is split into
 * submits of at most 128 KiB, a submit the library refuses for want of an iocb
 * (-EAGAIN) is made again after a pause, and the request's reply waits for the last
 * completion. An acknowledged write is on its replicas, so a flush has nothing to do,
 * and FUA is native. nbdkit's thread pool plays the part of pfnbd's requests in flight:
 * with --threads 32 a connection can have fio's 32 at once. Needs Debian's
 * nbdkit-plugin-dev. */
#include "pf_client.h"

#include <dlfcn.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

static const char *library_path, *conf_path, *volume_name;
static void *volume; /* opened in after_fork: the library's threads would not survive nbdkit's fork */
static close_fn pf_close_volume;
static size_fn pf_get_volume_size;
static iov_submit_fn pf_iov_submit;

/* One request's submits: the thread that made them waits until none is outstanding. */
struct request {
    pthread_mutex_t lock;
    pthread_cond_t done;
    int outstanding;
    int status; /* the first failure, 0 if none */
};

static void on_complete(void *arg, int status) /* on the library's thread */
{
    struct request *request = arg;
    pthread_mutex_lock(&request->lock);
    if (status && !request->status)
        request->status = status;
    if (--request->outstanding == 0)
        pthread_cond_signal(&request->done);
    pthread_mutex_unlock(&request->lock);
}

static int pureflash_config(const char *key, const char *value)
{
    if (strcmp(key, "library") == 0)
        library_path = value;
    else if (strcmp(key, "conf") == 0)
        conf_path = value;
    else if (strcmp(key, "volume") == 0)
        volume_name = value;
    else {
        nbdkit_error("unknown parameter '%s'", key);
        return -1;
    }
    return 0;
}

static int pureflash_config_complete(void)
{
    if (!library_path || !conf_path || !volume_name) {
        nbdkit_error("library=, conf= and volume= are all needed");
        return -1;
    }
    return 0;
}

static int pureflash_after_fork(void)
{
    void *library = dlopen(library_path, RTLD_NOW);
    if (!library) {
        nbdkit_error("%s", dlerror());
        return -1;
    }
    open_fn pf_open_volume = (open_fn)dlsym(library, "pf_open_volume");
    pf_close_volume = (close_fn)dlsym(library, "pf_close_volume");
    pf_get_volume_size = (size_fn)dlsym(library, "pf_get_volume_size");
    pf_iov_submit = (iov_submit_fn)dlsym(library, "pf_iov_submit");
    if (!pf_open_volume || !pf_close_volume || !pf_get_volume_size || !pf_iov_submit) {
        nbdkit_error("%s is not a PureFlash client library", library_path);
        return -1;
    }
    /* nbdkit's own threads, started after this, inherit this thread's CPU. */
    volume = open_placed(pf_open_volume, volume_name, conf_path);
    if (!volume) {
        nbdkit_error("cannot open volume %s", volume_name);
        return -1;
    }
    return 0;
}

static void pureflash_unload(void)
{
    if (volume)
        pf_close_volume(volume);
}

static void *pureflash_open(int readonly)
{
    (void)readonly;
    return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t pureflash_get_size(void *handle)
{
    (void)handle;
    return (int64_t)pf_get_volume_size(volume);
}

static int transfer(void *buffer, uint32_t count, uint64_t offset, int is_write)
{
    struct request request = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 1, 0 };
    uint32_t pieces = (count + PF_MAX_IO_SIZE - 1) / PF_MAX_IO_SIZE;
    struct iovec one, *iov = pieces == 1 ? &one : calloc(pieces, sizeof *iov);
    if (!iov) {
        nbdkit_error("calloc: %m");
        return -1;
    }
    for (uint32_t piece = 0; piece < pieces; piece++) {
        uint32_t start = piece * PF_MAX_IO_SIZE;
        iov[piece] = (struct iovec){ (char *)buffer + start, count - start < PF_MAX_IO_SIZE ? count - start : PF_MAX_IO_SIZE };
        pthread_mutex_lock(&request.lock);
        request.outstanding++;
        pthread_mutex_unlock(&request.lock);
        int rc;
        while ((rc = pf_iov_submit(volume, &iov[piece], 1, iov[piece].iov_len, (off_t)(offset + start),
                                   on_complete, &request, is_write)) == -EAGAIN)
            usleep(50);
        if (rc) {
            on_complete(&request, rc);
            break;
        }
    }
    pthread_mutex_lock(&request.lock);
    request.outstanding--; /* the submitting thread's own hold */
    while (request.outstanding)
        pthread_cond_wait(&request.done, &request.lock);
    pthread_mutex_unlock(&request.lock);
    if (iov != &one)
        free(iov);
    if (request.status) {
        nbdkit_error("PureFlash %s at %" PRIu64 "+%" PRIu32 " failed with status %d",
                     is_write ? "write" : "read", offset, count, request.status);
        errno = request.status < 0 ? -request.status : EIO;
        return -1;
    }
    return 0;
}

static int pureflash_pread(void *handle, void *buffer, uint32_t count, uint64_t offset, uint32_t flags)
{
    (void)handle, (void)flags;
    return transfer(buffer, count, offset, 0);
}

static int pureflash_pwrite(void *handle, const void *buffer, uint32_t count, uint64_t offset,
                            uint32_t flags)
{
    (void)handle, (void)flags;
    return transfer((void *)buffer, count, offset, 1); /* the library only copies from it */
}

static int pureflash_flush(void *handle, uint32_t flags)
{
    (void)handle, (void)flags;
    return 0;
}

static int pureflash_can_flush(void *handle)
{
    (void)handle;
    return 1;
}

static int pureflash_can_fua(void *handle)
{
    (void)handle;
    return NBDKIT_FUA_NATIVE;
}

static int pureflash_can_multi_conn(void *handle)
{
    (void)handle;
    return 1;
}

static struct nbdkit_plugin plugin = {
    .name = "pureflash",
    .longname = "PureFlash volumes through libs5common",
    .config = pureflash_config,
    .config_complete = pureflash_config_complete,
    .config_help = "library=PATH conf=PF.CONF volume=NAME",
    .after_fork = pureflash_after_fork,
    .unload = pureflash_unload,
    .open = pureflash_open,
    .get_size = pureflash_get_size,
    .pread = pureflash_pread,
    .pwrite = pureflash_pwrite,
    .flush = pureflash_flush,
    .can_flush = pureflash_can_flush,
    .can_fua = pureflash_can_fua,
    .can_multi_conn = pureflash_can_multi_conn,
};

NBDKIT_REGISTER_PLUGIN(plugin)
