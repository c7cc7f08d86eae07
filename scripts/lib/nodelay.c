/* Preloaded into rathole by scripts/lib/small-requests.sh when RATHOLE_NODELAY=1, and by
 * relay-bench for its `rathole-nodelay` target (bench/src/tools.rs, `nodelay_shim`): sets
 * TCP_NODELAY on every TCP connection the process accepts or makes. rathole 0.5.0 sets it
 * on its control and data channels only, never on the visitor's connection nor on its
 * connection to the backend, so Nagle's algorithm holds a small write back until the
 * peer's delayed ACK (40 ms) when several HTTP/2 answers are in flight; its README says
 * TCP_NODELAY is on by default. For measuring rathole as documented
 * (docs/PERFORMANCE.md, the thirtieth round); the targets' ratios are to rathole as shipped. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static void nodelay(int fd) {
  int one = 1, saved = errno;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* fails harmlessly on non-TCP */
  errno = saved;
}

int accept4(int s, struct sockaddr *a, socklen_t *l, int flags) {
  static int (*real)(int, struct sockaddr *, socklen_t *, int);
  if (!real) real = dlsym(RTLD_NEXT, "accept4");
  int fd = real(s, a, l, flags);
  if (fd >= 0) nodelay(fd);
  return fd;
}

int accept(int s, struct sockaddr *a, socklen_t *l) {
  static int (*real)(int, struct sockaddr *, socklen_t *);
  if (!real) real = dlsym(RTLD_NEXT, "accept");
  int fd = real(s, a, l);
  if (fd >= 0) nodelay(fd);
  return fd;
}

int connect(int s, const struct sockaddr *a, socklen_t l) {
  static int (*real)(int, const struct sockaddr *, socklen_t);
  if (!real) real = dlsym(RTLD_NEXT, "connect");
  if (a && (a->sa_family == AF_INET || a->sa_family == AF_INET6)) nodelay(s);
  return real(s, a, l);
}
