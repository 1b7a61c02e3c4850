"""The artifact contract, shared by the exporter and the runtime and free of torch.

manifest.py   spexport.json: what the artifact holds, sealed with its own checksum
ports.py      the graphs' input and output names
integrity.py  every file against its sha256, paths that cannot leave the folder
tensorfile.py safetensors with numpy alone (the prompt bank)
ort_adapters.py  one ONNX Runtime adapter file per task, for native clients
"""
