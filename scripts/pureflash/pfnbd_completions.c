/*
 * pfnbd's completion ring: the ulp_io_handler pfnbd gives the PureFlash client library.
 *
 * The library calls a submit's handler on its own thread (vol_proc).  A handler written in
 * Python would take the GIL there once per I/O, and wait for the Python thread that holds
 * it, stalling the library's thread and every I/O queued behind it.  This handler runs no
 * Python: it appends (slot, status) to a ring under a mutex and, when the ring goes from
 * empty to non-empty, signals an eventfd.  pfnbd/pureflash.py waits on the eventfd and
 * drains the ring, a batch per wake-up.
 *
 * A ring has `capacity` slots; a submit's cbk_arg is its slot (pfnbd_ring_slot), and a slot
 * is given to one submit at a time, so the ring (one entry per slot) can never overflow.
 * Built by scripts/pureflash-cluster next to libs5common.so; it depends on nothing of it.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

struct pfnbd_ring;

struct pfnbd_slot {
	struct pfnbd_ring *ring;
	uint32_t index;
};

struct pfnbd_completion { /* what a drain returns, one per completed submit */
	uint32_t slot;
	int32_t status;
};

struct pfnbd_ring {
	pthread_mutex_t lock;
	int fd; /* eventfd: readable while the ring may hold entries */
	uint32_t capacity, head, count; /* entries[head .. head + count) mod capacity */
	struct pfnbd_slot *slots;
	struct pfnbd_completion *entries;
};

struct pfnbd_ring *pfnbd_ring_new(uint32_t capacity)
{
	struct pfnbd_ring *ring = calloc(1, sizeof(*ring));
	if (ring == NULL)
		return NULL;
	ring->slots = calloc(capacity, sizeof(*ring->slots));
	ring->entries = calloc(capacity, sizeof(*ring->entries));
	ring->fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (ring->slots == NULL || ring->entries == NULL || ring->fd < 0 || capacity == 0) {
		if (ring->fd >= 0)
			close(ring->fd);
		free(ring->slots);
		free(ring->entries);
		free(ring);
		return NULL;
	}
	pthread_mutex_init(&ring->lock, NULL);
	ring->capacity = capacity;
	for (uint32_t i = 0; i < capacity; i++) {
		ring->slots[i].ring = ring;
		ring->slots[i].index = i;
	}
	return ring;
}

/* Only once no submit holds a slot: the library may call the handler until then. */
void pfnbd_ring_free(struct pfnbd_ring *ring)
{
	close(ring->fd);
	pthread_mutex_destroy(&ring->lock);
	free(ring->slots);
	free(ring->entries);
	free(ring);
}

int pfnbd_ring_fd(const struct pfnbd_ring *ring)
{
	return ring->fd;
}

void *pfnbd_ring_slot(struct pfnbd_ring *ring, uint32_t index)
{
	return index < ring->capacity ? &ring->slots[index] : NULL;
}

/* The ulp_io_handler: on the library's thread. */
void pfnbd_ring_handler(void *cbk_arg, int status)
{
	struct pfnbd_slot *slot = cbk_arg;
	struct pfnbd_ring *ring = slot->ring;
	int was_empty;
	pthread_mutex_lock(&ring->lock);
	if (ring->count == ring->capacity) { /* a slot completed twice: the library's bug, not ours to hide */
		pthread_mutex_unlock(&ring->lock);
		fprintf(stderr, "pfnbd_completions: ring full, completion of slot %u with status %d dropped\n",
			slot->index, status);
		return;
	}
	struct pfnbd_completion *entry = &ring->entries[(ring->head + ring->count) % ring->capacity];
	entry->slot = slot->index;
	entry->status = status;
	was_empty = ring->count++ == 0;
	pthread_mutex_unlock(&ring->lock);
	if (was_empty) {
		uint64_t one = 1;
		/* Cannot fail but at 2^64-1 pending wake-ups; EAGAIN then means "already readable". */
		(void)!write(ring->fd, &one, sizeof(one));
	}
}

/*
 * Takes up to `max` completions into `out`, oldest first, and returns how many.  Clears the
 * eventfd first: a completion appended after that signals it again, so a reader that drains
 * until it gets fewer than `max` misses none.
 */
uint32_t pfnbd_ring_drain(struct pfnbd_ring *ring, struct pfnbd_completion *out, uint32_t max)
{
	uint64_t ignored;
	(void)!read(ring->fd, &ignored, sizeof(ignored));
	pthread_mutex_lock(&ring->lock);
	uint32_t taken = ring->count < max ? ring->count : max;
	for (uint32_t i = 0; i < taken; i++)
		out[i] = ring->entries[(ring->head + i) % ring->capacity];
	ring->head = (ring->head + taken) % ring->capacity;
	ring->count -= taken;
	pthread_mutex_unlock(&ring->lock);
	return taken;
}
