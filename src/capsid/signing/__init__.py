"""SIF signatures as Apptainer makes and checks them: what is signed (``integrity``), the
OpenPGP keys and messages (``openpgp``), the keyrings on disk (``keyring``), and signing
and verifying an image (``sifsign``)."""
