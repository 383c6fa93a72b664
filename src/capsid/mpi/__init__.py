"""MPI: the host's MPI bound into containers (:mod:`.host`, ``--mpi host``).

Ranks sharing a container per node is the runtime's (:mod:`capsid.runtime.sharens`).
"""
