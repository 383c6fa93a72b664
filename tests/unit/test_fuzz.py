"""Property tests of every parser of untrusted bytes (#10): for any input, a result or one
CapsidError. A bounded number of examples each here; scripts/fuzz.sh runs them for minutes."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import targets

#: examples per property: 150 in CI, the same ones every run; CAPSID_FUZZ_EXAMPLES=5000
#: for a longer, random look
EXAMPLES = settings(max_examples=int(os.environ.get("CAPSID_FUZZ_EXAMPLES", "150")),
                    deadline=None, derandomize="CAPSID_FUZZ_EXAMPLES" not in os.environ,
                    database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["config", "Env", "Labels", "Cmd", "rootfs", "diff_ids",
                                       "layers", "manifests", "digest", "size", "mediaType",
                                       "platform", "architecture", "Config", "Layers",
                                       "RepoTags", "schemaVersion", "created"]) | st.text(
                                           max_size=8), inner, max_size=5),
    max_leaves=20)


def _mutated(seed: bytes) -> st.SearchStrategy[bytes]:
    """*seed* with bytes overwritten, cut short or extended."""
    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(seed)
        for _ in range(draw(st.integers(0, 8))):
            if not data:
                break
            at = draw(st.integers(0, len(data) - 1))
            data[at:at + 8] = draw(st.binary(min_size=1, max_size=8))
        cut = draw(st.integers(0, len(data)))
        return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)
    return build()


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_regression_corpus(name: str) -> None:
    """Every input that once found a bug still gives a result or one CapsidError (and
    every target has inputs: a target without any would test nothing)."""
    found = targets.seeds(name)
    assert found, f"tests/fuzz/corpus/{name} holds no input"
    for data in found:
        targets.check(name, data)


@EXAMPLES
@given(st.one_of(_mutated(targets.sif_seed()), st.binary(max_size=2048)))
def test_sif_reader(data: bytes) -> None:
    targets.check("sif_reader", data)


@EXAMPLES
@given(st.one_of(_mutated(targets.tar_seed()), st.binary(max_size=4096)))
def test_tar_layer(data: bytes) -> None:
    targets.check("tar_layer", data)


def _compressed(kind: str) -> bytes:
    import gzip

    import zstandard

    layer = targets.tar_seed()
    return gzip.compress(layer) if kind == "gzip" else zstandard.ZstdCompressor().compress(layer)


@EXAMPLES
@given(st.sampled_from(["gzip", "zstd"]).flatmap(lambda kind: _mutated(_compressed(kind))))
def test_compressed_layer(data: bytes) -> None:
    targets.check("compressed_layer", data)


@EXAMPLES
@given(json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=256))
def test_image_json(data: bytes) -> None:
    targets.check("image_json", data)


@EXAMPLES
@given(json_values.map(lambda v: json.dumps(v).encode()))
def test_docker_archive(data: bytes) -> None:
    targets.check("docker_archive", data)


@EXAMPLES
@given(_mutated(targets.tar_seed()))
def test_archive_tar(data: bytes) -> None:
    targets.check("archive_tar", data)


_TOML = st.lists(st.sampled_from([
    "[[registry]]", 'prefix = "docker.io"', 'location = "mirror:5000/x"', "insecure = true",
    "blocked = true", "[[registry.mirror]]", 'pull-from-mirror = "digest-only"',
    'location = ""', "registry = 5", "mirror = 'x'", "[registry]", "prefix = 3"]), max_size=8)


@EXAMPLES
@given(_TOML.map(lambda lines: "\n".join(lines).encode()) | st.binary(max_size=128))
def test_registries_conf(data: bytes) -> None:
    targets.check("registries_conf", data)


@EXAMPLES
@given(st.text(alphabet=st.sampled_from("/:,=ab.ro;w\"' \\\0"), max_size=40).map(str.encode))
def test_bind_specs(data: bytes) -> None:
    targets.check("bind_specs", data)


@EXAMPLES
@given(st.text(alphabet=st.sampled_from("AB_=\"' #\nexport\\$\xe9{}:-+`();"), max_size=60).map(
    lambda t: t.encode("utf-8")) | st.binary(max_size=64))
def test_env_file(data: bytes) -> None:
    targets.check("env_file", data)


@EXAMPLES
@given(st.lists(st.sampled_from(["mount dev = minimal", "mount dev = x", "bind path = /a:/b",
                                 "mount home = no", "sessiondir max size = 12", "# c", "x",
                                 "sessiondir max size = -1", " = ", "mount tmp = "]),
                max_size=6).map(lambda lines: "\n".join(lines).encode()) | st.binary(max_size=64))
def test_site_config(data: bytes) -> None:
    targets.check("site_config", data)


@EXAMPLES
@given(st.text(alphabet=st.sampled_from("ab0/:.@-_Asha256"), max_size=80).map(str.encode))
def test_image_reference(data: bytes) -> None:
    targets.check("image_reference", data)


_DOCKERFILE = st.lists(st.sampled_from([
    "FROM a", "FROM a AS b", "ARG X=1", "ENV A=$X B=\"c d\"", "RUN echo $A \\", "RUN <<EOF",
    "EOF", "COPY --from=b x y", "COPY x", "WORKDIR ${A:-w}", "CMD [\"x\"", "SHELL x",
    "# escape=`", "LABEL a", "ADD --chmod=8 a b", "EXPOSE 80", "RUN --mount=type=cache",
    "${", "FROM ${NOPE}"]), max_size=10)


@EXAMPLES
@given(_DOCKERFILE.map(lambda lines: "\n".join(lines).encode()) | st.binary(max_size=128))
def test_dockerfile_recipe(data: bytes) -> None:
    targets.check("dockerfile_recipe", data)


_DEFFILE = st.lists(st.sampled_from([
    "Bootstrap: docker", "From: {{ a }}", "From: x", "Stage: s", "%post", "%post -c",
    "%files from", "%files", " a b c", ' "a', "%labels", " K V", "%arguments", " a=2",
    "%runscript", "#!/bin/bash", "%appinstall x", "Bootstrap: yum", "{{ b }}", "%test",
    "Include: x \\"]), max_size=10)


@EXAMPLES
@given(_DEFFILE.map(lambda lines: "\n".join(lines).encode()) | st.binary(max_size=128))
def test_definition_file(data: bytes) -> None:
    targets.check("definition_file", data)


def _elf_seed() -> bytes:
    with open("/bin/true", "rb") as f:
        return f.read()


@EXAMPLES
@given(st.one_of(_mutated(_elf_seed()), st.binary(max_size=512)))
def test_elf_headers(data: bytes) -> None:
    targets.check("elf_headers", data)


@EXAMPLES
@given(json_values.map(lambda v: json.dumps(
    {"cdiVersion": "0.6.0", "kind": "a.b/c", "devices": v}).encode())
    | json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=256))
def test_cdi_spec(data: bytes) -> None:
    targets.check("cdi_spec", data)


def _corpus(name: str, file: str) -> bytes:
    return (targets.CORPUS / name / file).read_bytes()


@EXAMPLES
@given(_mutated(_corpus("signed_sif", "go-signed.sif")))
def test_signed_sif(data: bytes) -> None:
    targets.check("signed_sif", data)


@EXAMPLES
@given(_mutated(_corpus("keyring", "public.asc")) | _mutated(_corpus("keyring", "secret.pgp")))
def test_keyring(data: bytes) -> None:
    targets.check("keyring", data)


@EXAMPLES
@given(_mutated(_corpus("lower_squashfs", "lower.sqfs")))
def test_lower_squashfs(data: bytes) -> None:
    targets.check("lower_squashfs", data)


@EXAMPLES
@given(_mutated(_corpus("pem_file", "ec.pub")) | _mutated(_corpus("pem_file", "ed25519.pem")))
def test_pem_file(data: bytes) -> None:
    targets.check("pem_file", data)
