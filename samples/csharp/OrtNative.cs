// A minimal binding of ONNX Runtime's C API: only what the sample uses, in plain C# 7, so that
// Debian's mono-mcs compiles it as well as the .NET SDK. (The official C# API, in the
// Microsoft.ML.OnnxRuntime.Managed package, has the same calls as InferenceSession,
// RunOptions.AddActiveLoraAdapter and OrtLoraAdapter.)
//
// The C API is one table of function pointers, OrtApi in onnxruntime_c_api.h. New versions only
// append to it, so a function's position, used below, is the same in every version.
using System;
using System.Runtime.InteropServices;

namespace Spexport.Samples
{
    public sealed class OrtException : Exception
    {
        public OrtException(string message) : base(message) { }
    }

    public sealed class OrtNative
    {
        public const int Float = 1, Int64 = 7;  // ONNXTensorElementDataType

        const uint ApiVersion = 20;  // the first with adapters (ONNX Runtime 1.20)

        [DllImport("onnxruntime")]
        static extern IntPtr OrtGetApiBase();

        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetApiFn(uint version);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetErrorMessageFn(IntPtr status);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate void ReleaseFn(IntPtr handle);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr CreateFn(out IntPtr created);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        delegate IntPtr CreateEnvFn(int logLevel, [MarshalAs(UnmanagedType.LPStr)] string logId, out IntPtr env);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        delegate IntPtr CreateSessionFn(IntPtr env, IntPtr path, IntPtr options, out IntPtr session);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        delegate IntPtr SetOptimizationFn(IntPtr options, int level);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        delegate IntPtr CreateCpuMemoryInfoFn(int allocatorType, int memType, out IntPtr info);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        delegate IntPtr CreateTensorFn(IntPtr info, IntPtr data, UIntPtr bytes, long[] shape, UIntPtr rank,
                                       int type, out IntPtr value);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        delegate IntPtr RunFn(IntPtr session, IntPtr runOptions, IntPtr[] inputNames, IntPtr[] inputs,
                              UIntPtr inputCount, IntPtr[] outputNames, UIntPtr outputCount, [In, Out] IntPtr[] outputs);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetPointerFn(IntPtr handle, out IntPtr result);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetCountFn(IntPtr info, out UIntPtr count);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        delegate IntPtr GetDimensionsFn(IntPtr info, [Out] long[] dims, UIntPtr count);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        delegate IntPtr CreateLoraAdapterFn(IntPtr path, IntPtr allocator, out IntPtr adapter);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr AddAdapterFn(IntPtr runOptions, IntPtr adapter);

        readonly IntPtr api;
        readonly GetErrorMessageFn getErrorMessage;
        readonly ReleaseFn releaseStatus;
        readonly IntPtr cpu;

        public OrtNative()
        {
            IntPtr getApi = Marshal.ReadIntPtr(OrtGetApiBase());  // OrtApiBase.GetApi
            api = Marshal.GetDelegateForFunctionPointer<GetApiFn>(getApi)(ApiVersion);
            if (api == IntPtr.Zero) throw new OrtException("this ONNX Runtime is older than 1.20");
            getErrorMessage = Fn<GetErrorMessageFn>(2);
            releaseStatus = Fn<ReleaseFn>(93);
            Check(Fn<CreateCpuMemoryInfoFn>(69)(1, 0, out cpu));  // OrtArenaAllocator, OrtMemTypeDefault
        }

        T Fn<T>(int position) => Marshal.GetDelegateForFunctionPointer<T>(Marshal.ReadIntPtr(api, position * IntPtr.Size));

        void Check(IntPtr status)
        {
            if (status == IntPtr.Zero) return;
            string message = Marshal.PtrToStringAnsi(getErrorMessage(status));
            releaseStatus(status);
            throw new OrtException(message);
        }

        // ORTCHAR_T is wchar_t on Windows and UTF-8 char elsewhere; the caller frees the result.
        static IntPtr NativePath(string path)
        {
            return Environment.OSVersion.Platform == PlatformID.Win32NT
                ? Marshal.StringToHGlobalUni(path) : Marshal.StringToHGlobalAnsi(path);
        }

        public IntPtr CreateSession(string path)
        {
            IntPtr env, options, session, nativePath = NativePath(path);
            try
            {
                Check(Fn<CreateEnvFn>(3)(2, "spexport", out env));  // ORT_LOGGING_LEVEL_WARNING
                Check(Fn<CreateFn>(10)(out options));
                Check(Fn<SetOptimizationFn>(23)(options, 99));  // ORT_ENABLE_ALL, as the Python runtime
                Check(Fn<CreateSessionFn>(7)(env, nativePath, options, out session));
                Fn<ReleaseFn>(100)(options);
                return session;  // the environment lives as long as the process
            }
            finally
            {
                Marshal.FreeHGlobal(nativePath);
            }
        }

        public IntPtr CreateRunOptions()
        {
            IntPtr runOptions;
            Check(Fn<CreateFn>(39)(out runOptions));
            return runOptions;
        }

        // Loads an ONNX Runtime adapter file and makes it active for runs with these options.
        public IntPtr AddActiveAdapter(IntPtr runOptions, string path)
        {
            IntPtr adapter, nativePath = NativePath(path);
            try
            {
                Check(Fn<CreateLoraAdapterFn>(280)(nativePath, IntPtr.Zero, out adapter));
            }
            finally
            {
                Marshal.FreeHGlobal(nativePath);
            }
            Check(Fn<AddAdapterFn>(283)(runOptions, adapter));
            return adapter;
        }

        // A tensor over `data`, which must stay pinned while the tensor is used.
        public IntPtr Tensor(GCHandle data, int elementSize, int type, long[] shape)
        {
            long bytes = elementSize * ((Array)data.Target).LongLength;
            IntPtr value;
            Check(Fn<CreateTensorFn>(49)(cpu, data.AddrOfPinnedObject(), new UIntPtr((ulong)bytes), shape,
                                         new UIntPtr((ulong)shape.Length), type, out value));
            return value;
        }

        public IntPtr[] Run(IntPtr session, IntPtr runOptions, IntPtr[] inputNames, IntPtr[] inputs, IntPtr[] outputNames)
        {
            var outputs = new IntPtr[outputNames.Length];
            Check(Fn<RunFn>(9)(session, runOptions, inputNames, inputs, new UIntPtr((ulong)inputs.Length), outputNames,
                               new UIntPtr((ulong)outputNames.Length), outputs));
            return outputs;
        }

        public long[] Shape(IntPtr value)
        {
            IntPtr info;
            UIntPtr rank;
            Check(Fn<GetPointerFn>(65)(value, out info));
            try
            {
                Check(Fn<GetCountFn>(61)(info, out rank));
                var dims = new long[(int)rank];
                Check(Fn<GetDimensionsFn>(62)(info, dims, rank));
                return dims;
            }
            finally
            {
                Fn<ReleaseFn>(99)(info);
            }
        }

        public IntPtr Data(IntPtr value)
        {
            IntPtr data;
            Check(Fn<GetPointerFn>(51)(value, out data));
            return data;
        }

        public void ReleaseValue(IntPtr value)
        {
            Fn<ReleaseFn>(96)(value);
        }
    }
}
