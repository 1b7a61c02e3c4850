"""Graph edits, one named pass per module, each an onnx-ir `InPlacePass` whose `call(model)` returns a
`PassResult`, tested alone on a tiny graph (tests/export/passes/).

The decoder's pipeline (export/decoder/build.py) runs them over the core graph in this order:
  RestoreInputPass               (traced) an input the tracer pruned, back in, unread
  FuseRotaryEmbeddingPass        (traced) rotary position embeddings as ONNX Runtime's RotaryEmbedding
  FuseTransformerOpsPass         (traced) ONNX Runtime's norm, skip-connection, activation and reshape fusions
  ScaleQueriesNotKeysPass        (traced) attention's scale moves off the key cache
  ConvertToFloat16Pass           (--dtype float16) fp16 weights and compute, float32 ports
  QuantizeWeightsPass            (--quantize int8/int4) MatMulNBits block-wise weights, float32 ports
  TagGraphPass                   how the graph was built, in its metadata
then derives the artifact's graphs from it:
  AddPrefixInputsPass            main graph: kv_prefix / prefix_mask inputs; positions, mask, past, present offset
  BakePromptBankPass             (--bake) the bank as constants, picked by a task_ids input
  MergePrefixIntoPastConcatPass  the prefix joins the frozen model's own concat(past, new token)
  GatherLogitsPositionsPass      core graph: the LM head at the positions asked for only
  UseGroupQueryAttentionPass     in-place graph: the core graph's attention as GroupQueryAttention
  TakeEmbeddingsInputPass        prefix graph: virtual-token embeddings in, their KV out
"""

from spexport.export.passes.add_prefix_inputs import AddPrefixInputsPass
from spexport.export.passes.bake_prompt_bank import BakePromptBankPass
from spexport.export.passes.embeddings_input import TakeEmbeddingsInputPass
from spexport.export.passes.float16 import ConvertToFloat16Pass
from spexport.export.passes.fuse import FuseTransformerOpsPass
from spexport.export.passes.group_query_attention import UseGroupQueryAttentionPass
from spexport.export.passes.logits_positions import GatherLogitsPositionsPass
from spexport.export.passes.merge_prefix_concat import MergePrefixIntoPastConcatPass
from spexport.export.passes.quantize import QuantizeWeightsPass
from spexport.export.passes.restore_input import RestoreInputPass
from spexport.export.passes.rotary import FuseRotaryEmbeddingPass
from spexport.export.passes.scale_queries import ScaleQueriesNotKeysPass
from spexport.export.passes.tag import TagGraphPass

__all__ = ["AddPrefixInputsPass", "BakePromptBankPass", "ConvertToFloat16Pass", "FuseRotaryEmbeddingPass",
           "FuseTransformerOpsPass", "GatherLogitsPositionsPass", "MergePrefixIntoPastConcatPass",
           "QuantizeWeightsPass", "RestoreInputPass", "ScaleQueriesNotKeysPass", "TagGraphPass",
           "TakeEmbeddingsInputPass", "UseGroupQueryAttentionPass"]
