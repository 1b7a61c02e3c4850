"""The `spexport` command line: thin commands over the library, one-line errors, exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from spexport.errors import SpexportError


def _adapter_spec(ctx, param, values: tuple[str, ...]) -> list[tuple[str, Path]]:
    specs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{value!r} is not NAME=PATH")
        specs.append((name, Path(path)))
    return specs


@click.group()
@click.version_option(package_name="spexport")
def main() -> None:
    """Export soft-prompted Hugging Face models to ONNX and serve them without torch."""


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Folder of the frozen Hugging Face model (config.json + weights).")
@click.option("--adapter", "adapters", multiple=True, required=True, callback=_adapter_spec,
              help="NAME=PATH of a PEFT soft-prompt adapter folder; repeat for more tasks.")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output folder.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
def convert(model_dir: Path, adapters, output: Path, overwrite: bool, quiet: bool) -> None:
    """Convert a frozen model and soft-prompt adapters into one ONNX artifact."""
    from rich.console import Console

    console = Console(stderr=True, quiet=quiet)
    with console.status("starting") as status:
        from spexport.export import convert as run_convert

        manifest = _guard(run_convert, model_dir, adapters, output, overwrite,
                          on_step=lambda step: status.update(step))
    for task in manifest.tasks:
        console.print(f"  {task.name}: {task.method}, {task.num_virtual_tokens} virtual tokens")
    console.print(f"wrote {output} ({len(manifest.tasks)} tasks)")


def _guard(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except SpexportError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
