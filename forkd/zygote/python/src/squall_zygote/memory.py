"""The template's large memory in huge pages, so that a fork stays cheap however much it holds.

A fork copies the template's page tables: one entry per 4 KiB page of its private memory, so
a template holding a 256 MiB table takes about 10 ms to fork, and one holding a 4 GiB model
over 100 ms, during which it answers no clone request. In 2 MiB pages the same memory is one
entry per 2 MiB, and the fork takes well under a millisecond. Clones still share the pages
copy-on-write: a clone that writes to one copies only the 4 KiB it writes (Linux splits the
huge page's mapping in that clone; since Linux 5.8).

:func:`collapse` asks Linux to move the template's large, fully resident private regions
into huge pages (``MADV_COLLAPSE``, Linux 6.1 and later), once, before the template says
``ready``. Where the kernel cannot, the template is left as it is.
"""

import ctypes
import errno
import time

MADV_COLLAPSE = 25
HUGE_PAGE = 2 << 20

#: Regions smaller than this are left alone: their fork costs little.
MIN_REGION = 16 << 20

#: A region is collapsed only when this share of it is resident already, so that filling
#: its holes cannot grow the template by much.
MIN_RESIDENT = 0.9

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class Collapsed:
    """What :func:`collapse` did: bytes moved into huge pages, in how many seconds, and why
    it stopped early if it did."""

    def __init__(self):
        self.regions = 0
        self.bytes = 0
        self.seconds = 0.0
        self.unsupported = None

    def __str__(self):
        if self.unsupported:
            return f"the kernel cannot collapse memory into huge pages ({self.unsupported})"
        return (
            f"{self.bytes >> 20} MiB of the template's memory moved into huge pages in "
            f"{self.seconds * 1e3:.0f} ms, so that forking it stays fast"
        )


def regions(smaps="/proc/self/smaps"):
    """The private, writable, anonymous regions worth collapsing, as (start, end) aligned
    to huge pages."""
    found = []
    with open(smaps) as text:
        current = None
        for line in text:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a region's header
                start, end = (int(x, 16) for x in fields[0].split("-"))
                anonymous = len(fields) == 5 or fields[5] == "[heap]"
                current = (start, end) if anonymous and fields[1].startswith("rw-p") else None
            elif current is not None and fields[0] == "Rss:":
                start, end = current
                current = None
                if int(fields[1]) * 1024 < MIN_RESIDENT * (end - start):
                    continue
                start = (start + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
                end &= ~(HUGE_PAGE - 1)
                if end - start >= MIN_REGION:
                    found.append((start, end))
    return found


def collapse():
    """Moves the template's large, resident private regions into huge pages; returns a
    :class:`Collapsed`."""
    done = Collapsed()
    started = time.monotonic()
    try:
        found = regions()
    except OSError as error:
        done.unsupported = f"/proc/self/smaps: {error.strerror}"
        return done
    done.regions = len(found)
    for start, end in found:
        if _libc.madvise(start, end - start, MADV_COLLAPSE) == 0:
            done.bytes += end - start
            continue
        error = ctypes.get_errno()
        if error == errno.EINVAL:  # before Linux 6.1, or huge pages disabled
            done.unsupported = "MADV_COLLAPSE: " + errno.errorcode.get(error, str(error))
            break
        # EAGAIN, ENOMEM: part of it could not be collapsed now; the rest still helps.
    done.seconds = time.monotonic() - started
    return done
