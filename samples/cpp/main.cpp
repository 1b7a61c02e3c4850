// Greedy generation from a spexport artifact with ONNX Runtime's C++ API.
//
//   spexport-cpp <artifact_dir> <task_name> <max_new_tokens> <token ids...>
//
// Prints the input followed by the new tokens on one line, as spexport.runtime's generate returns
// them. It follows docs/artifact-format.md ("Driving the graph from a native client") for one row.
// How the task is chosen:
//   baked artifact                    task_ids = the task's position in the manifest's task list
//   unbaked                           kv_prefix and prefix_mask from the task's tensor in prompts.safetensors
//   unbaked, SPEXPORT_USE_ADAPTER=1   the task's ONNX Runtime adapter file, made active on the RunOptions:
//                                     ONNX Runtime feeds its tensors as the kv_prefix and prefix_mask inputs
// Unlike the Python runtime, this sample does not check the files' sha256 against the manifest.

#include <onnxruntime_cxx_api.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using json = nlohmann::json;

constexpr int kFormatVersion = 1;

struct Model {
  int64_t layers, kv_heads, head_dim, vocab_size, max_positions;
  std::vector<int64_t> eos_token_ids;
};

struct Task {
  int64_t id, num_virtual_tokens;
  std::string name, tensor;
  std::vector<int64_t> shape;  // [layers, 2, kv_heads, n, head_dim]
};

// The graph inputs (or the adapter) that pick a task; they stay the same for every step.
struct TaskChoice {
  std::vector<int64_t> task_ids;                    // baked graphs
  std::vector<float> kv_prefix;                     // unbaked, from the prompt bank
  std::vector<int64_t> kv_shape, prefix_mask;
  Ort::LoraAdapter adapter{nullptr};                // unbaked, from the task's adapter file
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot be read");
  return std::string(std::istreambuf_iterator<char>(in), {});
}

json read_manifest(const std::string& folder) {
  json manifest = json::parse(read_file(folder + "/spexport.json"));
  if (manifest.value("format", "") != "spexport") throw std::runtime_error(folder + ": not a spexport artifact");
  if (manifest.at("format_version").get<int>() > kFormatVersion)
    throw std::runtime_error(folder + ": artifact format is newer than this sample understands");
  if (manifest.at("family") != "decoder") throw std::runtime_error(folder + ": only decoder artifacts are served");
  return manifest;
}

Task find_task(const json& manifest, const std::string& name) {
  const json& tasks = manifest.at("tasks");
  std::string known;
  for (size_t id = 0; id < tasks.size(); ++id) {  // a task's id is its position in the list
    const json& t = tasks[id];
    if (t.at("name") == name)
      return {static_cast<int64_t>(id), t.at("num_virtual_tokens").get<int64_t>(), name,
              t.at("tensor").get<std::string>(), t.at("shape").get<std::vector<int64_t>>()};
    known += (known.empty() ? "" : ", ") + t.at("name").get<std::string>();
  }
  throw std::runtime_error("unknown task '" + name + "'; the artifact has " + known);
}

// prompts.safetensors: an 8-byte little-endian header length, a JSON header, then raw
// little-endian data (this sample assumes a little-endian machine).
std::vector<float> read_bank_tensor(const std::string& path, const Task& task) {
  const std::string data = read_file(path);
  uint64_t header_size = 0;
  if (data.size() < 8) throw std::runtime_error(path + ": not a safetensors file");
  std::memcpy(&header_size, data.data(), 8);
  if (header_size > data.size() - 8) throw std::runtime_error(path + ": not a safetensors file");
  const json entry = json::parse(data.substr(8, header_size)).at(task.tensor);
  const auto offsets = entry.at("data_offsets").get<std::vector<uint64_t>>();
  if (entry.at("dtype") != "F32" || entry.at("shape").get<std::vector<int64_t>>() != task.shape)
    throw std::runtime_error(path + ": tensor '" + task.tensor + "' is not float32 of the manifest's shape");
  const uint64_t begin = 8 + header_size + offsets.at(0), end = 8 + header_size + offsets.at(1);
  if (end > data.size() || begin > end || (end - begin) % sizeof(float) != 0)
    throw std::runtime_error(path + ": tensor '" + task.tensor + "' does not fit in the file");
  std::vector<float> values((end - begin) / sizeof(float));
  std::memcpy(values.data(), data.data() + begin, end - begin);
  return values;
}

// adapters/<task>.onnx_adapter, with '/' in the task name written as "%2F" (spexport/artifact/ort_adapters.py).
std::string adapter_path(const std::string& folder, std::string task) {
  for (size_t at = task.find('/'); at != std::string::npos; at = task.find('/', at + 3)) task.replace(at, 1, "%2F");
  return folder + "/adapters/" + task + ".onnx_adapter";
}

TaskChoice choose_task(const std::string& folder, const json& manifest, const Task& task, Ort::RunOptions& run_options) {
  TaskChoice choice;
  if (manifest.value("baked", false)) {
    choice.task_ids = {task.id};
  } else if (const char* flag = std::getenv("SPEXPORT_USE_ADAPTER"); flag && std::string(flag) == "1") {
    // Adapters apply to Run() only: IO binding (RunWithBinding) ignores them.
    choice.adapter = Ort::LoraAdapter::CreateLoraAdapter(adapter_path(folder, task.name), nullptr);
    run_options.AddActiveLoraAdapter(choice.adapter);
  } else {
    choice.kv_prefix = read_bank_tensor(folder + "/" + manifest.at("prompt_bank").get<std::string>(), task);
    choice.kv_shape = {1};  // a batch of one row: [1, layers, 2, kv_heads, n, head_dim]
    choice.kv_shape.insert(choice.kv_shape.end(), task.shape.begin(), task.shape.end());
    choice.prefix_mask.assign(task.num_virtual_tokens, 1);
  }
  return choice;
}

template <typename T>
Ort::Value view(std::vector<T>& data, std::vector<int64_t> shape) {  // the tensor borrows `data`
  static const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  return Ort::Value::CreateTensor<T>(cpu, data.data(), data.size(), shape.data(), shape.size());
}

std::vector<int64_t> generate(Ort::Session& session, Ort::RunOptions& run_options, const Model& model,
                              TaskChoice& choice, const Task& task, std::vector<int64_t> ids, int64_t max_new_tokens) {
  std::vector<std::string> past_names, present_names{"logits"};
  std::vector<Ort::Value> past;  // the caller's own cache: empty on the first step
  Ort::AllocatorWithDefaultOptions allocator;
  const int64_t empty_shape[] = {1, model.kv_heads, 0, model.head_dim};
  for (int64_t layer = 0; layer < model.layers; ++layer) {
    for (const char* kind : {"key", "value"}) {
      past_names.push_back("past_key_values." + std::to_string(layer) + "." + kind);
      present_names.push_back("present." + std::to_string(layer) + "." + kind);
      past.push_back(Ort::Value::CreateTensor<float>(allocator, empty_shape, 4));
    }
  }
  std::vector<const char*> output_names;
  for (const auto& name : present_names) output_names.push_back(name.c_str());

  std::vector<int64_t> sequence = ids, mask(ids.size(), 1), positions(ids.size());
  for (size_t i = 0; i < positions.size(); ++i) positions[i] = static_cast<int64_t>(i);  // from 0: the graph adds the virtual tokens
  const int64_t room = model.max_positions - task.num_virtual_tokens - static_cast<int64_t>(ids.size());
  for (int64_t step = 0; step < std::min(max_new_tokens, room); ++step) {
    std::vector<const char*> names{"input_ids", "attention_mask", "position_ids"};
    std::vector<Ort::Value> values;
    values.push_back(view(ids, {1, static_cast<int64_t>(ids.size())}));
    values.push_back(view(mask, {1, static_cast<int64_t>(mask.size())}));
    values.push_back(view(positions, {1, static_cast<int64_t>(positions.size())}));
    for (size_t i = 0; i < past.size(); ++i) {
      names.push_back(past_names[i].c_str());
      values.push_back(std::move(past[i]));
    }
    if (!choice.task_ids.empty()) {
      names.push_back("task_ids");
      values.push_back(view(choice.task_ids, {1}));
    } else if (!choice.kv_prefix.empty()) {
      names.push_back("kv_prefix");
      values.push_back(view(choice.kv_prefix, choice.kv_shape));
      names.push_back("prefix_mask");
      values.push_back(view(choice.prefix_mask, {1, static_cast<int64_t>(choice.prefix_mask.size())}));
    }  // else the active adapter feeds kv_prefix and prefix_mask
    auto outputs = session.Run(run_options, names.data(), values.data(), values.size(), output_names.data(),
                               output_names.size());

    const auto shape = outputs[0].GetTensorTypeAndShapeInfo().GetShape();  // [1, new tokens, vocab]
    const float* last = outputs[0].GetTensorData<float>() + (shape[1] - 1) * shape[2];
    const int64_t next = std::max_element(last, last + shape[2]) - last;  // the first of equal maxima, as numpy
    sequence.push_back(next);
    const auto& eos = model.eos_token_ids;
    if (std::find(eos.begin(), eos.end(), next) != eos.end()) break;  // one row: nothing to pad after EOS

    past.clear();
    for (size_t i = 1; i < outputs.size(); ++i) past.push_back(std::move(outputs[i]));
    ids = {next};
    positions = {static_cast<int64_t>(mask.size())};  // the row's real tokens so far
    mask.push_back(1);
  }
  return sequence;
}

int run(int argc, char** argv) {
  if (argc < 5) {
    std::cerr << "usage: spexport-cpp <artifact_dir> <task_name> <max_new_tokens> <token ids...>\n";
    return 2;
  }
  const std::string folder = argv[1];
  const json manifest = read_manifest(folder);
  const json& info = manifest.at("model");
  const Model model{info.at("num_layers"), info.at("num_kv_heads"), info.at("head_dim"), info.at("vocab_size"),
                    info.at("max_positions"), info.at("eos_token_ids").get<std::vector<int64_t>>()};
  const Task task = find_task(manifest, argv[2]);
  const int64_t max_new_tokens = std::stoll(argv[3]);
  std::vector<int64_t> ids;
  for (int i = 4; i < argc; ++i) {
    ids.push_back(std::stoll(argv[i]));
    if (ids.back() < 0 || ids.back() >= model.vocab_size)
      throw std::runtime_error("token id " + std::to_string(ids.back()) + " is outside the vocabulary");
  }
  if (static_cast<int64_t>(ids.size()) > model.max_positions - task.num_virtual_tokens)
    throw std::runtime_error("input is too long for the model's positions with this task's virtual tokens");

  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "spexport");
  Ort::SessionOptions options;
  options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  const std::string graph = folder + "/" + manifest.at("graph").get<std::string>();
  Ort::Session session(env, graph.c_str(), options);
  Ort::RunOptions run_options;
  TaskChoice choice = choose_task(folder, manifest, task, run_options);

  const std::vector<int64_t> sequence = generate(session, run_options, model, choice, task, ids, max_new_tokens);
  for (size_t i = 0; i < sequence.size(); ++i) std::cout << (i ? " " : "") << sequence[i];
  std::cout << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {  // Ort::Exception and json errors included
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
}
