// Greedy generation from a spexport artifact with onnxruntime-node.
//
//   node samples/node/run.js <artifact_dir> <task_name> <max_new_tokens> <token ids...>
//
// Prints the input followed by the new tokens on one line, as spexport.runtime's generate returns
// them. It follows docs/artifact-format.md ("Driving the graph from a native client") for one row:
// a baked artifact gets the task's id as `task_ids`; an unbaked one gets the task's tensor from
// prompts.safetensors as `kv_prefix` and `prefix_mask`. onnxruntime-node has no API for ONNX Runtime
// adapter files (onnxruntime-web has one), so the adapters/ folder is not used here.
// Unlike the Python runtime, this sample does not check the files' sha256 against the manifest.
'use strict';

const fs = require('fs');
const path = require('path');
const ort = require('onnxruntime-node');

const FORMAT_VERSION = 1;

function readManifest(folder) {
  const manifest = JSON.parse(fs.readFileSync(path.join(folder, 'spexport.json'), 'utf8'));
  if (manifest.format !== 'spexport') throw new Error(`${folder}: not a spexport artifact`);
  if (manifest.format_version > FORMAT_VERSION) {
    throw new Error(`${folder}: artifact format is newer than this sample understands`);
  }
  if (manifest.family !== 'decoder') throw new Error(`${folder}: only decoder artifacts are served`);
  return manifest;
}

// prompts.safetensors: an 8-byte little-endian header length, a JSON header, then raw little-endian data.
function readBankTensor(file, task) {
  const data = fs.readFileSync(file);
  const headerSize = Number(data.readBigUInt64LE(0));
  const entry = JSON.parse(data.toString('utf8', 8, 8 + headerSize))[task.tensor];
  if (!entry || entry.dtype !== 'F32' || JSON.stringify(entry.shape) !== JSON.stringify(task.shape)) {
    throw new Error(`${file}: tensor '${task.tensor}' is missing or not float32 of the manifest's shape`);
  }
  const [begin, end] = entry.data_offsets.map((offset) => data.byteOffset + 8 + headerSize + offset);
  return new Float32Array(data.buffer.slice(begin, end));  // a copy, so the floats are aligned
}

const int64 = (values, dims) => new ort.Tensor('int64', BigInt64Array.from(values, BigInt), dims);

// The graph inputs that pick the task; they stay the same for every step.
function taskInputs(folder, manifest, task, taskId) {
  if (manifest.baked) return { task_ids: int64([taskId], [1]) };
  const kv = readBankTensor(path.join(folder, manifest.prompt_bank), task);
  const n = task.num_virtual_tokens;
  return {
    kv_prefix: new ort.Tensor('float32', kv, [1, ...task.shape]),  // a batch of one row
    prefix_mask: int64(new Array(n).fill(1), [1, n]),
  };
}

function argmaxLast(logits) {  // the first of equal maxima, as numpy
  const [, steps, vocab] = logits.dims;
  const row = logits.data.subarray((steps - 1) * vocab, steps * vocab);
  let best = 0;
  for (let i = 1; i < vocab; i++) if (row[i] > row[best]) best = i;
  return best;
}

async function generate(session, model, prefix, numVirtual, ids, maxNewTokens) {
  let past = {};  // the caller's own cache: empty on the first step
  for (let layer = 0; layer < model.num_layers; layer++) {
    for (const kind of ['key', 'value']) {
      past[`past_key_values.${layer}.${kind}`] = new ort.Tensor(
        'float32', new Float32Array(0), [1, model.num_kv_heads, 0, model.head_dim]);
    }
  }
  const sequence = [...ids];
  let stepIds = ids;
  let positions = ids.map((_, i) => i);  // from 0: the graph adds the virtual tokens
  let maskLength = ids.length;
  const room = model.max_positions - numVirtual - ids.length;
  for (let step = 0; step < Math.min(maxNewTokens, room); step++) {
    const outputs = await session.run({
      input_ids: int64(stepIds, [1, stepIds.length]),
      attention_mask: int64(new Array(maskLength).fill(1), [1, maskLength]),
      position_ids: int64(positions, [1, positions.length]),
      ...past,
      ...prefix,
    });
    const next = argmaxLast(outputs.logits);
    sequence.push(next);
    if (model.eos_token_ids.includes(next)) break;  // one row: nothing to pad after EOS
    past = {};
    for (const name of Object.keys(outputs)) {
      if (name.startsWith('present.')) past[name.replace('present.', 'past_key_values.')] = outputs[name];
    }
    stepIds = [next];
    positions = [maskLength];  // the row's real tokens so far
    maskLength += 1;
  }
  return sequence;
}

async function main(argv) {
  if (argv.length < 4) {
    throw new Error('usage: node run.js <artifact_dir> <task_name> <max_new_tokens> <token ids...>');
  }
  const [folder, taskName, maxNew, ...tokens] = argv;
  const manifest = readManifest(folder);
  const model = manifest.model;
  const taskId = manifest.tasks.findIndex((t) => t.name === taskName);  // a task's id is its position
  if (taskId < 0) {
    const known = manifest.tasks.map((t) => t.name).join(', ');
    throw new Error(`unknown task '${taskName}'; the artifact has ${known}`);
  }
  const task = manifest.tasks[taskId];
  const ids = tokens.map(Number);
  if (ids.some((id) => !Number.isInteger(id) || id < 0 || id >= model.vocab_size)) {
    throw new Error('token ids must be integers inside the vocabulary');
  }
  if (ids.length > model.max_positions - task.num_virtual_tokens) {
    throw new Error("input is too long for the model's positions with this task's virtual tokens");
  }
  const session = await ort.InferenceSession.create(path.join(folder, manifest.graph),
    { graphOptimizationLevel: 'all' });
  const prefix = taskInputs(folder, manifest, task, taskId);
  const sequence = await generate(session, model, prefix, task.num_virtual_tokens, ids, Number(maxNew));
  console.log(sequence.join(' '));
}

main(process.argv.slice(2)).catch((error) => {
  console.error(`error: ${error.message}`);
  process.exitCode = 2;
});
