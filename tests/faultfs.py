"""A FUSE passthrough file system that fails a seeded fraction of write, fsync and rename
calls with an errno (EIO by default): real I/O errors from a real file system, for
tests/test_faults.py. Every call goes to the directory underneath; nothing is faked but the
error codes.

    python tests/faultfs.py SOURCE MOUNTPOINT --seed 3 --fraction 0.05 --arm ARMFILE --log LOG
        [--errno EIO|ENOSPC|EROFS] [--ops write,fsync,fsyncdir,rename] [--paths ckpt-] [--skip N]
        [--arm-after ckpt-10.manifest.json]

Faults are injected only while ARMFILE exists (a test arms it once training is going, or the
file system itself does, the moment a rename onto a name ending in --arm-after has returned:
a test polling for that name from outside could arm one checkpoint late on a loaded machine) and
each injected fault is appended to LOG as `op path errno` (the test checks that the run's
message names one of them). Runs in the foreground until unmounted (`fusermount3 -u`).
Built on mfusepy (libfuse 3 through ctypes)."""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import random
import sys
import threading

import mfusepy as fuse

_libc = ctypes.CDLL(None, use_errno=True)


class FaultFS(fuse.Operations):
    use_ns = True

    def __init__(self, root: str, a: argparse.Namespace):
        self.root = os.path.realpath(root)
        self.random = random.Random(a.seed)
        self.fraction = a.fraction
        self.arm = os.path.abspath(a.arm)  # libfuse may chdir to /
        self.log = os.path.abspath(a.log)
        self.code = getattr(errno, a.errno)
        self.ops = set(a.ops.split(","))
        self.paths = a.paths
        self.skip = a.skip  # matching calls let through first, once armed
        self.arm_after = a.arm_after
        self._mutex = threading.Lock()

    # ------------------------------------------------------------ fault injection
    def _fault(self, op: str, path: str) -> None:
        """Raise the errno for this call if the file system is armed and the draw says so."""
        if op not in self.ops or self.paths not in path or not os.path.exists(self.arm):
            return
        with self._mutex:
            if self.skip > 0:
                self.skip -= 1
                return
            hit = self.random.random() < self.fraction
            if hit:
                with open(self.log, "a") as f:
                    f.write(f"{op} {path} {errno.errorcode[self.code]}\n")
        if hit:
            raise fuse.FuseOSError(self.code)

    def _renamed(self, new: str) -> None:
        if self.arm_after and new.endswith(self.arm_after):
            open(self.arm, "a").close()

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    # ------------------------------------------------------------ passthrough
    def access(self, path, amode):
        if not os.access(self._full(path), amode):
            raise fuse.FuseOSError(errno.EACCES)
        return 0

    def chmod(self, path, mode):
        os.chmod(self._full(path), mode)
        return 0

    def chown(self, path, uid, gid):
        os.chown(self._full(path), uid, gid)
        return 0

    def create(self, path, mode, fi=None):
        return os.open(self._full(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        self._fault("fsync", path)
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    def fsyncdir(self, path, datasync, fh):
        self._fault("fsyncdir", path)
        fd = os.open(self._full(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return 0

    def getattr(self, path, fh=None):
        st = os.lstat(self._full(path))
        keys = ("st_atime", "st_ctime", "st_mtime", "st_gid", "st_mode", "st_nlink", "st_size")
        out = {k: getattr(st, k) for k in keys}
        out["st_uid"] = st.st_uid
        for k in ("st_atime", "st_ctime", "st_mtime"):
            out[k] = getattr(st, k + "_ns")
        return out

    def link(self, target, source):
        os.link(self._full(source), self._full(target))
        return 0

    def mkdir(self, path, mode):
        os.mkdir(self._full(path), mode)
        return 0

    def mknod(self, path, mode, dev):
        os.mknod(self._full(path), mode, dev)
        return 0

    def open(self, path, flags):
        return os.open(self._full(path), flags)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._full(path))]

    def readlink(self, path):
        return os.readlink(self._full(path))

    def release(self, path, fh):
        os.close(fh)
        return 0

    def rename(self, old, new):
        self._fault("rename", old)
        os.rename(self._full(old), self._full(new))
        self._renamed(new)
        return 0

    def rename_with_flags(self, old, new, flags):
        """renameat2 with its flags (RENAME_EXCHANGE, RENAME_NOREPLACE) passed through."""
        self._fault("rename", old)
        a, b = os.fsencode(self._full(old)), os.fsencode(self._full(new))
        if _libc.renameat2(-100, a, -100, b, ctypes.c_uint(flags)) != 0:
            raise fuse.FuseOSError(ctypes.get_errno())
        self._renamed(new)
        return 0

    def rmdir(self, path):
        os.rmdir(self._full(path))
        return 0

    def statfs(self, path):
        st = os.statvfs(self._full(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files")
        return {k: getattr(st, k) for k in (*keys, "f_flag", "f_frsize", "f_namemax")}

    def symlink(self, target, source):
        os.symlink(source, self._full(target))
        return 0

    def truncate(self, path, length, fh=None):
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._full(path), length)
        return 0

    def unlink(self, path):
        os.unlink(self._full(path))
        return 0

    def utimens(self, path, times=None):
        os.utime(self._full(path), ns=times)
        return 0

    def write(self, path, data, offset, fh):
        self._fault("write", path)
        return os.pwrite(fh, data, offset)


class _FUSE(fuse.FUSE):
    """mfusepy drops renameat2's flags (it would turn an exchange into a plain rename):
    pass them through."""

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        old_s = old.decode(self.encoding, self.errors)
        new_s = new.decode(self.encoding, self.errors)
        if flags:
            return self.operations.rename_with_flags(old_s, new_s, flags)
        return self.operations.rename(old_s, new_s)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--arm", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--errno", default="EIO", choices=["EIO", "ENOSPC", "EROFS"])
    p.add_argument("--ops", default="write,fsync,fsyncdir,rename", help="calls that may fail")
    p.add_argument("--paths", default="", help="only paths containing this")
    p.add_argument("--skip", type=int, default=0, help="let the first N matching calls through")
    p.add_argument("--arm-after", default="", help="arm once a rename onto *NAME has returned")
    a = p.parse_args()
    _FUSE(FaultFS(a.source, a), a.mountpoint, foreground=True, nothreads=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
