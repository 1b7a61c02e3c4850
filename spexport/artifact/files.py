"""The names of an artifact's files, in one place for the exporters, the runtime and `spexport add`
(docs/artifact-format.md lists what each holds). The manifest's own name is `manifest.MANIFEST`, the adapter
files' folder `ort_adapters.FOLDER`, and the decoder's derived graphs `ports.CORE_GRAPH` / `ports.PREFIX_GRAPH`."""

GRAPH = "model.onnx"  # the frozen model, one graph for every task (decoder, encoder body)
WEIGHTS_SUFFIX = ".data"  # a graph's ONNX external data: model.onnx.data
BANK = "prompts.safetensors"  # the prompt bank: one tensor per task
HEADS = "heads"  # an encoder's per-task head graphs, heads/TASK.onnx
ENCODER_GRAPH = "encoder_model.onnx"  # seq2seq, in optimum-onnx's layout
DECODER_GRAPH = "decoder_model_merged.onnx"
CHAT_TEMPLATE = "chat_template.jinja"  # the model's chat template, among the tokenizer files when it has one
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# copied from the model folder when present
TOKENIZER_FILES = [TOKENIZER, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "added_tokens.json", CHAT_TEMPLATE]
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_FILES = [CONFIG, GENERATION_CONFIG]
