"""The `spexport` command line: thin commands over the library, one-line errors, exit code 2."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import NoReturn

import click

from spexport.errors import SpexportError


def _adapter_spec(ctx, param, values: tuple[str, ...]) -> list[tuple[str, Path]]:
    specs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            _fail(f"--adapter {value!r} is not NAME=PATH, e.g. --adapter sentiment=adapters/sentiment")
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
              help="NAME=PATH of a PEFT soft-prompt adapter folder, or of a .npy/.safetensors prompt "
                   "tensor; repeat for more tasks.")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output folder.")
@click.option("--bake", is_flag=True, help="Bake the prompts into model.onnx; the graph takes task_ids.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
def convert(model_dir: Path, adapters, output: Path, overwrite: bool, bake: bool, quiet: bool) -> None:
    """Convert a frozen model and soft-prompt adapters into one ONNX artifact."""
    from rich.console import Console

    console = Console(stderr=True, quiet=quiet)
    with _one_line_errors(), console.status("starting") as status:
        from spexport.export import convert as run_convert

        manifest = run_convert(model_dir, adapters, output, overwrite, bake=bake,
                               on_step=lambda step: status.update(step))
    for task in manifest.tasks:
        console.print(f"  {task.name}: {task.method}, {task.num_virtual_tokens} virtual tokens", markup=False)
    console.print(f"wrote {output} ({len(manifest.tasks)} tasks)", markup=False, soft_wrap=True)


@contextlib.contextmanager
def _one_line_errors():
    """What a user caused ends as one line on stderr and exit code 2, after any spinner is cleared."""
    try:
        yield
    except SpexportError as e:
        _fail(str(e))


def _fail(message: str) -> NoReturn:
    click.echo("error: " + " ".join(message.splitlines()), err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
