"""What the runtime decides about a container's home, as a table (no namespaces needed).

Each row cites the Apptainer behaviour it follows (userdocs bind_paths_and_mounts,
container_linux.go addHomeMount): the home directory is decided in one place,
:func:`capsid.runtime.plan.home`.
"""

from __future__ import annotations

import pytest

from capsid import config
from capsid.runtime import identity, plan
from capsid.runtime.options import Options

USER = identity.User(1000, 1000, "ada", "ada", "", "/home/ada", "/bin/sh")
NO_HOME_SITE = config.SiteConfig(mount_home=False)

# (options, site mounts home, expected (source, destination, empty writable))
ROWS = [
    # default: the user's home, at its own path
    ({}, True, ("/home/ada", "/home/ada", False)),
    # --contain: an empty writable home in memory; nothing of the host's
    ({"contain": True}, True, (None, "/home/ada", True)),
    # explicit --home under --contain is bound (only the default one is dropped): cwltool
    ({"contain": True, "home": "/work/job:/var/lib/cwl/home"}, True,
     ("/work/job", "/var/lib/cwl/home", False)),
    ({"home": "/work/job"}, True, ("/work/job", "/work/job", False)),
    # --no-home, --no-mount home and the site's mount home = no: no home bound
    ({"no_home": True}, True, (None, "/home/ada", False)),
    ({"no_mount": ("home",)}, True, (None, "/home/ada", False)),
    ({}, False, (None, "/home/ada", False)),
    # --fakeroot: the user's home at /root ...
    ({"fakeroot": True}, True, ("/home/ada", "/root", False)),
    # ... and --no-mount home, --no-home and the site's choice hold with it too
    ({"fakeroot": True, "no_mount": ("home",)}, True, (None, "/root", False)),
    ({"fakeroot": True, "no_home": True}, True, (None, "/root", False)),
    ({"fakeroot": True}, False, (None, "/root", False)),
    ({"fakeroot": True, "contain": True}, True, (None, "/root", True)),
    ({"fakeroot": True, "home": "/work/job:/home/x"}, True, ("/work/job", "/home/x", False)),
    # a build step (root emulation, no home): /root, nothing bound
    ({"root_emulation": True, "no_home": True, "contain": True}, True, (None, "/root", False)),
]


@pytest.mark.parametrize(("options", "site_home", "expected"), ROWS)
def test_home(options: dict[str, object], site_home: bool,
              expected: tuple[str | None, str, bool]) -> None:
    site = config.SiteConfig() if site_home else NO_HOME_SITE
    assert plan.home(Options(**options), site, USER) == expected  # type: ignore[arg-type]
