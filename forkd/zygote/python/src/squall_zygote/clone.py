"""A clone's duties right after the fork (``PROTOCOL.md``, "The child"), before it serves.

Only the forking thread survives a fork, and the clone inherits everything else of the
template: its descriptors, its random generators' state, the state of every lock. So the clone
closes what belongs to the template (``zygote.Template.be_clone`` does, as only it knows what
that is), arranges to die with forkd (watching forkd's lifeline, so that it outlives a template
that crashes) or else with the template, reseeds, and re-creates the locks of the logging handlers (a
lock held by a thread of the template at the fork would stay held for ever in the clone).
Threads start only after this, inside the server.
"""

import ctypes
import faulthandler
import logging
import os
import random
import signal
import stat
import sys
import threading

from .app import Clone

PR_SET_PDEATHSIG = 1
# The number of the descriptor, inherited from forkd, of the read end of a pipe only forkd
# writes to: it reads the end of file once forkd is gone.
LIFELINE_ENV = "SQUALL_ZYGOTE_LIFELINE"

_libc = ctypes.CDLL(None, use_errno=True)


def become(template_pid):
    """Does a freshly forked child's duties, once the template's own descriptors are closed
    (the zygote connection, the watches on other clones); :func:`name` then says which clone
    it is (at once, or when a spare clone is given its request)."""
    die_with(template_pid)
    reseed()
    renew_logging_locks()
    # A crash in the app (a segfault in an extension, say) prints the Python stack to stderr.
    faulthandler.enable()


def name(clone_id):
    """Makes this process clone ``clone_id`` (its environment, its responses' header)."""
    Clone.become(clone_id)


def die_with(template_pid):
    """Arranges for SIGKILL when forkd is gone, if forkd gave a lifeline; else when the
    template dies (exiting at once if it has died already)."""
    lifeline = inherited_lifeline()
    if lifeline is not None:
        threading.Thread(
            target=die_when_closed, args=(lifeline,), name="squall-lifeline", daemon=True
        ).start()
        return
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        print(
            f"squall-zygote: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(error)}", file=sys.stderr
        )
        os._exit(1)
    # The template may have died between the fork and the prctl: then the signal never comes.
    if os.getppid() != template_pid:
        os._exit(1)


def inherited_lifeline():
    """forkd's lifeline, if ``SQUALL_ZYGOTE_LIFELINE`` names an inherited pipe (the variable
    is removed, so that the app's own children do not look for it)."""
    value = os.environ.pop(LIFELINE_ENV, None)
    if value is None:
        return None
    try:
        fd = int(value)
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise OSError(f"descriptor {fd} is not a pipe")
        os.set_inheritable(fd, False)
    except (ValueError, OSError) as error:
        print(f"squall-zygote: {LIFELINE_ENV}={value!r}: {error}", file=sys.stderr)
        os._exit(1)
    return fd


def die_when_closed(fd):
    """Blocks on the lifeline until it reads the end of file (forkd is gone), then kills this
    process as a parent-death signal would."""
    while True:
        try:
            if not os.read(fd, 1):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    os.kill(os.getpid(), signal.SIGKILL)


def reseed():
    """Gives this clone random streams of its own.

    Python reseeds `random`'s global generator in a forked child already
    (`os.register_at_fork`); seeding it again from the OS is harmless and does not depend on
    it. `secrets`, `uuid.uuid4` and `os.urandom` read the kernel's generator, which needs
    nothing. NumPy's legacy global generator is not reseeded at fork, so it is here when the
    app loaded NumPy.
    """
    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        try:
            numpy.random.seed()
        except Exception as error:  # an odd NumPy: the clone still serves
            print(f"squall-zygote: could not reseed numpy.random: {error}", file=sys.stderr)


def renew_logging_locks():
    """Gives every handler of every logger a new, unheld lock. Python 3.9+ re-creates the locks
    of handlers it knows of at fork already; this also covers handlers made in ways that
    bypass `Handler.__init__`, and costs little."""
    loggers = [logging.getLogger()]
    loggers += [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            handler.createLock()
