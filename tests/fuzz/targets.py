"""Fuzz targets: every parser of untrusted bytes, behind one contract.

For any input, each target either returns (a correct result) or raises one
:class:`~capsid.errors.CapsidError`; any other exception is a bug. Memory and time
are bounded by whoever runs them: tests/unit/test_fuzz.py (hypothesis, a bounded
number of examples in CI) and scripts/fuzz.sh (atheris, coverage-guided, for minutes).
Inputs that once found a bug live in tests/fuzz/corpus/<target>/ and are replayed
by the tests.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

CORPUS = Path(__file__).parent / "corpus"


@contextlib.contextmanager
def as_file(data: bytes) -> Iterator[str]:
    """*data* as a path (a memfd), for APIs that open files by name."""
    fd = os.memfd_create("capsid-fuzz", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def sif_reader(data: bytes) -> None:
    """A SIF (or squashfs, or anything) given as an image: locate, list, header, metadata."""
    from capsid.cli import sif as sif_cli
    from capsid.image import meta, sif
    from capsid.image.locate import SIF, locate

    with as_file(data) as path:
        image = locate(path)
        if image.kind != SIF:
            return
        with sif.SifImage(path) as s:
            sif_cli.header_text(s)
            sif_cli.list_text(s)
            for d in s.descriptors:
                sif_cli.info_text(d)
            found = s.find(sif.DataType.GENERIC_JSON, "inspect-metadata.json")
            if found is not None:
                meta.Metadata.from_inspect_json(s.read(found))


def tar_layer(data: bytes) -> None:
    """An uncompressed layer through the flattener, in odd-sized chunks."""
    from capsid.image.flatten import Flattener

    out = io.BytesIO()
    flat = Flattener(out.write)
    flat.add_layer([data[i:i + 700] for i in range(0, len(data), 700)])
    flat.add_layer([data[: len(data) // 2]])  # the same stream cut short, as an older layer
    flat.finish()


def compressed_layer(data: bytes) -> None:
    """A layer of any compression: decompressed (bounded) and flattened."""
    from capsid.image.flatten import Flattener
    from capsid.oci import compression

    sink = io.BytesIO()
    total = 0

    def write(chunk: bytes | memoryview) -> None:
        nonlocal total
        total += len(chunk)
        if total > 64 << 20:
            raise _Enough
        sink.seek(0)
        sink.write(chunk)

    with contextlib.suppress(_Enough):
        Flattener(write).add_layer(compression.decompressed(io.BytesIO(data)))


class _Enough(Exception):
    """A bomb that inflated past what the target reads (memory stayed bounded)."""


def image_json(data: bytes) -> None:
    """An image config, a manifest and an index, as a registry or an archive serves them."""
    from capsid.oci import image as oci

    with contextlib.suppress(_capsid_error()):
        oci.image_config(data)
    doc = oci.load_json(data, "manifest")
    if oci.media_type(doc) in oci.INDEXES:
        oci.choose_platform(doc, ("amd64", ""), "fuzz")
    else:
        oci.manifest_parts(doc, "fuzz")


def docker_archive(data: bytes) -> None:
    """A docker save archive whose manifest.json is *data* (and a config from it, if named)."""
    from capsid.oci import archive

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in (("manifest.json", data), ("config.json", data),
                              ("layer.tar", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    with as_file(buf.getvalue()) as path:
        source = archive.docker_archive(path, ("amd64", ""))
        from capsid.oci.tosif import generated_files

        generated_files(source)


def archive_tar(data: bytes) -> None:
    """*data* itself as a docker or OCI archive (its tar index, then its JSON)."""
    from capsid.oci import archive

    with as_file(data) as path:
        for read in (archive.docker_archive, archive.oci_layout):
            with contextlib.suppress(_capsid_error()):
                read(path, ("amd64", ""))


def registries_conf(data: bytes) -> None:
    from capsid.oci import reference
    from capsid.oci.registries import Registries

    conf = Registries.parse(data.decode("utf-8", "replace"))
    for name in ("docker.io/library/busybox:1", "registry.lab:5000/a/b@sha256:" + "0" * 64):
        conf.endpoints(reference.parse(name))


def bind_specs(data: bytes) -> None:
    from capsid.runtime import binds

    text = data.decode("utf-8", "surrogateescape")
    binds.parse_bind(text)
    binds.parse_mount(text)


def env_file(data: bytes) -> None:
    from capsid.runtime import env

    with as_file(data) as path:
        env.read_env_file(path)
    env.parse_assignments(data.decode("utf-8", "surrogateescape").split("\n"), "--env")
    env.apply_stock_scripts({"10-docker2singularity.sh": data}, {"PATH": "/bin"})
    text = data.decode("utf-8", "surrogateescape")
    opts = env.EnvOptions(env=(f"V={text.replace(',', '')}",) if text else ())
    env.finished_env(opts, {}, {"PATH": "/bin"})  # evaluated as in the container


def site_config(data: bytes) -> None:
    from capsid import config

    with as_file(data) as path:
        config.load(path)


def image_reference(data: bytes) -> None:
    from capsid.oci import reference

    reference.parse(data.decode("utf-8", "surrogateescape"))


def dockerfile_recipe(data: bytes) -> None:
    """A Dockerfile, parsed with a build argument and a target."""
    from capsid.build import dockerfile

    text = data.decode("utf-8", "surrogateescape")
    dockerfile.parse(text, "Dockerfile", {"A": "1"})
    dockerfile.parse(text, "Dockerfile", {}).up_to("0")


def definition_file(data: bytes) -> None:
    """An Apptainer definition file, parsed with a build argument."""
    from capsid.build import deffile

    deffile.parse(data.decode("utf-8", "surrogateescape"), "x.def", {"a": "1"})


def elf_headers(data: bytes) -> None:
    """An ELF file of an image or a host (a libc.so.6, a driver library): its headers."""
    from capsid import elf, glibc

    with as_file(data) as path:
        try:
            info = elf.read(path)
        except elf.NotELF:
            return  # what elf.read says of anything it cannot read
        info.newest_glibc()
        glibc.glibc_of(info)
    elf.isa_level(data)


def cdi_spec(data: bytes) -> None:
    """A CDI spec file, as JSON and as YAML."""
    import tempfile

    from capsid.gpu import cdi

    with tempfile.TemporaryDirectory() as folder:
        for name in ("spec.json", "spec.yaml"):
            path = os.path.join(folder, name)
            with open(path, "wb") as f:
                f.write(data)
            with contextlib.suppress(cdi.SpecError):  # a CapsidError: try the other form too
                cdi.read_spec(path)


def instance_record(data: bytes) -> None:
    """A state file in the instances folder: read as untrusted, never followed."""
    import tempfile

    from capsid.runtime import instances

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed.json"
        path.write_bytes(data)
        found = instances._read(path)
        if found is not None:
            assert found.name == "fuzzed" and found.log_out == f"{folder}/logs/fuzzed.out"


def step_output(data: bytes) -> None:
    """What a build step leaves in $APPTAINER_ENVIRONMENT (read inside its directory)."""
    import tempfile

    from capsid import hostfs

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "environment").write_bytes(data)
        got = hostfs.read_in(folder, "environment", 4096)
        assert got == data


def _capsid_error() -> type[Exception]:
    from capsid.errors import CapsidError

    return CapsidError


_FUZZ_KEY: list[object] = []


def fuzz_key() -> object:
    """One Ed25519 key pair for the signature targets, made once."""
    if not _FUZZ_KEY:
        from capsid.signing import openpgp

        _FUZZ_KEY.append(openpgp.generate("Fuzz <fuzz@example.org>", 0))
    return _FUZZ_KEY[0]


def signed_sif(data: bytes) -> None:
    """A SIF with signatures (hostile ones too) verified: a report, never a crash."""
    from capsid.signing import sifsign

    with as_file(data) as path:
        result = sifsign.verify(Path(path), [fuzz_key()])  # type: ignore[list-item]
        assert isinstance(result.ok, bool)


def keyring(data: bytes) -> None:
    """A key file or keyring as 'capsid key import' reads it."""
    from capsid.signing import openpgp

    for key in openpgp.parse(data, "fuzz"):
        assert key.fingerprint and isinstance(key.user_ids, list)


def pem_file(data: bytes) -> None:
    """A PEM key file as sign --key and verify --key read it; and an envelope signed
    with whatever key it holds, verified."""
    from capsid.signing import dsse
    from capsid.signing.openpgp import NotVerified

    with as_file(data) as path:
        key = dsse.load_public(path)
    with contextlib.suppress(NotVerified):
        dsse.verify(data, [key])


def lower_squashfs(data: bytes) -> None:
    """Any bytes as the squashfs a build lays its steps over: merged, or refused."""
    from capsid.image import sqmerge
    from capsid.image.flatten import Cover

    upper = (CORPUS / "lower_squashfs" / "upper.sqfs").read_bytes()
    with as_file(data) as low, as_file(upper) as up, open(low, "rb") as lf, \
            open(up, "rb") as uf, open(os.devnull, "wb") as out, \
            contextlib.suppress(sqmerge.Unmergeable):
        sqmerge.merge(lf, 0, uf, out, Cover(frozenset({"etc/x"}), frozenset({"usr"}),
                                             frozenset(), ()))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "sif_reader": sif_reader, "tar_layer": tar_layer, "compressed_layer": compressed_layer,
    "image_json": image_json, "docker_archive": docker_archive, "archive_tar": archive_tar,
    "registries_conf": registries_conf, "bind_specs": bind_specs, "env_file": env_file,
    "site_config": site_config, "image_reference": image_reference,
    "dockerfile_recipe": dockerfile_recipe, "definition_file": definition_file,
    "elf_headers": elf_headers, "cdi_spec": cdi_spec, "instance_record": instance_record,
    "step_output": step_output, "signed_sif": signed_sif, "keyring": keyring,
    "lower_squashfs": lower_squashfs, "pem_file": pem_file,
}


def check(name: str, data: bytes) -> None:
    """Run target *name* on *data* under the contract: a result or one CapsidError."""
    try:
        TARGETS[name](data)
    except _capsid_error():
        pass


def seeds(name: str) -> list[bytes]:
    """The regression corpus of *name*: inputs that once found a bug."""
    directory = CORPUS / name
    return [p.read_bytes() for p in sorted(directory.iterdir())] if directory.is_dir() else []


def sif_seed() -> bytes:
    """A small valid SIF: a def file, inspect metadata and a (tiny, fake) squashfs partition."""
    import tempfile

    from capsid.image import meta, sif

    buf = io.BytesIO()
    metadata = meta.Metadata(labels={"a": "b"}, runscript="#!/bin/sh\n")
    with tempfile.NamedTemporaryFile() as part:
        part.write(b"hsqs" + bytes(92))
        part.flush()
        sif.write(buf, [sif.NewObject(sif.DataType.DEFFILE, b"bootstrap: scratch\n"),
                        sif.NewObject(sif.DataType.GENERIC_JSON, metadata.inspect_json(),
                                      "inspect-metadata.json"),
                        sif.NewObject.partition(Path(part.name), "amd64")], created_at=0)
    return buf.getvalue()


def tar_seed() -> bytes:
    """A layer with a directory, a file, a whiteout, links and a long name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind in (("d", tarfile.DIRTYPE), ("d/f", tarfile.REGTYPE),
                           (".wh.x", tarfile.REGTYPE), ("l", tarfile.SYMTYPE),
                           ("h", tarfile.LNKTYPE), ("d/" + "long" * 40, tarfile.REGTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "d/f" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            data = b"content" if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def starting_points(name: str) -> list[bytes]:
    """Valid inputs for *name* to mutate from, besides its regression corpus."""
    import gzip

    config = (b'{"architecture":"amd64","os":"linux","config":{"Env":["A=b"],"Labels":{"x":"y"},'
              b'"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:00"]}}')
    manifest = (b'[{"Config":"config.json","RepoTags":["a:b"],"Layers":["layer.tar"]}]')
    points = {
        "sif_reader": [sif_seed()], "tar_layer": [tar_seed()],
        "compressed_layer": [gzip.compress(tar_seed())], "image_json": [config],
        "docker_archive": [manifest], "archive_tar": [tar_seed()],
        "registries_conf": [b'[[registry]]\nprefix = "docker.io"\n[[registry.mirror]]\n'
                            b'location = "m:5000/x"\n'],
        "instance_record": [b'{"name": "fuzzed", "pid": 2, "image": "/x.sif", "started": 5, '
                            b'"log_out": "/etc/passwd", "log_err": "/etc/shadow", '
                            b'"created": 0.0, "userns": 3, "mntns": 4}'],
        "step_output": [b"export A=b\n"],
        "bind_specs": [b"/a:/b:ro,/c"], "env_file": [b"export A='b'\nC=\"d\"\n",
                                                     b'P="\\$PATH:/x" Q=${P:-$HOME}\n'],
        "site_config": [b"mount dev = minimal\nbind path = /a:/b\n"],
        "image_reference": [b"registry:5000/a/b:c@sha256:" + b"0" * 64],
        "dockerfile_recipe": [b"# escape=\\\nARG B=x\nFROM ${B} AS s\nENV A=b C=\"$A\"\n"
                              b"RUN <<EOF\necho\nEOF\nCOPY --from=s a b\nCMD [\"x\"]\n"],
        "definition_file": [b"Bootstrap: docker\nFrom: {{ a }}\n%post -c /bin/bash\n echo\n"
                            b"%files from s\n a b\n%labels\n A b\n"],
    }
    if name == "elf_headers":
        with open("/bin/true", "rb") as f:
            points["elf_headers"] = [f.read()]
    points["cdi_spec"] = [b'{"cdiVersion": "0.6.0", "kind": "a.b/c", "devices": [{"name": "0", '
                          b'"containerEdits": {"env": ["A=1"], "deviceNodes": [{"path": '
                          b'"/dev/null"}], "hooks": [{"hookName": "createContainer", "path": '
                          b'"/x", "args": ["x", "hook", "update-ldcache"]}]}}]}']
    return points.get(name, []) + seeds(name)


