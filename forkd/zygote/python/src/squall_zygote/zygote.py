"""The template's side of the zygote protocol (``forkd/zygote/PROTOCOL.md``).

The template connects to ``$SQUALL_ZYGOTE`` once warm and says ``ready``; then one loop waits,
with a selector, on the connection and on a pidfd per clone. ``clone <id>`` (with a listening
socket attached) makes a clone (see the spares below), whose child side never returns to this
loop; a clone's pidfd turning readable means it exited, and the template reaps it and reports
``exited``. At end of stream forkd is gone: the template kills its clones, reaps them and
exits.

A few clones are forked ahead (the *spares*, two by default): each does a clone's duties,
starts its server's request threads and primes the app, then waits on a socket pair for an id
and a listening socket. A ``clone`` request hands both to the oldest spare, answers ``forked``
with its pid, and only then forks a spare in its place; so a request costs neither a fork nor
a clone's start-up, and requests that come faster than one spare gets ready still find one
ready. A spare that dies waiting is reaped unreported; with none left, a request forks
directly.
"""

import collections
import os
import re
import selectors
import signal
import socket
import sys
import time
import traceback

from . import clone

MAX_MESSAGE = 4096

#: A clone id, as PROTOCOL.md defines it.
CLONE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

#: How long after a spare is taken the missing ones are forked, while one is left.
TOP_UP_DELAY = 0.005

#: The exit status of a clone whose server failed.
SERVER_FAILED = 70


def run(socket_path, server, spares=2):
    """Speaks the protocol on ``socket_path`` until forkd hangs up, keeping ``spares`` clones
    forked ahead; returns the exit status."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.connect(socket_path)
    conn.send(b"ready")
    template = Template(conn, server, spares)
    template.top_up()
    try:
        return template.loop()
    except KeyboardInterrupt:  # Ctrl-C in a terminal: the clones go too
        template.end()
        return 128 + signal.SIGINT


class Template:
    def __init__(self, conn, server, spares):
        self.conn = conn
        self.server = server
        self.pid = os.getpid()
        self.selector = selectors.DefaultSelector()
        self.selector.register(conn, selectors.EVENT_READ)
        self.clones = {}  # pid -> (clone id, pidfd); the id is None for a spare being reaped
        self.spare_count = spares
        self.spares = collections.deque()  # (pid, pidfd, control socket), oldest first
        self.top_up_at = None  # when to fork the missing spares (time.monotonic())

    def loop(self):
        while True:
            timeout = None
            if self.top_up_at is not None:
                timeout = self.top_up_at - time.monotonic()
                if timeout <= 0:
                    self.top_up()
                    continue
            for key, _ in self.selector.select(timeout):
                if key.fileobj is self.conn:
                    message, fds, _, _ = socket.recv_fds(self.conn, MAX_MESSAGE, 1)
                    for (
                        fd
                    ) in fds:  # received descriptors are inheritable: no child's child gets them
                        os.set_inheritable(fd, False)
                    if not message:
                        return self.end()
                    self.handle(message.decode("ascii", "replace"), fds)
                else:
                    self.reap(key.data)

    def handle(self, message, fds):
        words = message.split(" ")
        if len(words) != 2 or words[0] != "clone":
            for fd in fds:
                os.close(fd)
            print(
                f"squall-zygote: ignoring an unknown message from forkd: {message!r}",
                file=sys.stderr,
            )
            return
        clone_id = words[1]
        if not CLONE_ID.fullmatch(clone_id):
            for fd in fds:
                os.close(fd)
            print(
                f"squall-zygote: ignoring a clone request with a bad id: {message!r}",
                file=sys.stderr,
            )
            return
        if len(fds) != 1:
            self.send(f"failed {clone_id} no listening socket was attached")
            return
        self.fork(clone_id, fds[0])

    def fork(self, clone_id, listener_fd):
        if self.hand_to_spare(clone_id, listener_fd):
            self.top_up_soon()
            return
        try:
            pid = os.fork()
        except OSError as error:
            os.close(listener_fd)
            self.send(f"failed {clone_id} fork: {error.strerror or error}")
            return
        if pid == 0:
            os._exit(self.be_clone(clone_id, listener_fd))
        # The parent's copy goes at once, so that later clones do not inherit it.
        os.close(listener_fd)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as error:  # cannot watch it: do not keep a clone nobody can reap
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            self.send(f"failed {clone_id} pidfd_open: {error.strerror or error}")
            return
        self.clones[pid] = (clone_id, pidfd)
        self.selector.register(pidfd, selectors.EVENT_READ, pid)
        self.send(f"forked {clone_id} {pid}")
        self.top_up_soon()

    def hand_to_spare(self, clone_id, listener_fd):
        """Makes the oldest spare (the likeliest to be ready) clone ``clone_id``, giving it
        its socket; False if there is no spare that could take it (one that cannot is killed,
        and reaped unreported)."""
        while self.spares:
            pid, pidfd, control = self.spares.popleft()
            try:
                socket.send_fds(control, [clone_id.encode("ascii")], [listener_fd])
            except OSError:
                self.clones[pid] = (None, pidfd)  # reaped, unreported, when its pidfd says so
                os.kill(pid, signal.SIGKILL)
                continue
            finally:
                control.close()
            os.close(listener_fd)
            self.clones[pid] = (clone_id, pidfd)
            self.send(f"forked {clone_id} {pid}")
            return True
        return False

    def top_up_soon(self):
        """Tops the spares up now if none is left, else in ``TOP_UP_DELAY`` seconds (unless
        it is due sooner): the last clone's fork and start-up then do not compete for the
        CPU with its first requests, while a spare is still there for the next one."""
        if not self.spares:
            self.top_up()
        elif self.top_up_at is None:
            self.top_up_at = time.monotonic() + TOP_UP_DELAY

    def top_up(self):
        """Forks spares until there are as many as asked for; stops at the first that
        cannot be forked (the next request tries again)."""
        self.top_up_at = None
        while len(self.spares) < self.spare_count:
            if not self.make_spare():
                return

    def make_spare(self):
        """Forks the next clone ahead of its request: it does a clone's duties and starts its
        server's threads, then waits for an id and a socket (``hand_to_spare``). A clone
        request then costs no fork and no start-up, as a paused microVM's costs no boot.
        Returns whether a spare was made."""
        control, spare_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError as error:
            control.close()
            spare_end.close()
            print(f"squall-zygote: cannot fork a spare clone: {error}", file=sys.stderr)
            return False
        if pid == 0:
            control.close()
            os._exit(self.be_spare(spare_end))
        spare_end.close()
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            control.close()
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return False
        self.selector.register(pidfd, selectors.EVENT_READ, pid)
        self.spares.append((pid, pidfd, control))
        return True

    def be_spare(self, control):
        """The spare's side: ready itself, wait for its id and socket, then serve as that
        clone. Returns the exit status."""
        try:
            self.leave_template()
            clone.become(self.pid)
            prepared = self.server.prepare()
            message, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, 1)
            for fd in fds:
                os.set_inheritable(fd, False)
            control.close()
            if not message or len(fds) != 1:  # the template is gone, or ends
                return 0
            clone_id = message.decode("ascii")
        except KeyboardInterrupt:  # Ctrl-C in a terminal reaches the spare too: end quietly
            return 128 + signal.SIGINT
        except BaseException:
            print(
                f"squall-zygote: a spare clone failed:\n{traceback.format_exc().rstrip()}",
                file=sys.stderr,
            )
            return SERVER_FAILED
        return self.serve_as(clone_id, fds[0], prepared)

    def leave_template(self):
        """Closes, in a child, what belongs to the template: its connection, its selector,
        its watches on other clones, the spares' control sockets."""
        self.selector.close()
        self.conn.close()
        for _, pidfd in self.clones.values():
            os.close(pidfd)
        self.clones.clear()
        for _, pidfd, control in self.spares:
            os.close(pidfd)
            control.close()
        self.spares.clear()

    def be_clone(self, clone_id, listener_fd):
        """The child's side: never returns to the loop; returns the clone's exit status."""
        self.leave_template()
        clone.become(self.pid)
        return self.serve_as(clone_id, listener_fd, None)

    def serve_as(self, clone_id, listener_fd, prepared):
        """Serves as clone ``clone_id`` on ``listener_fd``; returns the exit status."""
        try:
            clone.name(clone_id)
            sock = socket.socket(fileno=listener_fd)
            self.server.serve_socket(sock, prepared)
            return 0
        except KeyboardInterrupt:  # Ctrl-C in a terminal reaches every clone: end quietly
            return 128 + signal.SIGINT
        except SystemExit as exit:  # the server's own way to stop: keep its status
            status = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            if status != 0:
                print(
                    f"squall-zygote: clone {clone_id}: the server exited with status {status}",
                    file=sys.stderr,
                )
            return status
        except BaseException:
            print(
                f"squall-zygote: clone {clone_id} failed:\n{traceback.format_exc().rstrip()}",
                file=sys.stderr,
            )
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        return SERVER_FAILED

    def reap(self, pid):
        for spare in self.spares:
            if spare[0] == pid:
                # A spare died waiting (its app failed to prepare, or it was killed): the next
                # request takes another, or forks a clone directly, and tops the spares up.
                self.spares.remove(spare)
                _, pidfd, control = spare
                control.close()
                self.selector.unregister(pidfd)
                os.close(pidfd)
                os.waitpid(pid, 0)
                return
        clone_id, pidfd = self.clones.pop(pid)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        if clone_id is None:  # a spare that could not take its request: never reported
            return
        code = os.waitstatus_to_exitcode(status)
        how = f"code {code}" if code >= 0 else f"signal {-code}"
        self.send(f"exited {clone_id} {how}")

    def send(self, message):
        try:
            self.conn.send(message.encode("ascii"))
        except OSError:
            pass  # forkd is gone: the end of stream ends the loop

    def end(self):
        """forkd hung up: no clone may outlive the template."""
        while self.spares:
            pid, pidfd, control = self.spares.popleft()
            control.close()
            self.clones[pid] = (None, pidfd)
        for pid in self.clones:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid, (_, pidfd) in self.clones.items():
            os.waitpid(pid, 0)
            os.close(pidfd)
        self.clones.clear()
        return 0
