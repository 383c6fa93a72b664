"""OCI images: references, registries, the blob cache, archives, layers → SIF."""
