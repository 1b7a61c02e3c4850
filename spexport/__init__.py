"""spexport: export soft-prompted Hugging Face models to ONNX and serve them without torch.

Importing this package stays light (numpy only); the exporter lives in ``spexport.export`` and
needs the ``[export]`` extra, the runtime in ``spexport.runtime``.
"""

from spexport.errors import (
    AdapterError,
    ArtifactError,
    InputError,
    ModelError,
    OptionError,
    OutputError,
    SpexportError,
)

__version__ = "0.1.0"

__all__ = ["AdapterError", "ArtifactError", "InputError", "ModelError", "OptionError", "OutputError", "SpexportError",
           "__version__"]
