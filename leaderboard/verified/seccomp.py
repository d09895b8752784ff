"""A seccomp filter for sandboxed runs: the system calls an attack never needs fail with EPERM.

Namespaces and an unprivileged uid already stop most of what these calls could do; the filter
takes away the kernel surface itself (new namespaces, mounts, tracing, keys, eBPF, perf events,
userfaultfd, kernel modules). bubblewrap installs it (``--seccomp FD``) just before it starts the
command, so bwrap's own setup is unaffected. Built with pyseccomp (libseccomp) where it is
installed (``pip install 'ncbench[server]'``); :func:`program` yields None elsewhere, and
``ncbench server --check-sandbox`` says so.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

DENIED = (
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "open_by_handle_at",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
)
# clone() with any of these flags makes a namespace: CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC,
# NEWUSER, NEWPID, NEWNET, NEWTIME (linux/sched.h).
CLONE_NEW_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080)


def available() -> bool:
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, OSError):  # no binding, or no libseccomp for it to load
        return False
    return True


@contextlib.contextmanager
def program() -> Iterator[int | None]:
    """A file descriptor holding the compiled BPF filter, for ``bwrap --seccomp FD`` (closed on
    exit), or None where pyseccomp is not available."""
    if not available():
        yield None
        return
    import pyseccomp

    denied = pyseccomp.ERRNO(errno.EPERM)
    rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for name in DENIED:
        rules.add_rule(denied, name)
    for flag in CLONE_NEW_FLAGS:
        rules.add_rule(denied, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory a filter cannot read: ENOSYS makes libc fall back to clone.
    rules.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    fd = os.memfd_create("ncbench-seccomp")
    try:
        with os.fdopen(os.dup(fd), "wb") as handle:
            rules.export_bpf(handle)
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)
