"""Running containers: user and mount namespaces, image mounts, binds, environment."""
