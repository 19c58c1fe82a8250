/*
 * blkbench: the I/O side of perf's `blk_bench`, run identically in the
 * guest (on /dev/vdX, O_DIRECT so every operation reaches virtio-blk) and
 * on the host (on the image file). One process, no forks: on a nested,
 * emulated KVM host a guest fork costs ~0.5 s.
 *
 *   blkbench PATH OPS4K OPS1M [direct]
 *
 * prints one line per pattern:
 *   blkbench: <pattern> ops=<n> bytes=<b> seconds=<s> iops=<i> mbps=<m>
 * for randread4k, randwrite4k, seqread1m, seqwrite1m (QD1 each).
 * Writes go to the second half of the target only.
 * Build: cc -O2 -static -o blkbench blkbench.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next_rand(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static int run(int fd, const char *name, int write, int random, size_t bs,
	       long ops, uint64_t base, uint64_t span, char *buf)
{
	uint64_t blocks = span / bs;
	if (blocks == 0) {
		fprintf(stderr, "blkbench: target too small\n");
		return 1;
	}
	double t0 = now();
	for (long i = 0; i < ops; i++) {
		uint64_t block = random ? next_rand() % blocks : (uint64_t)i % blocks;
		off_t off = (off_t)(base + block * bs);
		ssize_t n = write ? pwrite(fd, buf, bs, off) : pread(fd, buf, bs, off);
		if (n != (ssize_t)bs) {
			perror("blkbench: I/O");
			return 1;
		}
	}
	if (write && fdatasync(fd) != 0) {
		perror("blkbench: fdatasync");
		return 1;
	}
	double s = now() - t0;
	double bytes = (double)ops * bs;
	printf("blkbench: %s ops=%ld bytes=%.0f seconds=%.4f iops=%.0f mbps=%.1f\n",
	       name, ops, bytes, s, ops / s, bytes / s / 1e6);
	fflush(stdout);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: blkbench PATH OPS4K OPS1M [direct]\n");
		return 2;
	}
	int flags = O_RDWR;
	if (argc > 4 && strcmp(argv[4], "direct") == 0)
		flags |= O_DIRECT;
	int fd = open(argv[1], flags);
	if (fd < 0) {
		perror("blkbench: open");
		return 1;
	}
	off_t size = lseek(fd, 0, SEEK_END);
	long ops4k = atol(argv[2]), ops1m = atol(argv[3]);
	char *buf;
	if (size <= 0 || posix_memalign((void **)&buf, 4096, 1 << 20) != 0)
		return 1;
	memset(buf, 0x5a, 1 << 20);
	uint64_t half = (uint64_t)size / 2;
	return run(fd, "randread4k", 0, 1, 4096, ops4k, 0, (uint64_t)size, buf) ||
	       run(fd, "randwrite4k", 1, 1, 4096, ops4k, half, half, buf) ||
	       run(fd, "seqread1m", 0, 0, 1 << 20, ops1m, 0, (uint64_t)size, buf) ||
	       run(fd, "seqwrite1m", 1, 0, 1 << 20, ops1m, half, half, buf);
}
