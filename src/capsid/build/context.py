"""The build context: which files a COPY names (globs, ``.dockerignore``) and their digest.

The digest covers names, modes, link targets and contents, so editing a copied file
(and nothing else) reruns the build from that COPY on.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import stat
from pathlib import Path

from capsid.errors import UsageError


class Context:
    """A build context directory and its ignore rules."""

    def __init__(self, root: Path, exclude: tuple[Path, ...] = ()) -> None:
        self.root = root.resolve()
        #: never part of the context: capsid's caches, when they lie inside it
        self.exclude = tuple(str(path.resolve()) for path in exclude)
        if not self.root.is_dir():
            raise UsageError(f"build context {root} is not a directory",
                             "give the directory with the files the recipe copies (--context)")
        self._ignore = self._read_ignore()

    def _read_ignore(self) -> list[tuple[bool, str]]:
        """``.dockerignore``, read as any source is: inside the context (a link out of it
        leads nowhere), a regular file only."""
        from capsid import hostfs

        path = self.root / ".dockerignore"
        try:
            data = hostfs.read_in(str(self.root), ".dockerignore", what=str(path))
        except hostfs.Refused as err:
            raise UsageError(err.message, f"replace {path} with a plain file of patterns"
                             ) from None
        except OSError as err:
            raise UsageError(f"cannot read {path}: {err.strerror}",
                             "make it readable, or remove it") from None
        rules = []
        if data is not None:
            for line in data.decode(errors="replace").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                negate = line.startswith("!")
                pattern = os.path.normpath(line.lstrip("!").strip("/"))
                rules.append((negate, pattern))
        return rules

    def ignored(self, rel: str) -> bool:
        """Whether context path *rel* is excluded by ``.dockerignore`` (the last rule wins)."""
        full = f"{self.root}/{rel}"
        if any(full == skip or full.startswith(skip + "/") for skip in self.exclude):
            return True
        excluded = False
        for negate, pattern in self._ignore:
            parts = rel.split("/")
            hit = any(fnmatch.fnmatchcase("/".join(parts[:n]), pattern)
                      for n in range(1, len(parts) + 1)) or fnmatch.fnmatchcase(rel, pattern)
            if pattern.startswith("**/"):
                hit = hit or fnmatch.fnmatchcase(rel, pattern[3:])
            if hit:
                excluded = not negate
        return excluded

    def sources(self, pattern: str, where: str) -> list[Path]:
        """The context paths *pattern* names (a glob), never outside the context."""
        rel = os.path.normpath(pattern.lstrip("/"))
        if rel == ".." or rel.startswith("../"):
            raise UsageError(f"{where}: {pattern} is outside the build context",
                             f"copy only files under {self.root}")
        if glob.has_magic(rel):
            found = [Path(p) for p in sorted(glob.glob(str(self.root / rel)))]
        else:
            found = [self.root / rel] if os.path.lexists(self.root / rel) else []
        found = [p for p in found if not self.ignored(str(p.relative_to(self.root)))
                 or p == self.root]
        for path in found:
            real = path.resolve()
            if real != self.root and self.root not in real.parents:
                raise UsageError(f"{where}: {pattern} leads outside the build context "
                                 f"(through a symbolic link)", f"copy only files under "
                                 f"{self.root}")
        if not found:
            raise UsageError(f"{where}: {pattern} does not exist in the build context "
                             f"{self.root}", "check the name, the context (--context) and "
                             ".dockerignore")
        return found

    def host_sources(self, pattern: str, where: str) -> list[Path]:
        """A definition file's ``%files`` source, as Apptainer copies it: a host path,
        absolute or relative to the current directory, globs expanded; not confined to
        the context (that is Docker's COPY rule). A relative one found only beside the
        recipe (the context) is taken from there."""
        found: list[Path] = []
        for base in (os.getcwd(), str(self.root)):
            path = os.path.join(base, os.path.expanduser(pattern))
            found = [Path(p) for p in sorted(glob.glob(path))] if glob.has_magic(pattern) \
                else ([Path(path)] if os.path.lexists(path) else [])
            if found or os.path.isabs(pattern):
                break
        if not found:
            raise UsageError(f"{where}: {pattern} does not exist on this machine",
                             "%files copies host paths: absolute, or relative to the "
                             "directory you build in")
        for each in found:
            if not os.access(each, os.R_OK):
                raise UsageError(f"{where}: you cannot read {each}",
                                 "make it readable, or copy another file")
        return found

    def digest(self, paths: list[Path]) -> str:
        """A digest of *paths* and everything under them that is not ignored."""
        h = hashlib.sha256()
        for path in paths:
            for entry in self._walk(path):
                rel = self._name(entry)
                info = entry.lstat()
                h.update(f"{rel}\0{stat.S_IMODE(info.st_mode):o}\0{stat.S_IFMT(info.st_mode)}"
                         "\0".encode())
                if stat.S_ISLNK(info.st_mode):
                    h.update(os.readlink(entry).encode())
                elif stat.S_ISREG(info.st_mode):
                    with open(entry, "rb") as f:
                        while block := f.read(1 << 20):
                            h.update(block)
                elif stat.S_ISDIR(info.st_mode) and entry == path:
                    pass
                h.update(b"\1")
        return h.hexdigest()

    def _name(self, entry: Path) -> str:
        """*entry*'s name in digests: relative inside the context, else as it is."""
        if entry == self.root:
            return "."
        return str(entry.relative_to(self.root)) if self.root in entry.parents else str(entry)

    def _walk(self, path: Path) -> list[Path]:
        found = [path]
        inside = path == self.root or self.root in path.parents
        target = path.resolve() if path.is_symlink() else path
        if target.is_dir():
            negations = any(negate for negate, _ in self._ignore)
            for dirpath, dirnames, filenames in os.walk(target):
                kept = []
                for name in sorted(dirnames + filenames):
                    full = Path(dirpath) / name
                    shown = path / full.relative_to(target)
                    if not inside or not self.ignored(str(shown.relative_to(self.root))):
                        found.append(full)
                        if name in dirnames:
                            kept.append(name)
                    elif name in dirnames and negations:
                        kept.append(name)  # a later '!' rule may bring files back
                dirnames[:] = kept
        return found
