/*
 * connrate: a TCP connection-rate load generator small and fast enough that the kernel path,
 * not the generator, is what gets measured.
 *
 *   connrate server -a ADDR -p PORT [-t THREADS] [-d MAX_SECONDS]
 *       Accept and close, forever or until MAX_SECONDS (default 600) have passed: the server
 *       always stops by itself. Prints "ready" on stdout once it listens.
 *
 *   connrate client -a ADDR -p PORT [-t THREADS] [-d SECONDS] [-n MAX_CONNECTIONS]
 *       Each thread loops socket/connect/close until SECONDS (default 3) have passed or
 *       MAX_CONNECTIONS (default unlimited) are done, then prints one JSON line:
 *       {"connections":..,"errors":..,"seconds":..,"rate":..,"cpu_seconds":..,
 *        "first_error":".."}.
 *       close() with SO_LINGER {1, 0} sends an RST: no TIME_WAIT on either side, so the
 *       ephemeral ports never run out and conntrack entries go to CLOSE (short timeout).
 *
 * Build: gcc -O2 -pthread -o bench/bin/connrate bench/connrate.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 64

static struct sockaddr_in target;
static double deadline;           /* monotonic seconds */
static long max_conns;            /* 0 = no limit */
static atomic_long total_ok;
static atomic_long total_err;
static atomic_long claimed;        /* tickets against max_conns */
static atomic_int first_errno;
static int listen_fd = -1;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "connrate: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void *client_thread(void *arg) {
    (void)arg;
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    struct timeval tmo = {.tv_sec = 1, .tv_usec = 0};
    int one = 1;
    while (now() < deadline) {
        if (max_conns && atomic_fetch_add(&claimed, 1) >= max_conns) break;
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) die("socket");
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tmo, sizeof tmo); /* bounds connect() */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(fd, (struct sockaddr *)&target, sizeof target) == 0) {
            atomic_fetch_add(&total_ok, 1);
        } else {
            int expected = 0;
            atomic_compare_exchange_strong(&first_errno, &expected, errno);
            atomic_fetch_add(&total_err, 1);
            if (errno == EADDRNOTAVAIL) usleep(1000);
        }
        close(fd);
    }
    return NULL;
}

static void *server_thread(void *arg) {
    (void)arg;
    struct pollfd p = {.fd = listen_fd, .events = POLLIN};
    while (now() < deadline) {
        int r = poll(&p, 1, 200);
        if (r <= 0) continue;
        for (int i = 0; i < 256; i++) {
            int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
            if (fd < 0) break; /* EAGAIN: queue drained (another thread took it) */
            close(fd);
        }
    }
    return NULL;
}

static void usage(void) {
    fprintf(stderr,
            "usage: connrate server -a ADDR -p PORT [-t THREADS] [-d MAX_SECONDS]\n"
            "       connrate client -a ADDR -p PORT [-t THREADS] [-d SECONDS] [-n MAX]\n");
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    int server = strcmp(argv[1], "server") == 0;
    if (!server && strcmp(argv[1], "client") != 0) usage();
    const char *addr = NULL;
    int port = 0, threads = 1;
    double seconds = server ? 600 : 3;
    int opt;
    optind = 2;
    while ((opt = getopt(argc, argv, "a:p:t:d:n:")) != -1) {
        switch (opt) {
        case 'a': addr = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 't': threads = atoi(optarg); break;
        case 'd': seconds = atof(optarg); break;
        case 'n': max_conns = atol(optarg); break;
        default: usage();
        }
    }
    if (!addr || port <= 0 || port > 65535 || threads < 1 || threads > MAX_THREADS ||
        seconds <= 0 || seconds > 3600 || max_conns < 0)
        usage();
    memset(&target, 0, sizeof target);
    target.sin_family = AF_INET;
    target.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, addr, &target.sin_addr) != 1) usage();

    pthread_t tids[MAX_THREADS];
    if (server) {
        listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (listen_fd < 0) die("socket");
        int one = 1;
        setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(listen_fd, (struct sockaddr *)&target, sizeof target) < 0) die("bind");
        if (listen(listen_fd, 4096) < 0) die("listen");
        deadline = now() + seconds;
        printf("ready\n");
        fflush(stdout);
        for (int i = 0; i < threads; i++) pthread_create(&tids[i], NULL, server_thread, NULL);
        for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
        return 0;
    }

    double start = now();
    deadline = start + seconds;
    for (int i = 0; i < threads; i++) pthread_create(&tids[i], NULL, client_thread, NULL);
    for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
    double elapsed = now() - start;
    long ok = atomic_load(&total_ok), err = atomic_load(&total_err);
    int e = atomic_load(&first_errno);
    /* CPU time of this process (user + system, which includes the softirq work the kernel
     * does inline for our own packets): with other load on the machine, connections per
     * CPU-second stays comparable when connections per wall-second does not. */
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
                 (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    printf("{\"connections\":%ld,\"errors\":%ld,\"seconds\":%.6f,\"rate\":%.1f,"
           "\"cpu_seconds\":%.6f,\"first_error\":\"%s\"}\n",
           ok, err, elapsed, elapsed > 0 ? (double)ok / elapsed : 0.0, cpu,
           e ? strerror(e) : "");
    return 0;
}
