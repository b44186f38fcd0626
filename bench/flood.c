/* UDP sender for the bench, for rates a Python loop cannot reach: sendmmsg() in bursts.
 *
 *   flood COUNT RATE ADDR PORT SIZE      RATE 0 sends flat out
 *
 * Each payload starts with the send time (CLOCK_REALTIME ns, 8 bytes big-endian), as in
 * flood.py. Prints one JSON line: {"sent": N, "seconds": S}.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <endian.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BURST 64

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t real_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: flood COUNT RATE ADDR PORT SIZE\n");
        return 2;
    }
    long count = atol(argv[1]);
    double rate = atof(argv[2]);
    int port = atoi(argv[4]);
    size_t size = (size_t)atol(argv[5]);
    if (size < 8)
        size = 8;

    struct sockaddr_storage dst;
    socklen_t dlen;
    memset(&dst, 0, sizeof(dst));
    struct sockaddr_in *v4 = (struct sockaddr_in *)&dst;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&dst;
    if (inet_pton(AF_INET, argv[3], &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons(port);
        dlen = sizeof(*v4);
    } else if (inet_pton(AF_INET6, argv[3], &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(port);
        dlen = sizeof(*v6);
    } else {
        fprintf(stderr, "flood: bad address %s\n", argv[3]);
        return 2;
    }
    /* A sink bound to the destination that never reads: without it every datagram would
     * cost an ICMP port unreachable. Its full buffer drops them cheaply. */
    int sink = socket(dst.ss_family, SOCK_DGRAM, 0);
    if (sink < 0 || bind(sink, (struct sockaddr *)&dst, dlen) < 0) {
        perror("flood: sink");
        return 1;
    }
    int fd = socket(dst.ss_family, SOCK_DGRAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&dst, dlen) < 0) {
        perror("flood: socket");
        return 1;
    }

    static char bufs[BURST][65536];
    struct mmsghdr msgs[BURST];
    struct iovec iov[BURST];
    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < BURST; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = size;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }

    double t0 = mono();
    long sent = 0;
    /* Paced sending goes one packet at a time; flat out goes in bursts. */
    int burst = rate > 0 ? 1 : BURST;
    while (sent < count) {
        int n = count - sent < burst ? (int)(count - sent) : burst;
        uint64_t stamp = htobe64(real_ns());
        for (int i = 0; i < n; i++)
            memcpy(bufs[i], &stamp, 8);
        int done = sendmmsg(fd, msgs, n, 0);
        if (done < 0) {
            perror("flood: sendmmsg");
            return 1;
        }
        sent += done;
        if (rate > 0) {
            double wait = t0 + sent / rate - mono();
            if (wait > 0) {
                struct timespec ts = { (time_t)wait, (long)((wait - (time_t)wait) * 1e9) };
                nanosleep(&ts, NULL);
            }
        }
    }
    printf("{\"sent\": %ld, \"seconds\": %.6f}\n", sent, mono() - t0);
    return 0;
}
