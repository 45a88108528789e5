/* Parallel pread of one file region into memory (pinned staging buffers). */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* Regions smaller than this per thread are read by fewer threads. */
enum { MIN_BYTES_PER_THREAD = 4 << 20 };
/* One pread call at most this much (Linux caps a read near 2 GiB anyway). */
enum { MAX_READ = 1 << 30 };

/* One range [begin, end) of the region, read by one thread; the outcome stays
 * here so the calling thread can report the first failure in file order. */
typedef struct pread_part {
    int64_t begin, end;
    int64_t done; /* bytes read from begin */
    int err;      /* errno of a failed pread, 0 if none */
} pread_part;

typedef struct pread_job {
    int fd;
    uint64_t offset;
    uint8_t *dst;
    pread_part *parts;
} pread_job;

static void read_part(pread_part *p, const pread_job *job) {
    while (p->begin + p->done < p->end) {
        const int64_t at = p->begin + p->done;
        int64_t want = p->end - at;
        if (want > MAX_READ) want = MAX_READ;
        const ssize_t got = pread(job->fd, job->dst + at, (size_t)want, (off_t)(job->offset + (uint64_t)at));
        if (got < 0) {
            if (errno == EINTR) continue;
            p->err = errno;
            return;
        }
        if (got == 0) return; /* end of file */
        p->done += got;
    }
}

static void read_parts(void *arg, int64_t begin, int64_t end) {
    const pread_job *job = arg;
    for (int64_t i = begin; i < end; ++i) read_part(&job->parts[i], job);
}

enum { MAX_PARTS = 256 };

wanrt_status wanrt_pread(int fd, uint64_t offset, void *dst, uint64_t nbytes, int n_threads, uint64_t *n_read) {
    if (n_read) *n_read = 0;
    if (nbytes == 0) return WANRT_OK;
    if (dst == NULL || n_read == NULL) return wanrt_fail(WANRT_ERR_INVALID_ARGUMENT, "wanrt_pread: null pointer");
    if (fd < 0) return wanrt_fail(WANRT_ERR_INVALID_ARGUMENT, "wanrt_pread: invalid file descriptor %d", fd);
    if (nbytes > (uint64_t)INT64_MAX || offset > (uint64_t)INT64_MAX - nbytes) {
        return wanrt_fail(WANRT_ERR_INVALID_ARGUMENT, "wanrt_pread: %llu bytes at offset %llu overflow a file offset",
                          (unsigned long long)nbytes, (unsigned long long)offset);
    }
    if (n_threads <= 0) n_threads = wanrt_cpu_count();
    int64_t n_parts = (int64_t)(nbytes / MIN_BYTES_PER_THREAD);
    if (n_parts > n_threads) n_parts = n_threads;
    if (n_parts > MAX_PARTS) n_parts = MAX_PARTS;
    if (n_parts < 1) n_parts = 1;

    pread_part parts[MAX_PARTS];
    const int64_t total = (int64_t)nbytes;
    const int64_t part_len = (total + n_parts - 1) / n_parts;
    for (int64_t i = 0; i < n_parts; ++i) {
        const int64_t b = i * part_len;
        parts[i] = (pread_part){b, b + part_len < total ? b + part_len : total, 0, 0};
    }
    pread_job job = {fd, offset, dst, parts};
    wanrt_parallel_for(n_parts, 1, (int)n_parts, read_parts, &job);

    /* The bytes read without a gap from the start; the first part that fell short decides. */
    for (int64_t i = 0; i < n_parts; ++i) {
        const pread_part *p = &parts[i];
        if (p->begin + p->done == p->end) continue;
        *n_read = (uint64_t)(p->begin + p->done);
        const unsigned long long at = (unsigned long long)(offset + *n_read);
        if (p->err) {
            return wanrt_fail(WANRT_ERR_IO, "read failed at byte %llu: %s", at, strerror(p->err));
        }
        return wanrt_fail(WANRT_ERR_SHORT_READ, "end of file at byte %llu, %llu bytes short of byte %llu", at,
                          (unsigned long long)(nbytes - *n_read), (unsigned long long)(offset + nbytes));
    }
    *n_read = nbytes;
    return WANRT_OK;
}
