"""The torch-free runtime: numpy + onnxruntime (+ tokenizers for the text helpers).

    from spexport.runtime import load
    m = load("artifact/")
    m.logits(input_ids, task="sentiment")
    m.generate(input_ids, task=["sentiment", "topic"], max_new_tokens=20)   # decoder artifacts
    m.classify(["great film"], task="sentiment")                             # encoder artifacts
"""

from spexport.runtime.decoder import DecoderModel, load
from spexport.runtime.encoder import EncoderModel

__all__ = ["DecoderModel", "EncoderModel", "load"]
