"""The environment scripts every image carries, as capsid writes them.

A module of its own, with no imports: the runtime compares an image's scripts
with these on every start (see :func:`capsid.runtime.env.apply_stock_scripts`),
and :mod:`capsid.image.meta` writes them into every image it builds.
"""

#: PATH in a container whose image sets none
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: ``/.singularity.d/env`` file name → content (None: written per image).
ENV_SCRIPTS = {
    "01-base.sh": "#!/bin/sh\n# Base environment of every image; intentionally empty.\n",
    "10-docker2singularity.sh": None,  # written from an OCI config when there is one
    "90-environment.sh": "#!/bin/sh\n# Custom environment shell code should follow\n",
    "94-appsbase.sh": "",
    "95-apps.sh": """#!/bin/sh
# Set up the SCIF app named by $SINGULARITY_APPNAME, if any.
if [ -n "${SINGULARITY_APPNAME:-}" ]; then
    export SINGULARITY_APPNAME
    app="/scif/apps/$SINGULARITY_APPNAME"
    if [ ! -d "$app" ]; then
        echo "Could not locate the container application: $SINGULARITY_APPNAME" >&2
        exit 1
    fi
    SCIF_APPS=/scif/apps
    SCIF_APPROOT="$app"
    export SCIF_APPS SCIF_APPROOT
    PATH="$app:$PATH"
    [ -d "$app/bin" ] && PATH="$app/bin:$PATH"
    if [ -d "$app/lib" ]; then
        LD_LIBRARY_PATH="$app/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        export LD_LIBRARY_PATH
    fi
    for f in "$app/scif/env/01-base.sh" "$app/scif/env/90-environment.sh"; do
        [ -f "$f" ] && . "$f"
    done
    export PATH
    unset app f
fi
""",
    "99-base.sh": """#!/bin/sh
# Libraries bound in at run time (GPU drivers) come last on the search path.
LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/.singularity.d/libs"
PS1="${PS1:-Apptainer> }"
export LD_LIBRARY_PATH PS1
""",
    "99-runtimevars.sh": """#!/bin/sh
# PATH changes asked for on the command line (APPTAINERENV_PREPEND_PATH and friends).
if [ -n "${SING_USER_DEFINED_PREPEND_PATH:-}" ]; then
    PATH="$SING_USER_DEFINED_PREPEND_PATH:$PATH"
fi
if [ -n "${SING_USER_DEFINED_APPEND_PATH:-}" ]; then
    PATH="$PATH:$SING_USER_DEFINED_APPEND_PATH"
fi
if [ -n "${SING_USER_DEFINED_PATH:-}" ]; then
    PATH="$SING_USER_DEFINED_PATH"
fi
unset SING_USER_DEFINED_PREPEND_PATH SING_USER_DEFINED_APPEND_PATH SING_USER_DEFINED_PATH
export PATH
""",
}
