"""The `spexport` command line: thin commands over the library, one-line errors with their exit codes.

`convert` and `validate` need the `[export]` extra; `inspect` and `run` need only the runtime, so
nothing heavy is imported at the top of this module. With --json a command prints one JSON
document on stdout and nothing else there.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import warnings
from pathlib import Path

import click

from spexport.cli_sign import SIGN_KEY, sign_command, verify_command
from spexport.cliparams import FiniteRange, NamedPath, SpexportGroup, stderr_console
from spexport.errors import ArtifactError, OptionError, SpexportWarning
from spexport.families import default_dtype
from spexport.serve.options import access_options, check_ray, limit_options, limits_from
from spexport.tables import inspect_lines, quantization_lines, table_lines, validate_failure, validate_lines

ARTIFACT = click.argument("folder", type=click.Path(path_type=Path))
QUIET = click.option("--quiet", is_flag=True, help="Print nothing but errors.")
AS_JSON = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout, nothing else.")
ADAPTERS_HELP = ("NAME=PATH of a PEFT soft-prompt adapter folder, or of a .npy/.safetensors prompt tensor; repeat for "
                 "more tasks.")
ADAPTERS = click.option("--adapter", "adapters", multiple=True, required=True, type=NamedPath(),
                        help=ADAPTERS_HELP)
ENSEMBLES = click.option("--ensemble", "ensembles", multiple=True,
                         help="NAME=TASK,TASK,...: a prompt ensemble of tasks trained for one job, served as NAME "
                              "(the mean of its members' probabilities); repeatable.")
MODEL = click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
                     help="Folder of the frozen Hugging Face model (config.json + weights).")
TRUST_REMOTE_CODE = click.option("--trust-remote-code", is_flag=True,
                                 help="Run Python code that the model folder ships (auto_map in config.json); "
                                      "without it such a model is refused.")


@click.group(cls=SpexportGroup)
@click.version_option(package_name="spexport")
def main() -> None:
    """Export soft-prompted Hugging Face models to ONNX and serve them without torch."""


@main.command()
@MODEL
@ADAPTERS
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing artifact (only a folder whose spexport.json says it is one).")
@click.option("--bake", is_flag=True, help="Bake the prompts into model.onnx; the graph takes task_ids.")
@click.option("--optimize/--no-optimize", default=True, show_default=True,
              help="Fuse norms, activations and rotary embeddings into ONNX Runtime operators.")
@click.option("--writer", type=click.Choice(["auto", "direct", "trace"]), default="auto", show_default=True,
              help="Decoders: write the graph from the weights (direct, fused operators) or trace it with torch.onnx; "
              "auto writes directly the layers spexport knows, unless --no-optimize.")
@click.option("--quantize", type=click.Choice(["int8", "int4", "int4-exact"]),
              help="Block-wise 8- or 4-bit weights for every matrix product (CPU); int4-exact keeps a GGUF Q4_1 "
              "checkpoint's float block minimums. Prints the drift from float32.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), help="[default: float16 with --device cuda]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", help="Where it will run.")
@ENSEMBLES
@TRUST_REMOTE_CODE
@QUIET
@AS_JSON
def convert(model_dir: Path, adapters, output: Path, overwrite: bool, ensembles: tuple[str, ...], quiet: bool,
            as_json: bool, device: str, **choices) -> None:
    """Convert a frozen model and soft-prompt adapters into one ONNX artifact."""
    from rich.console import Console

    from spexport.inspection import summary

    console = Console(stderr=True, quiet=quiet)
    with _terminated_as_interrupted(), _one_line_warnings(console), \
            _steps(console, expected=len(adapters) + 3) as on_step, _stdout_to_stderr():
        from spexport.ensembles import parse_specs
        from spexport.export import ExportOptions
        from spexport.export import convert as run_convert

        choices["dtype"] = choices["dtype"] or default_dtype(model_dir, device, choices["quantize"])
        # bake, optimize, writer, quantize, dtype, trust_remote_code: one options object from here to the passes
        options = ExportOptions(**choices, ensembles=parse_specs(ensembles), on_step=on_step)
        manifest = run_convert(model_dir, adapters, output, overwrite, options=options)
    if as_json:
        _print_json({"output": str(output), **summary(manifest), "files": manifest.files})
        return
    for task in manifest.tasks:
        console.print(f"  {task.name}: {task.method}, {task.num_virtual_tokens} virtual tokens", markup=False)
    if manifest.quantization:
        for line in quantization_lines(manifest.quantization):
            console.print(line, markup=False, soft_wrap=True)
    console.print(f"wrote {output} ({len(manifest.tasks)} tasks)", markup=False, soft_wrap=True)


@contextlib.contextmanager
def _steps(console, expected: int):
    """A progress bar over export steps. Their number is known only roughly up front (a multitask
    adapter adds tasks), so the total grows when the steps outrun it and the bar never goes back."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()]
    # off a terminal (a pipe, a CI log) a live bar would only leave stray lines behind
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        bar = progress.add_task("starting", total=expected)
        done = -1

        def on_step(step: str) -> None:
            nonlocal done
            done += 1
            progress.update(bar, description=step, completed=done, total=max(expected, done + 1))

        yield on_step
        progress.update(bar, completed=max(expected, done + 1), total=max(expected, done + 1))


@main.command("add")
@ARTIFACT
@click.option("--adapter", "adapters", multiple=True, type=NamedPath(), help=ADAPTERS_HELP)
@ENSEMBLES
@click.option("--replace", is_flag=True, help="Replace tasks or ensembles of the same names instead of refusing them.")
@SIGN_KEY
@QUIET
@AS_JSON
def add_command(folder: Path, adapters, ensembles, replace: bool, sign_key: Path | None, quiet: bool,
                as_json: bool) -> None:
    """Add tasks (decoder, seq2seq) or ensembles (any artifact) in place, without torch; a failure changes nothing."""
    from spexport.ensembles import parse_specs
    from spexport.tasks import add_tasks, change_ensembles

    before = _task_names(folder)
    with _terminated_as_interrupted(), _one_line_warnings(stderr_console(quiet)):
        if not adapters and not ensembles:
            raise OptionError("give the tasks to add (--adapter NAME=PATH) or ensembles (--ensemble NAME=TASK,...)")
        ensembles = parse_specs(ensembles)
        manifest = add_tasks(folder, adapters, replace, sign_key=sign_key, ensembles=ensembles) if adapters else \
            change_ensembles(folder, ensembles, replace=replace, sign_key=sign_key)
    _report_tasks(folder, manifest, before, quiet, as_json)


@main.command("remove")
@ARTIFACT
@click.argument("names", nargs=-1)
@click.option("--ensemble", "ensembles", multiple=True, help="Remove the ensemble of this name; repeatable.")
@SIGN_KEY
@QUIET
@AS_JSON
def remove_command(folder: Path, names: tuple[str, ...], ensembles: tuple[str, ...], sign_key: Path | None,
                   quiet: bool, as_json: bool) -> None:
    """Remove tasks NAMES (decoder, seq2seq; later ids move down) or ensembles (any artifact) in place."""
    from spexport.tasks import change_ensembles, remove_tasks

    before = _task_names(folder)
    with _terminated_as_interrupted(), _one_line_warnings(stderr_console(quiet)):
        if not names and not ensembles:
            raise OptionError("name the tasks to remove, or --ensemble NAME for an ensemble")
        manifest = remove_tasks(folder, list(names), sign_key=sign_key, ensembles=list(ensembles)) if names else \
            change_ensembles(folder, remove=list(ensembles), sign_key=sign_key)
    _report_tasks(folder, manifest, before, quiet, as_json)


def _task_names(folder: Path) -> list[str]:
    from spexport.artifact.manifest import Manifest

    return [t.name for t in Manifest.read(folder).tasks]


def _report_tasks(folder: Path, manifest, before: list[str], quiet: bool, as_json: bool) -> None:
    from spexport.inspection import summary

    if as_json:
        _print_json({"output": str(folder), **summary(manifest), "files": manifest.files})
    elif not quiet:
        for i, task in enumerate(manifest.tasks):
            mark = "  " if task.name in before else "+ "
            click.echo(f"{mark}{i} {task.name}: {task.method}, {task.num_virtual_tokens} virtual tokens")
        for name, members in manifest.ensembles.items():
            click.echo(f"  ensemble {name}: {', '.join(members)}")
        removed = [n for n in before if n not in {t.name for t in manifest.tasks}]
        click.echo(f"updated {folder} ({len(manifest.tasks)} tasks" + (f"; removed {', '.join(removed)})"
                                                                       if removed else ")"))


@main.command("inspect")
@ARTIFACT
@QUIET
@AS_JSON
def inspect_command(folder: Path, quiet: bool, as_json: bool) -> None:
    """Show an artifact's tasks, graph, providers and file integrity; exit 5 if a file is damaged."""
    from spexport.inspection import inspect

    report = inspect(folder)
    if as_json:
        _print_json(report.as_dict())
    elif not quiet:
        for line in inspect_lines(report):
            click.echo(line)
    broken = {rel: status for rel, status in report.files.items() if status != "ok"}
    if broken:
        raise ArtifactError(f"{folder}: " + ", ".join(f"{rel} is {status}" for rel, status in broken.items())
                            + "; export the artifact again or restore these files")


@main.command("validate")
@ARTIFACT
@MODEL
@ADAPTERS
@click.option("--atol", default=1e-4, show_default=True, type=FiniteRange(min=0), help="Largest allowed |Δlogits|.")
@click.option("--new-tokens", default=12, show_default=True, type=click.IntRange(min=0),
              help="Greedy tokens to generate and compare.")
@click.option("--min-agreement", default=0.9, show_default=True, type=FiniteRange(0, 1),
              help="Quantized artifacts: the least teacher-forced top-1 agreement with PEFT a task passes at.")
@TRUST_REMOTE_CODE
@QUIET
@AS_JSON
def validate_command(folder: Path, model_dir: Path, adapters, atol: float, new_tokens: int, min_agreement: float,
                     trust_remote_code: bool, quiet: bool, as_json: bool) -> None:
    """Compare a decoder-only artifact with PEFT on fixed random inputs; exit 1 if a task differs.

    A quantized artifact is compared in its drift report's terms: teacher-forced top-1 agreement with
    PEFT along PEFT's greedy text on fixed prompts, beside the agreement convert recorded against float32."""
    with _stdout_to_stderr():
        from spexport.validate import validate

        checks = validate(folder, model_dir, adapters, atol=atol, new_tokens=new_tokens,
                          trust_remote_code=trust_remote_code, min_agreement=min_agreement)
    failed = [c for c in checks if not c.passed]
    quantized = any(c.agreement is not None for c in checks)
    if as_json:
        _print_json({"passed": not failed, "atol": atol, "new_tokens": new_tokens,
                     **({"min_agreement": min_agreement} if quantized else {}),
                     "tasks": [vars(c) for c in checks]})
    elif not quiet:
        for line in validate_lines(checks, failed, atol, new_tokens, min_agreement):
            click.echo(line)
    if failed:
        click.echo(validate_failure(checks, failed, atol, min_agreement), err=True)
        sys.exit(1)


@main.command("run")
@ARTIFACT
@click.argument("texts", nargs=-1, required=True)
@click.option("--task", help="Task name (may be left out when the artifact has one task).")
@click.option("--chat", "as_chat", is_flag=True,
              help="Send each text as a user message in the model's chat template, and print the reply.")
@click.option("--stop", multiple=True, help="End the output where this string first appears (left out); repeatable.")
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(min=0))
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", default=1.0, show_default=True, type=FiniteRange(min=0, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 keeps every token.")
@click.option("--top-p", default=1.0, show_default=True, type=FiniteRange(0, 1, min_open=True))
@click.option("--seed", type=int, help="Seed for --sample, for repeatable output.")
@click.option("--quiet", is_flag=True, help="Print the generated text only, no warnings.")
@AS_JSON
def run_command(folder: Path, texts: tuple[str, ...], task: str | None, as_chat: bool, stop: tuple[str, ...],
                max_new_tokens: int, sample: bool, temperature: float, top_k: int, top_p: float, seed: int | None,
                quiet: bool, as_json: bool) -> None:
    """Generate from TEXTS with a task of a decoder-only or encoder-decoder artifact, streaming each output to
    its own line as it is generated (with --json, printed when all are done).

    --quiet silences the runtime's warnings (such as a provider fallback), never the text."""
    from spexport.runtime import load

    settings = dict(task=task, max_new_tokens=max_new_tokens, stop=list(stop) or None, do_sample=sample,
                    temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    prompts = [[{"role": "user", "content": text}] if as_chat else text for text in texts]
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        model = load(folder)
        if as_json:
            outputs = model.chat(prompts, **settings) if as_chat else model.generate_text(prompts, **settings)
            _print_json({"task": task or model.tasks[0], "outputs": [{"prompt": p, "text": t}
                                                                     for p, t in zip(texts, outputs)]})
            return
        for prompt in prompts:
            for piece in model.stream(prompt, **settings):
                click.echo(piece, nl=False)
            click.echo()


@main.command("serve")
@ARTIFACT
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; one other than loopback needs --api-key or --allow-unauthenticated.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch-size", default=64, show_default=True, type=click.IntRange(1), help="Rows run together.")
@access_options
@limit_options
@click.option("--ray", "use_ray", is_flag=True, help="Run on Ray Serve (joins RAY_ADDRESS if set, else a local Ray).")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1), help="Ray Serve replicas.")
@click.option("--prompt-lookup", default=0, type=click.IntRange(0), help="Greedy requests draft N tokens a step.")
@click.option("--prefix-cache-mb", default=256, type=click.IntRange(0), help="KV of shared prompt starts (0: off).")
@click.option("--max-prefill-tokens", default=2048, type=click.IntRange(1), help="Prompt tokens run per step.")
def serve_command(folder: Path, host: str, port: int, max_batch_size: int, api_keys: tuple[str, ...],
                  allow_unauthenticated: bool, trusted_keys: tuple[Path, ...], use_ray: bool, replicas: int,
                  prompt_lookup: int, prefix_cache_mb: int, max_prefill_tokens: int, **limits) -> None:
    """Serve FOLDER as an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/classify, ...),
    batching concurrent requests across tasks continuously. SIGTERM finishes the requests in flight."""
    if replicas > 1 and not use_ray:
        raise OptionError("--replicas needs --ray; one process serves one replica")
    if use_ray:
        from spexport.serve.ray_app import serve_on_ray

        check_ray(host, api_keys, trusted_keys, allow_unauthenticated, limits)
        serve_on_ray(folder, host, port, replicas, max_batch_size)
    else:
        from spexport.serve import serve

        serve(folder, host, port, max_batch_size, limits=limits_from(limits), api_keys=api_keys,
              allow_unauthenticated=allow_unauthenticated, trusted_keys=list(trusted_keys) or None,
              prompt_lookup=prompt_lookup, prefix_cache_mb=prefix_cache_mb, max_prefill_tokens=max_prefill_tokens)


@main.command("reseal")
@ARTIFACT
def reseal_command(folder: Path) -> None:
    """Seal an artifact whose spexport.json has no manifest_sha256 (written before spexport sealed its
    manifests), trusting the manifest as it stands once every file it lists matches its sha256."""
    from spexport.artifact.manifest import reseal

    manifest, added = reseal(folder)
    if not added:
        click.echo(f"{folder}: already sealed; nothing to do")
        return
    click.echo(f"{folder}: sealed, trusting spexport.json as it stands: {len(manifest.tasks)} tasks "
               f"({', '.join(t.name for t in manifest.tasks)}), {len(manifest.files)} files, each checked against "
               "its sha256")


def _print_table(rows: list[list]) -> None:
    for line in table_lines(rows):
        click.echo(line)


def _print_json(document: dict) -> None:
    click.echo(json.dumps(document, indent=2))


@contextlib.contextmanager
def _stdout_to_stderr():
    """Whatever the libraries print goes to stderr, so stdout holds only the command's own output."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


@contextlib.contextmanager
def _terminated_as_interrupted():
    """SIGTERM (kill, docker stop, systemd) stops convert the way Ctrl-C does: the export unwinds,
    removes its staging folder and leaves any old artifact in place; the exit code is 143."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _one_line_warnings(console):
    """spexport's own warnings as one `warning:` line each (none with --quiet), once the command has
    succeeded: after an error, its one line says what went wrong. Other warnings show as Python shows them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SpexportWarning)
        succeeded = False
        try:
            yield
            succeeded = True
        finally:
            for w in caught:
                if not issubclass(w.category, SpexportWarning):
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
                elif succeeded:
                    console.print(f"warning: {w.message}", markup=False, highlight=False, soft_wrap=True)


for _command in (sign_command, verify_command):
    main.add_command(_command)

if __name__ == "__main__":
    main()
