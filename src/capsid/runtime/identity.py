"""Generated ``/etc/passwd`` and ``/etc/group`` that know the user running the container."""

from __future__ import annotations

import grp
import os
import pwd


class User:
    """The person running capsid, as the host knows them."""

    __slots__ = ("gecos", "gid", "group", "home", "name", "shell", "uid")

    def __init__(self, uid: int, gid: int, name: str, group: str, gecos: str, home: str,
                 shell: str) -> None:
        self.uid, self.gid, self.name, self.group = uid, gid, name, group
        self.gecos, self.home, self.shell = gecos, home, shell

    @classmethod
    def ids(cls) -> User:
        """The user by numbers only, without asking the passwd database."""
        uid, gid = os.getuid(), os.getgid()
        return cls(uid, gid, str(uid), str(gid), "", os.environ.get("HOME", "/"), "/bin/sh")

    @classmethod
    def current(cls) -> User:
        uid, gid = os.getuid(), os.getgid()
        try:
            entry = pwd.getpwuid(uid)
            name, gecos, home, shell = entry.pw_name, entry.pw_gecos, entry.pw_dir, entry.pw_shell
        except KeyError:
            name, gecos = str(uid), ""
            home, shell = os.environ.get("HOME", "/"), "/bin/sh"
        try:
            group = grp.getgrgid(gid).gr_name
        except KeyError:
            group = str(gid)
        return cls(uid, gid, name, group, gecos, home, shell)


def passwd(image_passwd: bytes | None, user: User, home: str) -> bytes:
    """The image's passwd with the user's entry added (or its home updated)."""
    lines = (image_passwd or b"").decode(errors="replace").splitlines()
    out, found = [], False
    for line in lines:
        fields = line.split(":")
        if len(fields) >= 7 and fields[2] == str(user.uid):
            fields[5] = home
            line, found = ":".join(fields), True
        out.append(line)
    if not found:
        shell = user.shell if user.shell else "/bin/sh"
        out.append(f"{user.name}:x:{user.uid}:{user.gid}:{user.gecos}:{home}:{shell}")
    return ("\n".join(out) + "\n").encode()


def group(image_group: bytes | None, user: User) -> bytes:
    """The image's group file with the user's primary group added when missing."""
    lines = (image_group or b"").decode(errors="replace").splitlines()
    if not any(line.split(":")[2:3] == [str(user.gid)] for line in lines):
        lines.append(f"{user.group}:x:{user.gid}:{user.name}")
    return ("\n".join(lines) + "\n").encode()
