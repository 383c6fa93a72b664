"""capsid sign, verify and key: Apptainer's signatures, checked both ways with the
reference Go SIF library (its pkg/integrity is what Apptainer calls), and refused for
every kind of tampering."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import GOLANG_SIF, REPO, need, one_error, run_capsid

TEST_KEY = GOLANG_SIF / "test" / "keys" / "private.asc"
DESCRIPTOR_SIZE = 585


@pytest.fixture(scope="session")
def gosign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/golang/sifsign built offline against Debian's Go sources (GOPATH mode; the
    library's /v2 import path is a link to its directory)."""
    need("go")
    if not GOLANG_SIF.is_dir():
        pytest.skip("golang-github-sylabs-sif-dev is not installed")
    out = tmp_path_factory.mktemp("gosign")
    gopath = out / "gopath"
    (gopath / "src" / "github.com" / "sylabs" / "sif").mkdir(parents=True)
    (gopath / "src" / "github.com" / "sylabs" / "sif" / "v2").symlink_to(GOLANG_SIF)
    shutil.copytree(REPO / "tests" / "golang" / "sifsign", gopath / "src" / "sifsign")
    env = dict(os.environ, GO111MODULE="off", GOPATH=f"{gopath}:/usr/share/gocode",
               GOCACHE=str(out / "cache"), HOME=str(out))
    subprocess.run(["go", "build", "-o", str(out / "sifsign"), "."],
                   cwd=gopath / "src" / "sifsign", env=env, check=True)
    return out / "sifsign"


@pytest.fixture
def keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty keyring of the test's own (and no Apptainer keyring to fall back on)."""
    directory = tmp_path / "keys"
    monkeypatch.setenv("CAPSID_KEYSDIR", str(directory))
    monkeypatch.setenv("APPTAINER_KEYSDIR", str(tmp_path / "no-apptainer-keys"))
    return directory


@pytest.fixture(scope="session")
def signable(busybox_sandbox: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox SIF with a definition file object, a labels object and the rest."""
    work = tmp_path_factory.mktemp("signable")
    root = work / "root"
    shutil.copytree(busybox_sandbox, root, symlinks=True)
    meta = root / ".singularity.d"
    meta.mkdir(exist_ok=True)
    (meta / "Singularity").write_text("Bootstrap: localimage\nFrom: busybox.sif\n")
    (meta / "labels.json").write_text('{"maintainer": "tests"}')
    run_capsid("build", work / "image.sif", root, check=True)
    return work / "image.sif"


@pytest.fixture
def image(signable: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "image.sif"
    shutil.copyfile(signable, copy)
    return copy


def imported(path: Path = TEST_KEY) -> str:
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    result = run_capsid("key", "import", path)
    assert result.returncode == 0, result.stderr
    return result.stderr.split("fingerprint ")[1].split()[0]


def objects(sif: Path) -> list[list[str]]:
    listing = run_capsid("sif", "list", sif, check=True).stdout.splitlines()[3:]
    return [[field.strip() for field in line.split("|")] for line in listing]


def test_keys_round_trip(keys: Path, tmp_path: Path) -> None:
    made = run_capsid("key", "newpair", "--name", "Ada Tester", "--email", "ada@example.org",
                      "--bit-length", "2048")
    assert made.returncode == 0, made.stderr
    fingerprint = made.stderr.split("Key created: ")[1].split()[0]
    assert oct((keys / "pgp-secret").stat().st_mode & 0o777) == "0o600"
    listed = run_capsid("key", "list", check=True).stdout
    assert fingerprint in listed and "Ada Tester <ada@example.org>" in listed
    assert fingerprint in run_capsid("key", "list", "--secret", check=True).stdout
    run_capsid("key", "export", "--armor", fingerprint, tmp_path / "pub.asc", check=True)
    assert (tmp_path / "pub.asc").read_text().startswith("-----BEGIN PGP PUBLIC KEY BLOCK")
    run_capsid("key", "remove", fingerprint, check=True)
    assert fingerprint not in run_capsid("key", "list", check=True).stdout
    run_capsid("key", "import", tmp_path / "pub.asc", check=True)
    assert fingerprint in run_capsid("key", "list", check=True).stdout
    offline = run_capsid("key", "search", "ada")
    assert "keyserver" in one_error(offline) and "export" in offline.stderr


def test_capsid_signature_verified_by_the_go_library(keys: Path, image: Path,
                                                     gosign: Path) -> None:
    fingerprint = imported()
    signed = run_capsid("sign", image)
    assert signed.returncode == 0, signed.stderr
    rows = objects(image)
    assert rows[-1][2].startswith("1") and "Signature (SHA-256)" in rows[-1][-1]
    check = subprocess.run([str(gosign), "verify", str(TEST_KEY), str(image)],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    ok, reported, *ids = check.stdout.split()
    assert (ok, reported) == ("ok", fingerprint)
    assert ids == [row[0] for row in rows if row[1] == "1"]
    verified = run_capsid("verify", image)
    assert verified.returncode == 0, verified.stderr
    assert fingerprint in verified.stdout and "Unit Test <unit@test.com>" in verified.stdout


def test_go_signature_verified_by_capsid(keys: Path, image: Path, gosign: Path) -> None:
    fingerprint = imported()
    subprocess.run([str(gosign), "sign", str(TEST_KEY), str(image)], check=True)
    result = run_capsid("verify", "--json", image)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["verified"] and [s["fingerprint"] for s in report["signatures"]] == \
        [fingerprint]
    group = [int(row[0]) for row in objects(image) if row[1] == "1"]
    assert report["signatures"][0]["objects"] == group


def test_two_groups_signed_by_go_verify(keys: Path, gosign: Path, tmp_path: Path) -> None:
    imported()
    image = tmp_path / "two.sif"
    shutil.copyfile(GOLANG_SIF / "test" / "images" / "two-groups.sif", image)
    subprocess.run([str(gosign), "sign", str(TEST_KEY), str(image)], check=True)
    report = json.loads(run_capsid("verify", "--json", image, check=True).stdout)
    assert sorted(s["group"] for s in report["signatures"]) == [1, 2]
    unsigned = run_capsid("verify", GOLANG_SIF / "test" / "images" / "one-group.sif")
    assert "not signed" in one_error(unsigned)


def test_golden_signed_images_are_read(keys: Path) -> None:
    """The library's own signed test images were signed in 2020 with a key whose only
    self-signature is from 2022: Sequoia, unlike Go's library, holds that the key was not
    valid when it signed. capsid reads them and says so in one line."""
    imported()
    for name in ("one-group-signed.sif", "two-groups-signed.sif"):
        result = run_capsid("verify", GOLANG_SIF / "test" / "images" / name)
        assert "does not verify" in one_error(result), result.stderr
        assert "12045C8C0B1004D058DE4BEDA20C27EE7FF7BA84" in result.stdout


def _descriptor_offset(sif: Path, object_id: int) -> int:
    with open(sif, "rb") as f:
        f.seek(64 + 8 * 4)  # descriptors_offset is the fifth int64 of the header
        table = struct.unpack("<q", f.read(8))[0]
    return table + (object_id - 1) * DESCRIPTOR_SIZE


def _flip(sif: Path, offset: int) -> None:
    with open(sif, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _object(sif: Path, type_label: str) -> tuple[int, int]:
    """(ID, data offset) of the first object whose type starts with *type_label*."""
    for row in objects(sif):
        if row[-1].startswith(type_label):
            return int(row[0]), int(row[3].split("-")[0])
    raise AssertionError(f"no {type_label} object")


@pytest.mark.parametrize("damage", ["root filesystem", "definition file", "descriptor",
                                    "signature deleted", "signature truncated"])
def test_tampering_is_found_and_named(keys: Path, image: Path, damage: str) -> None:
    imported()
    run_capsid("sign", image, check=True)
    if damage == "root filesystem":
        oid, start = _object(image, "FS (Squashfs")
        _flip(image, start + 5000)
        expect = f"object {oid} changed"
    elif damage == "definition file":
        oid, start = _object(image, "Def.FILE")
        _flip(image, start)
        expect = f"object {oid} changed"
    elif damage == "descriptor":
        oid, _ = _object(image, "JSON.Generic")
        _flip(image, _descriptor_offset(image, oid) + 4 + 1 + 12 + 8 * 7 + 2)  # its name
        expect = f"descriptor of object {oid} changed"
    elif damage == "signature deleted":
        sig, _ = _object(image, "Signature")
        _flip(image, _descriptor_offset(image, sig) + 4)  # its used flag
        expect = "group 1 is not signed"
    else:
        sig, start = _object(image, "Signature")
        with open(image, "r+b") as f:  # the armored signature loses its end
            f.seek(start)
            text = f.read(2000)
            cut = text.index(b"-----END PGP SIGNATURE")
            f.seek(start + cut - 40)
            f.write(b"\n" * 40)
        expect = "does not verify"
    result = run_capsid("verify", image)
    assert expect in one_error(result), result.stderr


def test_a_key_not_in_the_keyring(keys: Path, image: Path) -> None:
    fingerprint = imported()
    run_capsid("sign", image, check=True)
    run_capsid("key", "remove", fingerprint, check=True)
    assert "not in your keyring" in one_error(run_capsid("verify", image))


def test_signed_twice_by_two_keys_one_revoked(keys: Path, image: Path, tmp_path: Path) -> None:
    """Re-signing adds a signature; a revoked key's signature fails the whole image."""
    imported()
    run_capsid("sign", image, check=True)
    made = run_capsid("key", "newpair", "--name", "Second", "--bit-length", "2048",
                      check=True)
    second = made.stderr.split("Key created: ")[1].split()[0]
    run_capsid("sign", "--keyidx", "1", image, check=True)
    assert [row[-1] for row in objects(image)].count("Signature (SHA-256)") == 2
    both = json.loads(run_capsid("verify", "--json", image, check=True).stdout)
    assert [s["ok"] for s in both["signatures"]] == [True, True]
    # revoke the second key: a revocation made with its secret key, imported
    from capsid.signing import keyring, openpgp

    key = next(k for k in keyring.load(keyring.SECRET) if k.fingerprint == second)
    revocation = key.cert.revoke(key.secret.certifier())
    revoked = openpgp.parse(key.public_bytes() + bytes(revocation), "revoked")[0]
    assert revoked.revoked
    (tmp_path / "revoked.pgp").write_bytes(revoked.public_bytes())
    run_capsid("key", "import", tmp_path / "revoked.pgp", check=True)
    result = run_capsid("verify", "--json", image)
    assert result.returncode == 255
    report = json.loads(result.stdout)
    assert [s["ok"] for s in report["signatures"]] == [True, False]
    assert "revoked" in report["signatures"][1]["error"]


def test_bad_requests_are_one_line(keys: Path, image: Path, tmp_path: Path) -> None:
    assert "no secret key" in one_error(run_capsid("sign", image))
    imported()
    assert "--sif-id and --group-id" in one_error(run_capsid("sign", "-i", "1", "-g", "1",
                                                             image))
    assert "no object 99" in one_error(run_capsid("sign", "--sif-id", "99", image))
    assert "cannot read the private key" in one_error(run_capsid("sign", "--key",
                                                                 tmp_path / "k.pem", image))
    (tmp_path / "bad.pem").write_text("-----BEGIN PRIVATE KEY-----\nxx\n")
    assert "not a private key" in one_error(run_capsid("sign", "--key", tmp_path / "bad.pem",
                                                       image))
    assert "not a SIF" in one_error(run_capsid("verify", tmp_path / "none.sif"))
    garbage = tmp_path / "garbage.asc"
    garbage.write_text("not a key")
    assert "no OpenPGP key" in one_error(run_capsid("key", "import", garbage))


def _site(top: Path, mode: str, keys: list[str], dirpath: str = "") -> dict[str, str]:
    """A site configuration with an activated execution control list and a global
    keyring holding the test key; the environment that uses it."""
    tmp_path = top / f"site-{mode}-{len(keys)}-{dirpath.strip('/')}"
    tmp_path.mkdir()
    (tmp_path / "ecl.toml").write_text(
        "activated = true\n[[execgroup]]\n  tagname = \"site\"\n"
        f"  mode = \"{mode}\"\n  dirpath = \"{dirpath}\"\n  keyfp = {json.dumps(keys)}\n")
    global_keys = tmp_path / "global-pgp-public"
    from capsid.signing import openpgp

    key = openpgp.parse(TEST_KEY.read_bytes(), "test key")[0]
    global_keys.write_bytes(key.public_bytes())
    conf = tmp_path / "capsid.conf"
    conf.write_text(f"ecl file = {tmp_path / 'ecl.toml'}\nglobal keyring = {global_keys}\n")
    return {**os.environ, "CAPSID_CONFIG": str(conf)}


def test_execution_control_list(keys: Path, image: Path, tmp_path: Path) -> None:
    from tests.conftest import live_squashfuse

    fingerprint = imported()
    other = "0" * 40
    env = _site(tmp_path, "whitelist", [fingerprint, other])
    unsigned = run_capsid("exec", image, "true", env=env)
    assert "not signed" in one_error(unsigned) and "may not run" in unsigned.stderr
    assert not live_squashfuse(image)  # refused before anything was served or mounted
    run_capsid("sign", image, check=True)
    allowed = run_capsid("exec", image, "echo", "allowed", env=env)
    assert allowed.stdout == "allowed\n", allowed.stderr
    strict = _site(tmp_path, "whitestrict", [fingerprint, other])
    assert "all of its keys" in one_error(run_capsid("run", image, env=strict))
    banned = _site(tmp_path, "blacklist", [fingerprint])
    assert "forbids" in one_error(run_capsid("exec", image, "true", env=banned))
    elsewhere = _site(tmp_path, "whitelist", [fingerprint], dirpath="/opt")
    assert "no execgroup" in one_error(run_capsid("exec", image, "true", env=elsewhere))
    # a byte changed after signing: refused, whatever the mode
    _oid, start = _object(image, "FS (Squashfs")
    _flip(image, start + 4096)
    assert "changed" in one_error(run_capsid("exec", image, "true", env=env))
    # a list the site got wrong: one line, nothing run
    broken = _site(tmp_path, "greylist", [fingerprint])
    assert "execution control list" in one_error(run_capsid("exec", image, "true", env=broken))
    (tmp_path / "site-greylist-1-" / "ecl.toml").write_text("activated = true\n[[execgroup\n")
    assert "is invalid" in one_error(run_capsid("exec", image, "true", env=broken))


@pytest.mark.parametrize("kind", ["rsa", "ec", "ed25519"])
def test_pem_keys_sign_in_a_dsse_envelope(keys: Path, image: Path, tmp_path: Path,
                                          kind: str) -> None:
    """sign --key: a DSSE envelope (checked here against the specification with openssl,
    independently of capsid), verified with --key and refused with any other key."""
    need("openssl")
    algorithm = {"rsa": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
                 "ec": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
                 "ed25519": ["-algorithm", "ED25519"]}[kind]
    for name in ("key", "other"):
        subprocess.run(["openssl", "genpkey", *algorithm, "-out", str(tmp_path / f"{name}.pem")],
                       check=True, capture_output=True)
        subprocess.run(["openssl", "pkey", "-in", str(tmp_path / f"{name}.pem"), "-pubout",
                        "-out", str(tmp_path / f"{name}.pub")], check=True, capture_output=True)
    run_capsid("sign", "--key", tmp_path / "key.pem", image, check=True)
    sig, _ = _object(image, "Signature")
    envelope = json.loads(run_capsid("sif", "dump", str(sig), image, check=True).stdout)
    assert envelope["payloadType"] == "application/vnd.sylabs.sif-metadata+json"
    import base64

    body = base64.b64decode(envelope["payload"])
    assert json.loads(body)["version"] == 1
    kind_bytes = envelope["payloadType"].encode()
    pae = b"DSSEv1 %d %s %d %s" % (len(kind_bytes), kind_bytes, len(body), body)
    (tmp_path / "pae").write_bytes(pae)
    (tmp_path / "sig").write_bytes(base64.b64decode(envelope["signatures"][0]["sig"]))
    check = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "key.pub"),
             "-rawin", "-in", str(tmp_path / "pae"), "-sigfile", str(tmp_path / "sig")]
    if kind != "ed25519":  # RSA PKCS #1 v1.5 and ECDSA over SHA-256 of the encoding
        check = ["openssl", "dgst", "-sha256", "-verify", str(tmp_path / "key.pub"),
                 "-signature", str(tmp_path / "sig"), str(tmp_path / "pae")]
    done = subprocess.run(check, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert run_capsid("verify", "--key", tmp_path / "key.pub", image).returncode == 0
    assert "PEM key" in one_error(run_capsid("verify", image))
    wrong = run_capsid("verify", "--key", tmp_path / "other.pub", image)
    assert "no signature in it verifies" in one_error(wrong)
    _oid, start = _object(image, "FS (Squashfs")
    _flip(image, start + 100)
    assert "changed" in one_error(run_capsid("verify", "--key", tmp_path / "key.pub", image))


def _unsigned_part(sif: Path) -> bytes:
    """The bytes of *sif* before its signature, with what adding it changed (the header's
    counts and times, the signature's descriptor) blanked."""
    sig_id, start = _object(sif, "Signature")
    data = bytearray(sif.read_bytes()[:start])
    data[:128] = bytes(128)
    slot = _descriptor_offset(sif, sig_id)
    data[slot:slot + DESCRIPTOR_SIZE] = bytes(DESCRIPTOR_SIZE)
    return bytes(data)


def test_build_and_pull_sign_as_they_write(keys: Path, busybox_sandbox: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A signed build is reproducible but for its signature; pull --sign signs too."""
    fingerprint = imported()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    outs = [tmp_path / "one.sif", tmp_path / "two.sif"]
    for out in outs:
        built = run_capsid("build", "--sign", out, busybox_sandbox)
        assert built.returncode == 0, built.stderr
        report = json.loads(run_capsid("verify", "--json", out, check=True).stdout)
        assert [s["fingerprint"] for s in report["signatures"]] == [fingerprint]
    assert _unsigned_part(outs[0]) == _unsigned_part(outs[1])
    archive = Path(os.environ.get("CAPSID_TEST_CACHE", "/var/cache/capsid-test")) / "oci" / \
        "busybox.docker.tar"
    if archive.is_file():
        pulled = tmp_path / "pulled.sif"
        run_capsid("pull", "--keyidx", "0", pulled, f"docker-archive:{archive}", check=True)
        assert run_capsid("verify", pulled).returncode == 0
    refused = run_capsid("build", "--sandbox", "--sign", tmp_path / "dir", busybox_sandbox)
    assert "cannot be signed" in one_error(refused)


def test_fingerprints_header_of_a_localimage_base(keys: Path, image: Path,
                                                tmp_path: Path) -> None:
    """Fingerprints: (Apptainer's def file header) builds only from a base that verifies
    and that each listed key signed; it was read and ignored."""
    fingerprint = imported()

    def built(header: str) -> subprocess.CompletedProcess[str]:
        recipe = tmp_path / "on-signed.def"
        recipe.write_text(f"Bootstrap: localimage\nFrom: {image}\n{header}\n"
                          "%post\n    echo built > /built\n")
        return run_capsid("build", "--force", tmp_path / "out.sif", recipe)

    unsigned = built(f"Fingerprints: {fingerprint}")
    assert "does not verify" in one_error(unsigned) and not (tmp_path / "out.sif").exists()
    run_capsid("sign", image, check=True)
    ok = built(f"Fingerprints: {fingerprint.lower()}, # the test key")
    assert ok.returncode == 0, ok.stderr
    assert run_capsid("exec", tmp_path / "out.sif", "cat", "/built").stdout == "built\n"
    other = "0123456789ABCDEF0123456789ABCDEF01234567"
    refused = built(f"Fingerprints: {fingerprint},{other}")
    assert f"is not signed by {other}" in one_error(refused)
    run_capsid("key", "remove", fingerprint, check=True)
    assert "does not verify" in one_error(built(f"Fingerprints: {fingerprint}"))


def test_a_pulled_image_that_fails_its_signature_is_removed(keys: Path, image: Path) -> None:
    """What pull does with an oras:// SIF that carries signatures."""
    from capsid.cli import sign
    from capsid.errors import CapsidError

    imported()
    run_capsid("sign", image, check=True)
    sign.check_pulled(image)  # intact: kept
    assert image.exists()
    _oid, start = _object(image, "FS (Squashfs")
    _flip(image, start + 1)
    with pytest.raises(CapsidError, match="does not match its signature"):
        sign.check_pulled(image)
    assert not image.exists()


def test_an_expired_key(keys: Path, image: Path, tmp_path: Path) -> None:
    """A key that expired since it signed: its signatures no longer count."""
    import datetime
    import time

    from capsid.signing import keyring, openpgp

    made = run_capsid("key", "newpair", "--name", "Brief", "--bit-length", "2048", check=True)
    fingerprint = made.stderr.split("Key created: ")[1].split()[0]
    run_capsid("sign", image, check=True)
    key = keyring.load(keyring.SECRET)[0]
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=2)
    brief = key.cert.set_expiration(soon, key.secret.certifier())
    (tmp_path / "brief.pgp").write_bytes(openpgp.Key(brief).public_bytes())
    run_capsid("key", "import", tmp_path / "brief.pgp", check=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the expiry has passed
        result = run_capsid("verify", image)
        if result.returncode:
            break
        time.sleep(0.2)
    assert f"{fingerprint} has expired" in one_error(result)


def test_apptainers_keyring_is_read_while_capsid_has_none(image: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from capsid.signing import openpgp

    if not TEST_KEY.is_file():
        pytest.skip(f"{TEST_KEY} is absent")
    apptainer = tmp_path / "apptainer-keys"
    apptainer.mkdir()
    key = openpgp.parse(TEST_KEY.read_bytes(), "test key")[0]
    (apptainer / "pgp-secret").write_bytes(key.secret_bytes())
    (apptainer / "pgp-public").write_bytes(key.public_bytes())
    monkeypatch.setenv("APPTAINER_KEYSDIR", str(apptainer))
    monkeypatch.setenv("CAPSID_KEYSDIR", str(tmp_path / "capsid-keys"))
    run_capsid("sign", image, check=True)
    assert run_capsid("verify", image).returncode == 0
    listed = run_capsid("key", "list", check=True).stdout
    assert str(apptainer / "pgp-public") in listed and key.fingerprint in listed
    assert not (tmp_path / "capsid-keys").exists()  # nothing written until a change


def test_apptainers_dsse_golden_signs_capsids_metadata(keys: Path, shared_sifs: Path) -> None:
    """The SIF library's DSSE golden image: its envelope's payload is, byte for byte, the
    metadata capsid computes for the image (so capsid's envelopes carry what Apptainer
    checks), and without its key capsid says which kind of key it needs."""
    import base64

    from capsid.signing import integrity

    image = shared_sifs / "one-group-signed-dsse.sif"
    sig, _ = _object(image, "Signature")
    envelope = json.loads(run_capsid("sif", "dump", str(sig), image, check=True).stdout)
    assert envelope["payloadType"] == "application/vnd.sylabs.sif-metadata+json"
    fd = os.open(image, os.O_RDONLY)
    try:
        sif = integrity.Image(fd, str(image))
        assert base64.b64decode(envelope["payload"]) == integrity.metadata(sif, sif.group(1))
    finally:
        os.close(fd)
    assert "PEM key" in one_error(run_capsid("verify", image))
