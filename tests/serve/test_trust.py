"""Artifacts you can trust: signed with OpenSSF model-signing and refused when unsigned, signed by someone else
or changed since; edits that take turns under a lock; chat templates on a budget; adapter files that claim
more than they hold."""

from __future__ import annotations

import dataclasses
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_serve import ROOT, post, served

from spexport.artifact.files import CHAT_TEMPLATE
from spexport.artifact.integrity import sha256
from spexport.artifact.manifest import Manifest
from spexport.cli import main
from spexport.errors import ArtifactError, InputError
from spexport.runtime import load
from spexport.runtime.chat import Budget, ChatTemplate
from spexport.signing import SIGNATURE

NESTED = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    private = ec.generate_private_key(ec.SECP256R1())
    (folder / f"{name}.pem").write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
    (folder / f"{name}.pub").write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return folder / f"{name}.pem", folder / f"{name}.pub"


@pytest.fixture
def artifact(tiny_llama, tmp_path):
    return Path(shutil.copytree(tiny_llama["artifact"], tmp_path / "artifact"))


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def one_line_error(code: int, output: str, exit_code: int, text: str) -> None:
    assert code == exit_code and output.count("\n") == 1 and output.startswith("error: ") and text in output, output


def test_sign_verify_round_trip_and_refusals(artifact, tmp_path):
    mine, theirs = key_pair(tmp_path, "mine"), key_pair(tmp_path, "theirs")
    one_line_error(*cli("verify", artifact, "--key", mine[1]), 5, "is not signed")
    code, output = cli("sign", artifact, "--key", mine[0])
    assert code == 0 and (artifact / SIGNATURE).is_file(), output
    assert Manifest.read(artifact)  # the signature beside the sealed files leaves the seal intact
    assert cli("verify", artifact, "--key", mine[1]) == (0, f"{artifact}: signed by {mine[1]}, unchanged since\n")
    one_line_error(*cli("verify", artifact, "--key", theirs[1]), 5, "not by a trusted key")
    assert cli("verify", artifact, "--key", theirs[1], "--key", mine[1])[0] == 0
    load(artifact, trusted_keys=[mine[1]])
    with pytest.raises(ArtifactError, match="not by a trusted key"):
        load(artifact, trusted_keys=[theirs[1]])
    (artifact / "config.json").write_text((artifact / "config.json").read_text() + " ")
    one_line_error(*cli("verify", artifact, "--key", mine[1]), 5, "changed after it was signed (config.json differs)")
    with pytest.raises(ArtifactError, match="changed after it was signed"):
        load(artifact, trusted_keys=[mine[1]])


def test_a_file_added_or_removed_after_signing_is_a_change(artifact, tmp_path):
    mine = key_pair(tmp_path, "mine")
    cli("sign", artifact, "--key", mine[0])
    (artifact / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="changed after it was signed"):
        load(artifact, trusted_keys=[mine[1]])


def test_serve_refuses_an_untrusted_artifact_in_one_line(artifact, tmp_path):
    mine = key_pair(tmp_path, "mine")
    one_line_error(*cli("serve", artifact, "--trusted-key", mine[1]), 5, "is not signed")
    one_line_error(*cli("sign", artifact, "--key", mine[1]), 2, "cannot sign")  # a public key signs nothing


def test_add_signs_again_with_the_key_and_otherwise_warns(artifact, tmp_path, tiny_llama):
    mine = key_pair(tmp_path, "mine")
    cli("sign", artifact, "--key", mine[0])
    code, output = cli("add", artifact, "--adapter", f"again={tiny_llama['adapters']['pt']}", "--sign-key", mine[0])
    assert code == 0 and "warning" not in output, output
    load(artifact, trusted_keys=[mine[1]])
    code, output = cli("remove", artifact, "again")
    assert code == 0 and "warning: " in output and "removed the signature" in output, output
    assert not (artifact / SIGNATURE).exists()


def test_concurrent_adds_keep_both_tasks_and_loads_never_fail(artifact, tiny_llama, tmp_path):
    """The red team lost a task in 4 of 8 runs of two concurrent adds, and saw false damage reports."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    loader = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom spexport.runtime import load\nend = time.monotonic() + float(sys.argv[2])\n"
        "n = 0\nwhile time.monotonic() < end:\n    load(sys.argv[1]); n += 1\nprint(n)"), str(artifact), "20"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for round_ in range(3):
        adds = [subprocess.Popen([sys.executable, "-m", "spexport.cli", "add", str(artifact), "--adapter",
                                  f"{name}{round_}={tiny_llama['adapters'][name]}", "--quiet"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for name in ("pt", "prefix")]
        for add in adds:
            _, err = add.communicate(timeout=300)
            assert add.returncode == 0, err
        assert {f"pt{round_}", f"prefix{round_}"} <= set(load(artifact).tasks)
    out, err = loader.communicate(timeout=300)
    assert loader.returncode == 0 and int(out) > 0, err
    assert len(load(artifact).tasks) == 2 + 6


def test_the_next_writer_removes_staging_folders_of_killed_writers(artifact, tiny_llama):
    stale = artifact.parent / f".{artifact.name}.k1ll3d.partial"
    (stale / "adapters").mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half")
    held = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pathlib import Path\nfrom spexport.artifact.locks import hold_staging\n"
        "p = Path(sys.argv[1]); p.mkdir(); hold_staging(p); print('held', flush=True); time.sleep(60)"),
        str(artifact.parent / f".{artifact.name}.alive.partial")], stdout=subprocess.PIPE, text=True,
        env={"PYTHONPATH": str(ROOT)})
    try:
        assert held.stdout.readline().strip() == "held"
        assert cli("add", artifact, "--adapter", f"x={tiny_llama['adapters']['pt']}")[0] == 0
        assert not stale.exists()  # nobody held it
        assert (artifact.parent / f".{artifact.name}.alive.partial").exists()  # its writer still runs
    finally:
        held.kill()
        held.wait()


def test_a_nested_loop_template_is_a_one_line_error_within_seconds():
    started = time.monotonic()
    with pytest.raises(InputError, match="broke its budget") as caught:
        ChatTemplate(NESTED, {}).render([{"role": "user", "content": "x"}], add_generation_prompt=True)
    assert time.monotonic() - started < Budget.seconds + 1.5 and "\n" not in str(caught.value)
    for source in ["{{ 'x' * 10**9 }}", "{% for i in range(99999) %}{{ 'y' * 99999 }}{% endfor %}"]:
        with pytest.raises(InputError, match="broke its budget"):
            ChatTemplate(source, {}).render([{"role": "user", "content": "x"}], add_generation_prompt=True)


def hostile(artifact: Path) -> Path:
    """`artifact` with a nested-loop chat template, sealed as convert would have sealed it."""
    (artifact / CHAT_TEMPLATE).write_text(NESTED)
    manifest = Manifest.read(artifact)
    files = {**manifest.files, CHAT_TEMPLATE: sha256(artifact / CHAT_TEMPLATE)}
    dataclasses.replace(manifest, files=files, tokenizer_files=[*manifest.tokenizer_files, CHAT_TEMPLATE]
                        ).write(artifact)
    return artifact


def test_add_refuses_an_artifact_whose_template_breaks_its_budget(artifact, tiny_llama):
    one_line_error(*cli("add", hostile(artifact), "--adapter", f"x={tiny_llama['adapters']['pt']}"), 5,
                   "broke its budget")


def test_a_hostile_template_neither_hangs_the_server_nor_outlives_sigterm(artifact, tmp_path):
    with served(hostile(artifact), tmp_path) as (process, port):
        started = time.monotonic()
        status, answer = post(port, "/v1/chat/completions", {"model": "pt", "messages": [
            {"role": "user", "content": "hi"}]})
        assert status == 400 and "broke its budget" in answer["error"]["message"], answer
        assert time.monotonic() - started < 10
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0


def test_adapter_files_that_claim_more_than_they_hold_are_one_line_errors(artifact, tmp_path):
    with open(tmp_path / "huge.npy", "wb") as f:  # a header that promises 2 TB, then 64 bytes
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (8_000_000_000, 64)})
        f.write(bytes(64))
    np.save(tmp_path / "short.npy", np.zeros((3, 64), np.float32))
    data = (tmp_path / "short.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(data[:-64])
    for name in ("huge", "short"):
        one_line_error(*cli("add", artifact, "--adapter", f"x={tmp_path / name}.npy"), 4, "header promises")


def test_a_bin_adapter_on_a_runtime_only_install_is_a_one_line_error(artifact, tiny_llama, tmp_path):
    import torch
    from safetensors.torch import load_file

    adapter = Path(shutil.copytree(tiny_llama["adapters"]["pt"], tmp_path / "bin-adapter"))
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    done = subprocess.run([sys.executable, "-c", "import sys\nsys.modules['torch'] = None\n"
                           "from spexport.cli import main\nmain()", "add", str(artifact), "--adapter", f"x={adapter}"],
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 4 and done.stderr.count("\n") == 1, done.stderr
    assert "torch is not installed" in done.stderr and "Traceback" not in done.stderr
    assert load(artifact).tasks == ["pt", "prefix"]


def certificates(folder: Path, name: str) -> None:
    """A root CA (`name`-ca.pem) and a code-signing leaf under it (`name`-leaf.pem, key `name`-leaf.key)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
                 encipher_only=False, decipher_only=False)

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, **usage),
                                  critical=True))
        if not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    (folder / f"{name}-ca.pem").write_bytes(certificate(f"{name} root", ca_key, f"{name} root", ca_key, True))
    (folder / f"{name}-leaf.pem").write_bytes(certificate("signer", leaf_key, f"{name} root", ca_key, False))
    (folder / f"{name}-leaf.key").write_bytes(leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def test_certificate_mode_signs_offline_and_checks_the_chain(artifact, tmp_path):
    certificates(tmp_path, "ours")
    certificates(tmp_path, "other")
    code, output = cli("sign", artifact, "--key", tmp_path / "ours-leaf.key", "--certificate",
                       tmp_path / "ours-leaf.pem", "--certificate-chain", tmp_path / "ours-ca.pem")
    assert code == 0, output
    assert cli("verify", artifact, "--certificate-chain", tmp_path / "ours-ca.pem")[0] == 0
    one_line_error(*cli("verify", artifact, "--certificate-chain", tmp_path / "other-ca.pem"), 5,
                   "not by a trusted key")


def test_convert_refuses_a_template_that_breaks_its_budget(tiny_llama, tmp_path):
    from spexport.export import convert

    model_dir = Path(shutil.copytree(tiny_llama["model"], tmp_path / "model"))
    (model_dir / "chat_template.jinja").write_text(NESTED)
    started = time.monotonic()
    with pytest.raises(ArtifactError, match="broke its budget") as caught:
        convert(model_dir, [("pt", tiny_llama["adapters"]["pt"])], tmp_path / "artifact", optimize=False)
    assert "\n" not in str(caught.value) and time.monotonic() - started < 120
    assert not (tmp_path / "artifact").exists() and list(tmp_path.glob(".artifact*")) == []


def test_a_second_writer_waits_then_fails_clearly(artifact):
    import threading

    from spexport.artifact.locks import editing, lock_path
    from spexport.errors import OutputError

    entered = threading.Event()
    release = threading.Event()

    def first():
        with editing(artifact):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    entered.wait(10)
    with pytest.raises(OutputError, match="another spexport add, remove or reseal has been editing") as caught:
        with editing(artifact, wait_s=0.3):
            pass
    assert "\n" not in str(caught.value)
    release.set()
    thread.join()
    with editing(artifact, wait_s=1):  # free again once the first let go
        pass
    assert not lock_path(artifact).exists()
