"""Signed artifacts, on OpenSSF model-signing: who made an artifact, not only whether it is whole.

`sign` writes SIGNATURE inside the artifact folder: a Sigstore bundle over every other file's digest (the
manifest included), made offline with an elliptic-curve private key, or with a key and its certificate.
The signature is not among the files the manifest lists, so the manifest's seal is unchanged; and since
it covers the manifest, any later edit (a file, a task, the manifest) breaks it. `spexport add` and
`remove` drop it (or sign again with the key they are given).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from spexport.errors import ArtifactError, OptionError, SpexportWarning

SIGNATURE = "spexport.sig"


def _model_signing():
    try:
        import model_signing  # noqa: F401
        from model_signing import hashing, signing, verifying
    except ImportError as e:
        raise OptionError(f"signing needs model-signing ({e.name or e} is missing): pip install 'spexport[sign]'"
                          ) from None
    return hashing, signing, verifying


def _hashing_config(hashing, folder: Path):
    return hashing.Config().set_ignored_paths(paths=[folder / SIGNATURE], ignore_git_paths=False)


def sign(folder: str | Path, key: str | Path, certificate: str | Path | None = None,
         chain: list[str | Path] = ()) -> Path:
    """Sign the artifact at `folder` with the PEM private key `key` (and, in certificate mode, its
    `certificate` and the `chain` up to a root); returns the signature's path."""
    from spexport.artifact.manifest import Manifest

    folder = Path(folder)
    Manifest.read(folder)  # only an artifact is signed
    hashing, signing, _ = _model_signing()
    _readable(key, "private key")
    config = signing.Config()
    try:
        if certificate is None:
            config.use_elliptic_key_signer(private_key=key)
        else:
            config.use_certificate_signer(private_key=key, signing_certificate=_readable(certificate, "certificate"),
                                          certificate_chain=[_readable(c, "certificate chain") for c in chain])
        config.set_hashing_config(_hashing_config(hashing, folder))
        config.sign(folder, folder / SIGNATURE)
    except (ValueError, TypeError) as e:
        raise OptionError(f"cannot sign with {key} ({_one_line(e)}); give an elliptic-curve private key in PEM"
                          ) from None
    return folder / SIGNATURE


def verify(folder: str | Path, keys: list[str | Path] = (), chain: list[str | Path] = ()) -> str:
    """Check that one of `keys` (PEM public keys), or a certificate issued under `chain`, signed the artifact
    at `folder` as it is now; returns what signed it. ArtifactError if it is unsigned, signed by someone else,
    or changed after signing."""
    folder = Path(folder)
    signature = folder / SIGNATURE
    if not keys and not chain:
        raise OptionError("give a public key (or a certificate chain) to verify against")
    if not signature.is_file():
        raise ArtifactError(f"{folder} is not signed (no {SIGNATURE}); sign it with `spexport sign`, or load it "
                            "without trusted keys")
    hashing, _, verifying = _model_signing()
    errors = []
    for trusted in [*(("key", k) for k in keys), *((("chain", list(chain)),) if chain else ())]:
        config = verifying.Config()
        try:
            if trusted[0] == "key":
                config.use_elliptic_key_verifier(public_key=_readable(trusted[1], "public key"))
            else:
                config.use_certificate_verifier(certificate_chain=[_readable(c, "certificate") for c in trusted[1]])
            config.set_hashing_config(_hashing_config(hashing, folder))
            config.verify(folder, signature)
            return str(trusted[1])
        except Exception as e:  # model-signing and OpenSSL raise many types for "not this signer"
            errors.append(_one_line(e))
    changed = [e for e in errors if "mismatch" in e and not e.startswith("Key mismatch")]
    if changed:  # the key fits, the files do not
        found = re.search(r"[Hh]ash mismatch for \\?'([^'\\]+)|(Extra|Missing) files?[^;\"\]]{0,120}", changed[0])
        what = (f"{found.group(1)} differs" if found and found.group(1) else found.group(0)) if found else \
            changed[0][:200]
        raise ArtifactError(f"{folder} changed after it was signed ({what}); do not trust it")
    raise ArtifactError(f"{folder} is signed, but not by a trusted key ({', '.join(str(k) for k in keys) or 'chain'}); "
                        "do not trust it")


def signature_dropped(folder: Path, had_signature: bool, key: str | Path | None) -> None:
    """After an edit: sign again with `key`, or warn that the old signature is gone."""
    if key is not None:
        sign(folder, key)
    elif had_signature:
        warnings.warn(f"{folder} was signed, and editing it removed the signature; sign it again with "
                      "`spexport sign` (or pass --sign-key)", SpexportWarning, stacklevel=3)


def _readable(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file() or not os.access(path, os.R_OK):
        raise OptionError(f"{what} {path} is not a readable file")
    return path


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__
