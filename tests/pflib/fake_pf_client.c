/*
 * A stand-in for PureFlash's client library (libs5common), for testing pfnbd's ctypes
 * binding without a cluster.  It exports the part of the documented ABI the binding uses
 * (pf_client_api.h: pf_open_volume, pf_close_volume, pf_get_volume_size,
 * pf_query_volume_info, pf_iov_submit) with the real library's contract:
 *
 *   - submits are checked in the real order: 512-byte alignment, then 128 KiB, then a pool
 *     of 2 * io_depth requests (-EAGAIN when it is empty);
 *   - write data is copied at submit; read data is copied into the caller's iovecs on the
 *     volume's own thread, just before the callback, so the iovec array must stay alive;
 *   - every callback runs on that thread (vol_proc, one pthread per open volume);
 *   - pf_close_volume waits for every in-flight I/O.
 *
 * A volume is a file in the directory named by the configuration's fake-only key
 * `[fake] volume_dir`: NAME for the head, NAME@SNAP for a snapshot (opened read-only).
 * `[client] io_depth` works as in pf.conf; `[fake] rep_count`, `meta_ver` and
 * `snap_seq` are what pf_query_volume_info reports.
 *
 * fake_pf_* functions are test hooks, not part of the PureFlash ABI.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stddef.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PF_MAX_IO_DEPTH 255
#define PF_MAX_IO_SIZE (128 << 10)
#define S5_LIB_VER 0x00010000
#define SECTOR 512
#define SHARD_SIZE (64ULL << 30)
#define DEFAULT_CONF "/etc/pureflash/pf.conf"

typedef void (*ulp_io_handler)(void *cbk_arg, int complete_status);

struct PfClientVolumeInfo {
	char status[64];
	char volume_name[128];
	char snap_name[128];
	uint64_t volume_size;
	uint64_t volume_id;
	int shard_count;
	int rep_count;
	int meta_ver;
	int snap_seq;
};

struct fake_conf {
	char volume_dir[PATH_MAX];
	int io_depth;
	int rep_count;
	int meta_ver;
	int snap_seq;
};

struct fake_io {
	struct fake_io *next;
	const struct iovec *iov; /* the caller's array: read data lands there at completion */
	unsigned int iov_cnt;
	char *data;              /* write data, copied at submit */
	size_t length;
	off_t offset;
	int is_write;
	ulp_io_handler callback;
	void *cbk_arg;
};

struct PfClientVolume {
	int fd;
	uint64_t size;
	int pool_size;
	int in_flight;
	int paused;
	int closing;
	unsigned long eagain_count;
	struct fake_io *head, *tail;
	pthread_mutex_t lock;
	pthread_cond_t changed;
	pthread_t vol_proc;
};

/* Logged as the real library logs (common/include/pf_log.h, S5LOG_ERROR and S5LOG_INFO):
 * "[LEVL date time]message(file:line:function) " on stderr, a line each. */
static void s5log(const char *level, const char *file, int line, const char *function,
		  const char *format, ...) __attribute__((format(printf, 5, 6)));
static void s5log(const char *level, const char *file, int line, const char *function,
		  const char *format, ...)
{
	char when[32];
	time_t now = time(NULL);
	va_list args;

	strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", localtime(&now));
	fprintf(stderr, "[%s %s.000]", level, when);
	va_start(args, format);
	vfprintf(stderr, format, args);
	va_end(args);
	fprintf(stderr, "(%s:%d:%s) \n", file, line, function);
}
#define LOG(...) s5log("ERRO", __FILE__, __LINE__, __func__, __VA_ARGS__)
#define LOG_INFO(...) s5log("INFO", __FILE__, __LINE__, __func__, __VA_ARGS__)

static char *trim(char *text)
{
	char *end;
	while (*text == ' ' || *text == '\t')
		text++;
	end = text + strlen(text);
	while (end > text && strchr(" \t\r\n", end[-1]))
		*--end = '\0';
	return text;
}

/* Reads the INI keys the fake knows; 0 or a negative errno. */
static int read_conf(const char *path, struct fake_conf *conf)
{
	char line[PATH_MAX + 64], section[64] = "";
	FILE *file = fopen(path ? path : DEFAULT_CONF, "r");
	if (file == NULL) {
		int error = errno;
		LOG("cannot open config file %s: %s", path ? path : DEFAULT_CONF, strerror(error));
		return -error;
	}
	*conf = (struct fake_conf){.io_depth = 120, .rep_count = 1, .meta_ver = 1, .snap_seq = 0};
	while (fgets(line, sizeof line, file)) {
		char *text = trim(line), *equals, *key, *value;
		if (*text == '[') {
			snprintf(section, sizeof section, "%.*s", (int)strcspn(text + 1, "]"), text + 1);
			continue;
		}
		if ((equals = strchr(text, '=')) == NULL)
			continue;
		*equals = '\0';
		key = trim(text);
		value = trim(equals + 1);
		if (!strcmp(section, "client") && !strcmp(key, "io_depth"))
			conf->io_depth = atoi(value);
		else if (!strcmp(section, "fake") && !strcmp(key, "volume_dir"))
			snprintf(conf->volume_dir, sizeof conf->volume_dir, "%s", value);
		else if (!strcmp(section, "fake") && !strcmp(key, "rep_count"))
			conf->rep_count = atoi(value);
		else if (!strcmp(section, "fake") && !strcmp(key, "meta_ver"))
			conf->meta_ver = atoi(value);
		else if (!strcmp(section, "fake") && !strcmp(key, "snap_seq"))
			conf->snap_seq = atoi(value);
	}
	fclose(file);
	return 0;
}

static int volume_path(const struct fake_conf *conf, const char *name, const char *snap,
		       char *path, size_t size)
{
	int length;
	if (strchr(name, '/') || (snap && strchr(snap, '/')))
		return -ENOENT;
	length = snap ? snprintf(path, size, "%s/%s@%s", conf->volume_dir, name, snap)
		      : snprintf(path, size, "%s/%s", conf->volume_dir, name);
	return length < (int)size ? 0 : -ENAMETOOLONG;
}

/* ---- the volume's own thread ---------------------------------------------------- */

static void scatter(const struct iovec *iov, unsigned int iov_cnt, const char *data, size_t length)
{
	for (unsigned int i = 0; i < iov_cnt && length; i++) {
		size_t piece = iov[i].iov_len < length ? iov[i].iov_len : length;
		memcpy(iov[i].iov_base, data, piece);
		data += piece;
		length -= piece;
	}
}

static int execute(struct PfClientVolume *vol, struct fake_io *io)
{
	size_t done = 0;
	if (io->is_write) {
		while (done < io->length) {
			ssize_t n = pwrite(vol->fd, io->data + done, io->length - done, io->offset + done);
			if (n < 0)
				return -errno;
			done += n;
		}
		return 0;
	}
	char *data = calloc(1, io->length); /* past the end of the file reads as zeros */
	if (data == NULL)
		return -ENOMEM;
	while (done < io->length) {
		ssize_t n = pread(vol->fd, data + done, io->length - done, io->offset + done);
		if (n < 0) {
			int error = errno;
			free(data);
			return -error;
		}
		if (n == 0)
			break;
		done += n;
	}
	scatter(io->iov, io->iov_cnt, data, io->length);
	free(data);
	return 0;
}

static void *vol_proc(void *arg)
{
	struct PfClientVolume *vol = arg;
	pthread_mutex_lock(&vol->lock);
	for (;;) {
		/* Paused, queued I/O stays in flight; closing drains the queue, then ends. */
		while ((vol->head == NULL && !vol->closing) || (vol->head != NULL && vol->paused))
			pthread_cond_wait(&vol->changed, &vol->lock);
		struct fake_io *io = vol->head;
		if (io == NULL)
			break;
		vol->head = io->next;
		if (vol->head == NULL)
			vol->tail = NULL;
		pthread_mutex_unlock(&vol->lock);

		int status = execute(vol, io);
		pthread_mutex_lock(&vol->lock);
		vol->in_flight--; /* before the callback, which may submit again */
		pthread_mutex_unlock(&vol->lock);
		io->callback(io->cbk_arg, status);
		free(io->data);
		free(io);
		pthread_mutex_lock(&vol->lock);
	}
	pthread_mutex_unlock(&vol->lock);
	return NULL;
}

/* ---- the documented ABI ----------------------------------------------------------- */

struct PfClientVolume *pf_open_volume(const char *volume_name, const char *cfg_filename,
				      const char *snap_name, int lib_ver)
{
	struct fake_conf conf;
	char path[PATH_MAX];
	struct stat st;
	struct PfClientVolume *vol;
	int fd;

	if (lib_ver != S5_LIB_VER) {
		LOG("caller lib version %#x mismatches lib %#x", lib_ver, S5_LIB_VER);
		return NULL;
	}
	if (volume_name != NULL)
		LOG_INFO("Opening volume %s@%s", volume_name, snap_name ? snap_name : "HEAD");
	if (volume_name == NULL || read_conf(cfg_filename, &conf) != 0)
		return NULL;
	if (conf.io_depth < 1 || conf.io_depth > PF_MAX_IO_DEPTH) {
		LOG("io_depth %d is not within 1..%d", conf.io_depth, PF_MAX_IO_DEPTH);
		return NULL;
	}
	if (volume_path(&conf, volume_name, snap_name, path, sizeof path) != 0)
		return NULL;
	fd = open(path, snap_name ? O_RDONLY : O_RDWR);
	if (fd < 0) {
		LOG("volume %s%s%s not found: %s", volume_name, snap_name ? "@" : "",
		    snap_name ? snap_name : "", strerror(errno));
		return NULL;
	}
	if (fstat(fd, &st) != 0 || (vol = calloc(1, sizeof *vol)) == NULL) {
		close(fd);
		return NULL;
	}
	vol->fd = fd;
	vol->size = st.st_size;
	vol->pool_size = 2 * conf.io_depth;
	pthread_mutex_init(&vol->lock, NULL);
	pthread_cond_init(&vol->changed, NULL);
	if (pthread_create(&vol->vol_proc, NULL, vol_proc, vol) != 0) {
		close(fd);
		free(vol);
		return NULL;
	}
	return vol;
}

void pf_close_volume(struct PfClientVolume *vol)
{
	pthread_mutex_lock(&vol->lock);
	vol->closing = 1;
	pthread_cond_broadcast(&vol->changed);
	pthread_mutex_unlock(&vol->lock);
	pthread_join(vol->vol_proc, NULL);
	close(vol->fd);
	pthread_cond_destroy(&vol->changed);
	pthread_mutex_destroy(&vol->lock);
	free(vol);
}

uint64_t pf_get_volume_size(struct PfClientVolume *vol)
{
	return vol->size;
}

int pf_query_volume_info(const char *volume_name, const char *cfg_filename, const char *snap_name,
			 int lib_ver, struct PfClientVolumeInfo *out)
{
	struct fake_conf conf;
	char path[PATH_MAX];
	struct stat st;
	int rc;

	if (volume_name == NULL || out == NULL || lib_ver != S5_LIB_VER)
		return -EINVAL;
	LOG_INFO("Opening volume %s@%s", volume_name, snap_name ? snap_name : "HEAD");
	if ((rc = read_conf(cfg_filename, &conf)) != 0)
		return rc;
	if ((rc = volume_path(&conf, volume_name, snap_name, path, sizeof path)) != 0)
		return rc;
	if (stat(path, &st) != 0) {
		LOG("Volume:%s not exists or can't be open", volume_name);
		return -ENOENT;
	}
	memset(out, 0, sizeof *out);
	snprintf(out->status, sizeof out->status, "OK");
	snprintf(out->volume_name, sizeof out->volume_name, "%s", volume_name);
	snprintf(out->snap_name, sizeof out->snap_name, "%s", snap_name ? snap_name : "");
	out->volume_size = st.st_size;
	out->volume_id = st.st_ino;
	out->shard_count = (int)((st.st_size + SHARD_SIZE - 1) / SHARD_SIZE);
	out->rep_count = conf.rep_count;
	out->meta_ver = conf.meta_ver;
	out->snap_seq = conf.snap_seq;
	return 0;
}

int pf_iov_submit(struct PfClientVolume *vol, const struct iovec *iov, const unsigned int iov_cnt,
		  size_t length, off_t offset, ulp_io_handler callback, void *cbk_arg, int is_write)
{
	struct fake_io *io;
	char *data;
	size_t total = 0;

	if (offset % SECTOR || length % SECTOR)
		return -EINVAL;
	if (length > PF_MAX_IO_SIZE)
		return -EINVAL;
	for (unsigned int i = 0; i < iov_cnt; i++)
		total += iov[i].iov_len;
	if (total != length) { /* stricter than the real library: catches a miscounting binding */
		LOG("iovecs hold %zu bytes, length says %zu", total, length);
		return -EINVAL;
	}
	pthread_mutex_lock(&vol->lock);
	if (vol->in_flight >= vol->pool_size) {
		vol->eagain_count++;
		pthread_mutex_unlock(&vol->lock);
		return -EAGAIN;
	}
	vol->in_flight++;
	pthread_mutex_unlock(&vol->lock);

	io = malloc(sizeof *io);
	data = is_write ? malloc(length) : NULL;
	if (io == NULL || (is_write && data == NULL)) {
		free(io);
		free(data);
		pthread_mutex_lock(&vol->lock);
		vol->in_flight--;
		pthread_mutex_unlock(&vol->lock);
		return -ENOMEM;
	}
	*io = (struct fake_io){.iov = iov, .iov_cnt = iov_cnt, .data = data, .length = length,
			       .offset = offset, .is_write = is_write, .callback = callback,
			       .cbk_arg = cbk_arg};
	for (unsigned int i = 0; is_write && i < iov_cnt; i++) {
		memcpy(data, iov[i].iov_base, iov[i].iov_len);
		data += iov[i].iov_len;
	}
	pthread_mutex_lock(&vol->lock);
	if (vol->tail)
		vol->tail->next = io;
	else
		vol->head = io;
	vol->tail = io;
	pthread_cond_broadcast(&vol->changed);
	pthread_mutex_unlock(&vol->lock);
	return 0;
}

/* ---- test hooks ---------------------------------------------------------------------- */

/* While paused, submitted I/O stays queued and in flight; unpausing delivers it. */
void fake_pf_set_paused(struct PfClientVolume *vol, int paused)
{
	pthread_mutex_lock(&vol->lock);
	vol->paused = paused;
	pthread_cond_broadcast(&vol->changed);
	pthread_mutex_unlock(&vol->lock);
}

unsigned long fake_pf_vol_proc_thread(struct PfClientVolume *vol)
{
	return (unsigned long)vol->vol_proc;
}

unsigned long fake_pf_eagain_count(struct PfClientVolume *vol)
{
	pthread_mutex_lock(&vol->lock);
	unsigned long count = vol->eagain_count;
	pthread_mutex_unlock(&vol->lock);
	return count;
}

/* The C layout of struct PfClientVolumeInfo: each field's offset, in order, then its size. */
void fake_pf_info_layout(size_t out[10])
{
	const size_t layout[10] = {
		offsetof(struct PfClientVolumeInfo, status),
		offsetof(struct PfClientVolumeInfo, volume_name),
		offsetof(struct PfClientVolumeInfo, snap_name),
		offsetof(struct PfClientVolumeInfo, volume_size),
		offsetof(struct PfClientVolumeInfo, volume_id),
		offsetof(struct PfClientVolumeInfo, shard_count),
		offsetof(struct PfClientVolumeInfo, rep_count),
		offsetof(struct PfClientVolumeInfo, meta_ver),
		offsetof(struct PfClientVolumeInfo, snap_seq),
		sizeof(struct PfClientVolumeInfo),
	};
	memcpy(out, layout, sizeof layout);
}
