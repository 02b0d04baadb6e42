"""A file server for benchmarks/stream_throughput.py: Python's, answering each request
`latency_ms` late, and serving byte ranges (for random access over HTTP). Standard library only,
so that it starts fast on a busy machine.

    python benchmarks/slow_server.py DIRECTORY HOST PORT LATENCY_MS
"""

import functools
import http.server
import sys
import time


class Handler(http.server.SimpleHTTPRequestHandler):
    """A file server that waits `latency_s` before each answer and serves `Range: bytes=a-b`."""

    latency_s = 0.0

    def send_head(self):
        time.sleep(self.latency_s)
        spec = self.headers.get("Range", "")
        if not spec.startswith("bytes="):
            return super().send_head()
        first, last = (int(x) for x in spec.removeprefix("bytes=").split("-"))
        with open(self.translate_path(self.path), "rb") as f:
            f.seek(first)
            self.part = f.read(last - first + 1)
        self.send_response(206)
        self.send_header("Content-Length", str(len(self.part)))
        self.end_headers()
        return None

    def do_GET(self):
        self.part = None
        super().do_GET()
        if self.part is not None:
            self.wfile.write(self.part)

    def log_message(self, *args):
        pass


def main() -> None:
    directory, host, port, latency_ms = sys.argv[1:]
    Handler.latency_s = float(latency_ms) / 1000
    http.server.ThreadingHTTPServer((host, int(port)), functools.partial(Handler, directory=directory)).serve_forever()


if __name__ == "__main__":
    main()
