"""export/decoder/__init__.py: the graph passes run after the frozen model's weights are freed."""

import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from transformers import LlamaConfig, LlamaForCausalLM

import spexport.export.decoder
from spexport.export.common import ExportOptions
from spexport.export.decoder import export_graph
from spexport.export.decoder.build import Graphs
from spexport.families import model_info

TINY = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("writer", ["direct", "trace"])
def test_no_weight_of_the_torch_model_outlives_the_core_graph(tmp_path, monkeypatch, writer):
    # the writer's onnx-ir graph holds views of the weights in a reference cycle, which a collection the
    # interpreter happens to start would free too: with automatic collection off, only export_graph's own does
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    weights = [StorageWeakRef(p.untyped_storage()) for p in model.parameters()]
    held = []

    def build(*args):
        held.append(sum(not weight.expired() for weight in weights))
        return Graphs(None, None, None, None)

    monkeypatch.setattr(spexport.export.decoder, "build", build)
    gc.disable()
    try:
        export_graph(model, model_info(model.config, None), tmp_path, ExportOptions(writer=writer, dtype="float16"))
    finally:
        gc.enable()
    assert held == [0]


def test_the_drift_reference_opens_without_packed_weights(tiny_llama, tmp_path, monkeypatch):
    # packing a float32 graph's weights for ONNX Runtime's products holds them twice while the session opens
    # (a 1B model's reference: 5.9 GB against 4.9); the reference runs a few texts once, the candidate is served
    import spexport.runtime
    from spexport.export import convert
    from spexport.export.drift import REFERENCE

    opened = {}

    class Recording(spexport.runtime.DecoderModel):
        def __init__(self, folder, manifest, providers, options=None):
            super().__init__(folder, manifest, providers, options=options)
            try:
                unpacked = self.session.get_session_options().get_session_config_entry("session.disable_prepacking")
            except RuntimeError:  # not set: ONNX Runtime packs
                unpacked = None
            opened[manifest.graph.startswith(REFERENCE)] = unpacked

    monkeypatch.setattr(spexport.runtime, "DecoderModel", Recording)
    convert(tiny_llama["model"], [("pt", tiny_llama["adapters"]["pt"])], tmp_path / "int8", quantize="int8")
    assert opened == {True: "1", False: None}
