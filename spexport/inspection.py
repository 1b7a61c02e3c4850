"""What an artifact holds and whether it is intact: `spexport inspect`, with the runtime alone (no torch).

Every file is checked against the manifest's sha256 and reported, rather than refused at the first
one as `load` does, so a user sees at once everything that is wrong with a folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from spexport.artifact.integrity import OK, file_status, inside_folder
from spexport.artifact.manifest import Manifest


@dataclass
class Port:
    """One graph input or output; symbolic axes keep their names, unknown ones are None."""

    name: str
    shape: list[int | str | None]
    dtype: str


@dataclass
class Report:
    folder: str
    summary: dict
    inputs: list[Port] = field(default_factory=list)
    outputs: list[Port] = field(default_factory=list)
    graph_error: str | None = None  # why ONNX Runtime could not open the graph, if it could not
    providers: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> ok / DAMAGED / missing

    @property
    def intact(self) -> bool:
        return all(status == OK for status in self.files.values())

    def as_dict(self) -> dict:
        return {**asdict(self), "intact": self.intact}


def summary(manifest: Manifest) -> dict:
    """The manifest in brief: model, tasks with their ids and prefix sizes, baked or not."""
    return {"format_version": manifest.format_version, "family": manifest.family, "baked": manifest.baked,
            "model": asdict(manifest.model), "graph": manifest.graph, "prompt_bank": manifest.prompt_bank,
            **({"encoder_graph": manifest.encoder_graph} if manifest.encoder_graph else {}),
            "tasks": [{"id": i, "name": t.name, "method": t.method, "num_virtual_tokens": t.num_virtual_tokens,
                       "bytes": int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize}
                      for i, t in enumerate(manifest.tasks)],
            **({"ensembles": manifest.ensembles} if manifest.ensembles else {})}


def graph_ports(path: Path) -> tuple[list[Port], list[Port]]:
    """The graph's inputs and outputs as ONNX Runtime reads them, without optimizing the graph."""
    import onnxruntime as ort

    from spexport.runtime.session import check_external_data

    check_external_data(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    def ports(args) -> list[Port]:
        return [Port(a.name, list(a.shape), _numpy_dtype(a.type)) for a in args]

    return ports(session.get_inputs()), ports(session.get_outputs())


def _numpy_dtype(onnx_type: str) -> str:
    """ONNX Runtime's 'tensor(float)' as numpy and the manifest spell it: 'float32'."""
    name = onnx_type.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64"}.get(name, name)


def inspect(folder: str | Path) -> Report:
    """Read an artifact's manifest, graph signature and file integrity; raises ArtifactError only
    when there is no readable manifest."""
    import onnxruntime as ort

    folder = Path(folder)
    manifest = Manifest.read(folder)
    report = Report(str(folder), summary(manifest), providers=ort.get_available_providers(),
                    files=file_status(folder, manifest.files))
    try:
        report.inputs, report.outputs = graph_ports(inside_folder(folder, manifest.graph))
    except Exception as e:  # noqa: BLE001 - ORT raises its own pybind types, none a RuntimeError
        report.graph_error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return report
