"""onnxruntime-genai behind a minimal OpenAI-style streaming endpoint, for benchmarks/serve_load.py.

Driven as genai's users drive it: each request gets its own Generator, with that request's task adapter
active (genai takes one adapter per generator), on its own thread. Runs in onnxruntime-genai's own
environment and needs no spexport. Listens on 127.0.0.1 only.

    python genai_shim.py ARTIFACT_FOLDER    # prints "listening on http://127.0.0.1:PORT"
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import onnxruntime_genai as og

folder = sys.argv[1]
model = og.Model(folder)
tokenizer = og.Tokenizer(model)
adapters = og.Adapters(model)
loaded: set[str] = set()
lock = threading.Lock()


def adapter(task: str) -> str:
    with lock:
        if task not in loaded:
            adapters.load(f"{folder}/adapters/{task.replace('/', '%2F')}.onnx_adapter", task)
            loaded.add(task)
    return task


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ids = tokenizer.encode(body["prompt"])
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + int(body.get("max_tokens", 16)))
        generator = og.Generator(model, params)
        generator.set_active_adapter(adapters, adapter(body["model"]))
        generator.append_tokens(np.array([ids], dtype=np.int32))
        stream = tokenizer.create_stream()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        while not generator.is_done():
            generator.generate_next_token()
            piece = stream.decode(int(generator.get_next_tokens()[0]))
            self._chunk({"choices": [{"index": 0, "text": piece, "finish_reason": None}]})
        self._chunk("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        del generator

    def _chunk(self, data) -> None:
        line = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
        self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        self.wfile.flush()


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
