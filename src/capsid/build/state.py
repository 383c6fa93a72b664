"""The image state a build carries from step to step: the OCI configuration the
configuration steps change, and what ``%post`` adds to the environment and labels.

It is part of every cache key and is stored beside each cached step as
``state.json``; a file that does not read as a state is a cache miss.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capsid.build.recipe import Config


@dataclass
class ImageState:
    """The configuration after a step."""

    #: the ``config`` object of the OCI image configuration (Env, Cmd, WorkingDir, ...)
    config: dict[str, Any]
    architecture: str
    #: ``$APPTAINER_ENVIRONMENT`` as %post steps wrote it (becomes 91-environment.sh)
    env91: str = ""
    #: ``$APPTAINER_LABELS`` as %post steps wrote them
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> list[str]:
        """``NAME=value`` items, in order."""
        return [str(item) for item in self.config.get("Env") or []]

    def variables(self) -> dict[str, str]:
        return dict(item.partition("=")[::2] for item in self.env)

    @property
    def workdir(self) -> str:
        return str(self.config.get("WorkingDir") or "")

    @property
    def user(self) -> str:
        return str(self.config.get("User") or "")

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "architecture": self.architecture,
                "env91": self.env91, "labels": self.labels}

    def copy(self) -> ImageState:
        """A deep copy, for a stage or step that changes it."""
        return ImageState.from_json(json.loads(json.dumps(self.to_json())))

    @classmethod
    def from_json(cls, data: object) -> ImageState:
        """The state stored as *data*; ValueError if it is not one."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        config, labels = data.get("config") or {}, data.get("labels") or {}
        env91, arch = data.get("env91") or "", data.get("architecture") or ""
        if not (isinstance(config, dict) and isinstance(labels, dict)
                and isinstance(env91, str) and isinstance(arch, str)):
            raise ValueError("fields of the wrong type")
        return cls(config, arch, env91, {str(k): str(v) for k, v in labels.items()})

    def apply(self, step: Config) -> None:
        """A configuration step's effect (ENV, LABEL, WORKDIR, ENTRYPOINT, ...)."""
        config = self.config
        key, value = step.key, step.value
        if key == "Env":
            env = self.variables()
            env.update(value)  # type: ignore[call-overload]
            config["Env"] = [f"{k}={v}" for k, v in env.items()]
        elif key == "Labels":
            config["Labels"] = {**(config.get("Labels") or {}), **value}  # type: ignore[dict-item]
        elif key in ("ExposedPorts", "Volumes"):
            config[key] = {**(config.get(key) or {}), **value}  # type: ignore[dict-item]
        elif key == "WorkingDir":
            current = config.get("WorkingDir") or "/"
            config["WorkingDir"] = os.path.normpath(os.path.join(current, str(value)))
        elif key == "Entrypoint":
            config["Entrypoint"] = value
            config.pop("Cmd", None)  # an ENTRYPOINT resets an inherited CMD
        elif key == "Arg":
            pass  # build arguments are not part of the image
        elif key == "Healthcheck":
            config["Healthcheck"] = {"Test": shlex.split(str(value))}
        elif key == "OnBuild":
            config["OnBuild"] = [*(config.get("OnBuild") or []), value]
        else:
            config[key] = value
