/* Host faults for the tests, preloaded into `pfnbd serve` (LD_PRELOAD).
 *
 * A fault is armed while a file of its name exists in the directory
 * $PFNBD_HOST_FAULTS, so a test arms and clears it while the server runs:
 *   fdatasync  fdatasync(2) fails with EIO, as a disk whose write-back failed;
 *   seek       lseek(2) with SEEK_DATA or SEEK_HOLE fails with EIO;
 *   read       pread(2) and preadv2(2) fail with EIO, as an unreadable sector, and
 *              so does a read submitted through io_submit(2) (native AIO, made
 *              through syscall(3)): the reads of a batch are refused with EIO,
 *              whatever precedes the first of them is submitted.
 * Everything else goes to the C library's own call.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <linux/aio_abi.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int armed(const char *fault)
{
    const char *dir = getenv("PFNBD_HOST_FAULTS");
    char path[PATH_MAX];
    struct stat st;

    if (!dir || snprintf(path, sizeof path, "%s/%s", dir, fault) >= (int)sizeof path)
        return 0;
    return stat(path, &st) == 0;
}

#define REAL(name) ((__typeof__(&name))dlsym(RTLD_NEXT, #name))

int fdatasync(int fd)
{
    if (armed("fdatasync")) {
        errno = EIO;
        return -1;
    }
    return REAL(fdatasync)(fd);
}

off_t lseek(int fd, off_t offset, int whence)
{
    if ((whence == SEEK_DATA || whence == SEEK_HOLE) && armed("seek")) {
        errno = EIO;
        return -1;
    }
    return REAL(lseek)(fd, offset, whence);
}

off64_t lseek64(int fd, off64_t offset, int whence)
{
    if ((whence == SEEK_DATA || whence == SEEK_HOLE) && armed("seek")) {
        errno = EIO;
        return -1;
    }
    return REAL(lseek64)(fd, offset, whence);
}

/* CPython's os.preadv calls preadv64v2, with flags or without. */
ssize_t preadv64v2(int fd, const struct iovec *iov, int count, off64_t offset, int flags)
{
    if (armed("read")) {
        errno = EIO;
        return -1;
    }
    return REAL(preadv64v2)(fd, iov, count, offset, flags);
}

ssize_t pread64(int fd, void *buffer, size_t count, off64_t offset)
{
    if (armed("read")) {
        errno = EIO;
        return -1;
    }
    return REAL(pread64)(fd, buffer, count, offset);
}

/* io_submit(2) takes every iocb up to the first read; a batch that starts with one
 * fails with EIO, as a read of a bad sector does (its caller then submits the rest
 * one by one, and each read fails the same way). */
long syscall(long number, ...)
{
    long arg[6];
    va_list ap;

    va_start(ap, number);
    for (int i = 0; i < 6; i++)
        arg[i] = va_arg(ap, long);
    va_end(ap);
    if (number == SYS_io_submit && armed("read")) {
        struct iocb **iocbs = (struct iocb **)arg[2];
        long before = 0;

        while (before < arg[1] && iocbs[before]->aio_lio_opcode != IOCB_CMD_PREAD &&
               iocbs[before]->aio_lio_opcode != IOCB_CMD_PREADV)
            before++;
        if (before == 0) {
            errno = EIO;
            return -1;
        }
        arg[1] = before;
    }
    return REAL(syscall)(number, arg[0], arg[1], arg[2], arg[3], arg[4], arg[5]);
}
