"""The torch-free runtime: numpy + onnxruntime (+ tokenizers for the text helpers).

    from spexport.runtime import load
    m = load("artifact/")
    m.logits(input_ids, task="sentiment")
    m.generate(input_ids, task=["sentiment", "topic"], max_new_tokens=20)
"""

from spexport.runtime.decoder import DecoderModel, load

__all__ = ["DecoderModel", "load"]
