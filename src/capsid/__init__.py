"""capsid: containers for HPC.

Build, convert and run Apptainer-compatible SIF images as an ordinary user.
The package is organised by stage of the data path: ``image`` (SIF, squashfs,
sandboxes), ``runtime`` (namespaces and mounts; :mod:`capsid.runtime.api` is its
library entry), ``gpu`` (what device support adds to a container), ``oci``
(registries and layers), ``build`` (recipes) on top, and ``cli`` as the thin front end.
"""

__version__ = "0.1.0"
