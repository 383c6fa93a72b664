"""The image state a build carries from step to step (capsid.build.state)."""

from __future__ import annotations

import pytest

from capsid.build.recipe import Config, Where
from capsid.build.state import ImageState

HERE = Where("Dockerfile", 1)


def step(key: str, value: object) -> Config:
    return Config(key, value, f"{key} {value}", HERE)


def test_configuration_steps_as_docker_applies_them() -> None:
    state = ImageState({"Env": ["PATH=/bin", "A=1"], "Cmd": ["sh"]}, "amd64")
    state.apply(step("Env", {"A": "2", "B": "3"}))
    state.apply(step("WorkingDir", "/srv"))
    state.apply(step("WorkingDir", "app"))  # relative to the last one
    state.apply(step("Entrypoint", ["/run.sh"]))  # resets an inherited CMD
    state.apply(step("Labels", {"x": "1"}))
    state.apply(step("Arg", {"V": "1"}))  # build arguments are not part of the image
    assert state.env == ["PATH=/bin", "A=2", "B=3"]
    assert state.variables() == {"PATH": "/bin", "A": "2", "B": "3"}
    assert state.workdir == "/srv/app"
    assert "Cmd" not in state.config and state.config["Entrypoint"] == ["/run.sh"]
    assert state.config["Labels"] == {"x": "1"} and "Arg" not in state.config


def test_copies_are_independent_and_round_trip() -> None:
    state = ImageState({"Env": ["A=1"]}, "arm64", "export X=1\n", {"k": "v"})
    copy = state.copy()
    copy.apply(step("Env", {"A": "9"}))
    copy.labels["k"] = "w"
    assert state.env == ["A=1"] and state.labels == {"k": "v"}
    assert ImageState.from_json(state.to_json()) == state


@pytest.mark.parametrize("stored", [[], "x", {"config": ["x"]}, {"labels": "x"},
                                    {"env91": 3}, {"architecture": ["amd64"]}])
def test_a_damaged_state_file_is_not_a_state(stored: object) -> None:
    with pytest.raises(ValueError):
        ImageState.from_json(stored)
