/*
 * vpcd-loopback: preloaded into the pcscd that serves netpurse's emulated
 * readers (LD_PRELOAD), it changes two things about the vsmartcard vpcd
 * driver's sockets, nothing else:
 *
 * - bind() of an IPv4 socket to INADDR_ANY binds to 127.0.0.1 instead. vpcd
 *   listens on every interface, so anyone on the network could connect as
 *   "the card" (impersonate it to whoever uses the reader) or, once our card
 *   is gone, take its place; the emulated cards connect from this machine
 *   only, so loopback is all vpcd needs.
 * - Every socket accept() returns gets TCP_NODELAY. vpcd writes a command
 *   APDU as a length and a body in two send()s; with Nagle's algorithm the
 *   second waits for the card's delayed ACK: about 48 ms per APDU instead
 *   of about 0.2 ms.
 *
 * pcscd itself binds no AF_INET socket (its own is a Unix socket), so the
 * rewrite only ever meets vpcd. netpurse-emulator builds this file at run
 * time into its pcscd folder (cc -shared -fPIC -O2 ... -ldl) and rebuilds it
 * when this source changes.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  static int (*real_bind)(int, const struct sockaddr *, socklen_t);
  if (!real_bind) real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
  if (!real_bind) {
    errno = ENOSYS;
    return -1;
  }
  if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
    struct sockaddr_in local;
    memcpy(&local, addr, sizeof local);
    if (local.sin_addr.s_addr == htonl(INADDR_ANY)) {
      local.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      return real_bind(fd, (const struct sockaddr *)&local, sizeof local);
    }
  }
  return real_bind(fd, addr, len);
}

int accept(int fd, struct sockaddr *addr, socklen_t *len) {
  static int (*real_accept)(int, struct sockaddr *, socklen_t *);
  if (!real_accept) real_accept = (int (*)(int, struct sockaddr *, socklen_t *))dlsym(RTLD_NEXT, "accept");
  if (!real_accept) {
    errno = ENOSYS;
    return -1;
  }
  int conn = real_accept(fd, addr, len);
  if (conn >= 0) {
    int one = 1;
    int saved = errno;
    /* Fails harmlessly on a Unix socket (pcscd's own clients). */
    setsockopt(conn, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    errno = saved;
  }
  return conn;
}
