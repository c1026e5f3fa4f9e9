"""Files written under a temporary name get the permissions an ordinary ``open()`` would give them.

tempfile.mkstemp / mkdtemp (and safetensors' writer) create 0600 files and 0700 directories; renamed
into place they stay private, unreadable by colleagues on a shared filesystem. Call ``as_umask_allows``
on them before the rename.
"""

from __future__ import annotations

import os


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only set it,
    and setting it briefly would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def as_umask_allows(path: str | os.PathLike) -> None:
    """chmod ``path`` to what the umask gives a new file (0666 & ~umask) or directory (0777 & ~umask)."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())
