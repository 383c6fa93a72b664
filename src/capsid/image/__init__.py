"""Images: the SIF container format, squashfs filesystems, sandboxes and metadata."""
