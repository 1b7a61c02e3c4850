// Greedy generation from a spexport artifact with ONNX Runtime, from C#.
//
//   mono samples/build/spexport-cs.exe <artifact_dir> <task_name> <max_new_tokens> <token ids...>
//   dotnet run --project samples/csharp -- <artifact_dir> <task_name> <max_new_tokens> <token ids...>
//
// Prints the input followed by the new tokens on one line, as spexport.runtime's generate returns
// them. It follows docs/artifact-format.md ("Driving the graph from a native client") for one row.
// How the task is chosen:
//   baked artifact                    task_ids = the task's position in the manifest's task list
//   unbaked                           kv_prefix and prefix_mask from the task's tensor in prompts.safetensors
//   unbaked, SPEXPORT_USE_ADAPTER=1   the task's ONNX Runtime adapter file, made active on the run options:
//                                     ONNX Runtime feeds its tensors as the kv_prefix and prefix_mask inputs
// Unlike the Python runtime, this sample does not check the files' sha256 against the manifest.
using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Runtime.InteropServices;
using System.Text;

namespace Spexport.Samples
{
    public static class Program
    {
        const int FormatVersion = 1;

        sealed class Input
        {
            public string Name;
            public Array Data;  // float[] or long[]
            public long[] Shape;
        }

        static Dictionary<string, object> Obj(object o) { return (Dictionary<string, object>)o; }
        static long Int(object o) { return Convert.ToInt64((double)o); }
        static long[] Ints(object o) { return ((List<object>)o).Select(Int).ToArray(); }

        static Dictionary<string, object> ReadManifest(string folder)
        {
            var manifest = Obj(MiniJson.Parse(File.ReadAllText(Path.Combine(folder, "spexport.json"))));
            if (!manifest.ContainsKey("format") || (manifest["format"] as string) != "spexport")
                throw new ArgumentException(folder + ": not a spexport artifact");
            if (Int(manifest["format_version"]) > FormatVersion)
                throw new ArgumentException(folder + ": artifact format is newer than this sample understands");
            if ((string)manifest["family"] != "decoder")
                throw new ArgumentException(folder + ": only decoder artifacts are served");
            return manifest;
        }

        // prompts.safetensors: an 8-byte little-endian header length, a JSON header, then raw
        // little-endian data (this sample assumes a little-endian machine).
        static float[] ReadBankTensor(string path, string tensor, long[] shape)
        {
            byte[] data = File.ReadAllBytes(path);
            long headerSize = BitConverter.ToInt64(data, 0);
            var header = Obj(MiniJson.Parse(Encoding.UTF8.GetString(data, 8, (int)headerSize)));
            object found;
            if (!header.TryGetValue(tensor, out found) || (string)Obj(found)["dtype"] != "F32"
                || !Ints(Obj(found)["shape"]).SequenceEqual(shape))
                throw new ArgumentException(path + ": tensor '" + tensor + "' is missing or not float32 of the manifest's shape");
            long[] offsets = Ints(Obj(found)["data_offsets"]);
            var values = new float[(offsets[1] - offsets[0]) / sizeof(float)];
            Buffer.BlockCopy(data, (int)(8 + headerSize + offsets[0]), values, 0, values.Length * sizeof(float));
            return values;
        }

        // adapters/<task>.onnx_adapter, with '/' in the task name written as "%2F" (spexport/artifact/ort_adapters.py).
        static string AdapterPath(string folder, string task)
        {
            return Path.Combine(folder, "adapters", task.Replace("/", "%2F") + ".onnx_adapter");
        }

        static int ArgmaxLast(OrtNative ort, IntPtr logits)
        {
            long[] shape = ort.Shape(logits);  // [1, new tokens, vocab]
            var row = new float[shape[2]];
            Marshal.Copy(ort.Data(logits) + (int)((shape[1] - 1) * shape[2] * sizeof(float)), row, 0, row.Length);
            int best = 0;  // the first of equal maxima, as numpy
            for (int i = 1; i < row.Length; i++) if (row[i] > row[best]) best = i;
            return best;
        }

        static List<long> Generate(OrtNative ort, IntPtr session, IntPtr runOptions, Dictionary<string, object> model,
                                   List<Input> taskInputs, long numVirtual, long[] ids, long maxNewTokens)
        {
            long layers = Int(model["num_layers"]), heads = Int(model["num_kv_heads"]), headDim = Int(model["head_dim"]);
            long[] eos = Ints(model["eos_token_ids"]);
            var pastNames = new List<string>();
            var outputNames = new List<string> { "logits" };
            for (long layer = 0; layer < layers; layer++)
            {
                foreach (var kind in new[] { "key", "value" })
                {
                    pastNames.Add("past_key_values." + layer + "." + kind);
                    outputNames.Add("present." + layer + "." + kind);
                }
            }
            IntPtr[] nativeOutputNames = outputNames.Select(Marshal.StringToHGlobalAnsi).ToArray();
            IntPtr[] past = null;  // the caller's own cache: empty on the first step

            var sequence = new List<long>(ids);
            long[] stepIds = ids, positions = Enumerable.Range(0, ids.Length).Select(i => (long)i).ToArray();  // from 0
            long maskLength = ids.Length;
            long room = Int(model["max_positions"]) - numVirtual - ids.Length;
            for (long step = 0; step < Math.Min(maxNewTokens, room); step++)
            {
                var inputs = new List<Input>
                {
                    new Input { Name = "input_ids", Data = stepIds, Shape = new[] { 1L, stepIds.Length } },
                    new Input { Name = "attention_mask", Data = Enumerable.Repeat(1L, (int)maskLength).ToArray(),
                                Shape = new[] { 1L, maskLength } },
                    new Input { Name = "position_ids", Data = positions, Shape = new[] { 1L, positions.Length } },
                };
                if (past == null)
                {
                    foreach (var name in pastNames)
                        inputs.Add(new Input { Name = name, Data = new float[0], Shape = new[] { 1L, heads, 0L, headDim } });
                }
                inputs.AddRange(taskInputs);  // none when an active adapter feeds kv_prefix and prefix_mask

                var handles = inputs.Select(i => GCHandle.Alloc(i.Data, GCHandleType.Pinned)).ToList();
                var names = inputs.Select(i => i.Name).Concat(past == null ? Enumerable.Empty<string>() : pastNames)
                                  .Select(Marshal.StringToHGlobalAnsi).ToArray();
                var values = inputs.Select((input, i) => ort.Tensor(handles[i], input.Data is float[] ? 4 : 8,
                                                                    input.Data is float[] ? OrtNative.Float : OrtNative.Int64,
                                                                    input.Shape));
                IntPtr[] feeds = values.Concat(past ?? new IntPtr[0]).ToArray();
                IntPtr[] outputs;
                try
                {
                    outputs = ort.Run(session, runOptions, names, feeds, nativeOutputNames);
                }
                finally
                {
                    foreach (var value in feeds) ort.ReleaseValue(value);  // the old past included
                    foreach (var handle in handles) handle.Free();
                    foreach (var name in names) Marshal.FreeHGlobal(name);
                }

                long next = ArgmaxLast(ort, outputs[0]);
                ort.ReleaseValue(outputs[0]);
                past = outputs.Skip(1).ToArray();
                sequence.Add(next);
                if (eos.Contains(next)) break;  // one row: nothing to pad after EOS
                stepIds = new[] { next };
                positions = new[] { maskLength };  // the row's real tokens so far
                maskLength += 1;
            }
            foreach (var value in past ?? new IntPtr[0]) ort.ReleaseValue(value);
            foreach (var name in nativeOutputNames) Marshal.FreeHGlobal(name);
            return sequence;
        }

        static int Run(string[] args)
        {
            if (args.Length < 4)
            {
                Console.Error.WriteLine("usage: spexport-cs <artifact_dir> <task_name> <max_new_tokens> <token ids...>");
                return 2;
            }
            string folder = args[0], taskName = args[1];
            var manifest = ReadManifest(folder);
            var model = Obj(manifest["model"]);
            var tasks = ((List<object>)manifest["tasks"]).Select(Obj).ToList();
            int taskId = tasks.FindIndex(t => (string)t["name"] == taskName);  // a task's id is its position
            if (taskId < 0)
                throw new ArgumentException("unknown task '" + taskName + "'; the artifact has "
                                            + string.Join(", ", tasks.Select(t => (string)t["name"])));
            var task = tasks[taskId];
            long numVirtual = Int(task["num_virtual_tokens"]);
            long[] ids = args.Skip(3).Select(long.Parse).ToArray();
            if (ids.Any(id => id < 0 || id >= Int(model["vocab_size"])))
                throw new ArgumentException("token ids must be inside the vocabulary");
            if (ids.Length > Int(model["max_positions"]) - numVirtual)
                throw new ArgumentException("input is too long for the model's positions with this task's virtual tokens");

            var ort = new OrtNative();
            IntPtr session = ort.CreateSession(Path.Combine(folder, (string)manifest["graph"]));
            IntPtr runOptions = ort.CreateRunOptions();
            var taskInputs = new List<Input>();
            if (manifest.ContainsKey("baked") && (bool)manifest["baked"])
            {
                taskInputs.Add(new Input { Name = "task_ids", Data = new long[] { taskId }, Shape = new[] { 1L } });
            }
            else if (Environment.GetEnvironmentVariable("SPEXPORT_USE_ADAPTER") == "1")
            {
                // Adapters apply to Run() only: IO binding (RunWithBinding) ignores them.
                ort.AddActiveAdapter(runOptions, AdapterPath(folder, taskName));
            }
            else
            {
                long[] shape = Ints(task["shape"]);
                float[] kv = ReadBankTensor(Path.Combine(folder, (string)manifest["prompt_bank"]), (string)task["tensor"], shape);
                taskInputs.Add(new Input { Name = "kv_prefix", Data = kv, Shape = new[] { 1L }.Concat(shape).ToArray() });
                taskInputs.Add(new Input { Name = "prefix_mask", Data = Enumerable.Repeat(1L, (int)numVirtual).ToArray(),
                                           Shape = new[] { 1L, numVirtual } });
            }
            var sequence = Generate(ort, session, runOptions, model, taskInputs, numVirtual, ids, long.Parse(args[2]));
            Console.WriteLine(string.Join(" ", sequence));
            return 0;
        }

        public static int Main(string[] args)
        {
            try
            {
                return Run(args);
            }
            catch (Exception e)  // spexport's checks, ONNX Runtime's errors, unreadable files
            {
                Console.Error.WriteLine("error: " + e.Message);
                return 2;
            }
        }
    }
}
