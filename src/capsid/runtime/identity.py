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


def become(spec: str, environment: dict[str, str]) -> None:
    """Switch to ``USER[:GROUP]`` as the image's /etc/passwd and /etc/group name them.

    Called inside the container's root, just before the command: a user without a
    group takes their primary group, plus the groups that list them; HOME is theirs
    unless set. A name the image does not know is an error; numbers are taken as they are.
    """
    from capsid.errors import RuntimeSetupError

    name, _, group_name = spec.partition(":")
    users = _table("/etc/passwd")
    entry = next((f for f in users if name in (f[0], f[2])), None)
    if entry is None and not name.isdigit():
        raise RuntimeSetupError(f"USER {spec}: no user {name!r} in the image's /etc/passwd",
                                "create the user in an earlier step, or use numeric ids")
    uid = int(entry[2]) if entry else int(name)
    gid = int(entry[3]) if entry and entry[3].isdigit() else uid
    groups = _table("/etc/group")
    if group_name:
        found = next((f for f in groups if group_name in (f[0], f[2])), None)
        if found is None and not group_name.isdigit():
            raise RuntimeSetupError(f"USER {spec}: no group {group_name!r} in the image's "
                                    "/etc/group", "use a numeric group id")
        gid = int(found[2]) if found else int(group_name)
    member = entry[0] if entry else None
    extra = [int(f[2]) for f in groups if member and member in f[3].split(",")
             and f[2].isdigit()]
    if "HOME" not in environment:
        environment["HOME"] = entry[5] if entry and len(entry) > 5 else "/"
    try:
        os.setgroups(sorted({gid, *extra}))
        os.setgid(gid)
        os.setuid(uid)
    except OSError as err:
        raise RuntimeSetupError(f"USER {spec}: cannot become uid {uid} gid {gid}: "
                                f"{err.strerror}", "those ids are not mapped here") from None


def _table(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            rows = [line.rstrip("\n").split(":") for line in f]
    except OSError:
        return []
    return [row for row in rows if len(row) >= 4 and row[2].isdigit()]
