"""GPUs and other devices in containers: what the host offers, and how it gets in.

- :mod:`.edits` -- the typed record of what device support adds to a container
- :mod:`.liblists` -- the site's lists of driver libraries, binaries and files
- :mod:`.legacy` -- ``--nv`` and ``--rocm`` as Apptainer does them (binds)
- :mod:`.cdi` -- ``--device vendor/class=name`` from Container Device Interface specs
- :mod:`.nvccli` -- ``--nvccli``: ``nvidia-container-cli configure`` does the work
- :mod:`.compat` -- will the bound libraries load in the image? Will its CUDA run?
"""
