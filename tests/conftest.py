import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from builders import METHODS, build_adapter, build_model  # noqa: E402

from spexport.export import convert  # noqa: E402

# Five tasks of different methods and lengths, shared by the parity and batching tests.
TASKS = {"pt": ("prompt_tuning", 5), "mlp": ("p_tuning_mlp", 3), "lstm": ("p_tuning_lstm", 4),
         "prefix": ("prefix_tuning", 6), "proj": ("prefix_projection", 2)}


@pytest.fixture(scope="session", params=["gpt2", "llama", "qwen2", "mistral"])
def family(request):
    return request.param


@pytest.fixture(scope="session")
def built(family, tmp_path_factory):
    """A tiny model of `family`, one adapter per task in TASKS, and the artifact of them all."""
    root = tmp_path_factory.mktemp(family)
    model_dir = build_model(family, root / "model")
    adapters = {name: build_adapter(model_dir, method, root / f"adapter-{name}", n, seed=i + 1)
                for i, (name, (method, n)) in enumerate(TASKS.items())}
    artifact = root / "artifact"
    convert(model_dir, list(adapters.items()), artifact)
    return {"family": family, "model": model_dir, "adapters": adapters, "artifact": artifact}


@pytest.fixture(scope="session")
def runtime_model(built):
    from spexport.runtime import load

    return load(built["artifact"])


assert set(m for m, _ in TASKS.values()) == set(METHODS)
