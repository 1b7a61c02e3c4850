"""`spexport sign` and `spexport verify`: an artifact signed offline with OpenSSF model-signing."""

from __future__ import annotations

from pathlib import Path

import click

FILE = click.Path(path_type=Path)
SIGN_KEY = click.option("--sign-key", type=FILE, help="Private key (PEM) to sign the artifact again with; without "
                        "it, a signed artifact loses its signature.")


@click.command("sign")
@click.argument("folder", type=FILE)
@click.option("--key", required=True, type=FILE, help="Elliptic-curve private key (PEM) to sign with.")
@click.option("--certificate", type=FILE, help="Certificate mode: the key's signing certificate (PEM).")
@click.option("--certificate-chain", "chain", multiple=True, type=FILE,
              help="Certificate mode: a certificate of the chain up to the root (PEM); repeatable.")
def sign_command(folder: Path, key: Path, certificate: Path | None, chain: tuple[Path, ...]) -> None:
    """Sign the artifact FOLDER offline; the signature is written as spexport.sig inside it."""
    from spexport.signing import sign

    path = sign(folder, key, certificate, list(chain))
    click.echo(f"signed {folder}: {path}")


@click.command("verify")
@click.argument("folder", type=FILE)
@click.option("--key", "keys", multiple=True, type=FILE, help="A trusted public key (PEM); repeatable.")
@click.option("--certificate-chain", "chain", multiple=True, type=FILE,
              help="Certificate mode: a trusted certificate chain's certificates (PEM); repeatable.")
def verify_command(folder: Path, keys: tuple[Path, ...], chain: tuple[Path, ...]) -> None:
    """Check that FOLDER is signed by a trusted key and unchanged since; exit 5 if not."""
    from spexport.signing import verify

    signer = verify(folder, list(keys), list(chain))
    click.echo(f"{folder}: signed by {signer}, unchanged since")
