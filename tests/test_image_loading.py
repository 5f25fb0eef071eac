"""Images given as strings: URLs with a timeout, and errors that name the input and the cause."""

from __future__ import annotations

import base64
import http.server
import io
import socket
import threading
import time

import numpy as np
import PIL.Image
import pytest

from g2tr_hf import build_tiny
from g2tr_hf.image_utils import load_image_source


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def silent_server():
    """A loopback server that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/image.png"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


@pytest.fixture
def image_server():
    """A loopback server that serves one PNG at /image.png and 404 elsewhere."""
    body = png_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path != "/image.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_url_that_never_answers_fails_within_the_timeout(silent_server, monkeypatch):
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"did not answer within 1 s.*G2TR_HF_IMAGE_TIMEOUT"):
        load_image_source(silent_server, timeout=1)
    assert time.monotonic() - start < 10
    monkeypatch.setenv("G2TR_HF_IMAGE_TIMEOUT", "0.5")
    with pytest.raises(ValueError, match="within 0.5 s"):
        load_image_source(silent_server)


def test_a_chat_with_a_silent_url_fails_within_the_timeout_on_both_processors(silent_server, monkeypatch):
    monkeypatch.setenv("G2TR_HF_IMAGE_TIMEOUT", "1")
    for name in ("bagel", "internvlu"):
        _, processor = build_tiny(name)
        chat = [{"role": "user", "content": [{"type": "image", "url": silent_server}, {"type": "text", "text": "?"}]}]
        start = time.monotonic()
        with pytest.raises(ValueError, match="did not answer"):
            processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert time.monotonic() - start < 10


def test_urls_that_answer(image_server):
    image = load_image_source(f"{image_server}/image.png")
    assert image.size == (8, 8)
    with pytest.raises(ValueError, match="HTTP 404"):
        load_image_source(f"{image_server}/missing.png")


def test_an_unreachable_host_names_the_cause():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ValueError, match=f"cannot reach http://127.0.0.1:{port}/x.png"):
        load_image_source(f"http://127.0.0.1:{port}/x.png", timeout=5)


def test_paths_data_uris_and_base64(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes())
    assert load_image_source(str(path)).size == (8, 8)
    encoded = base64.b64encode(png_bytes()).decode()
    assert load_image_source(f"data:image/png;base64,{encoded}").size == (8, 8)
    assert load_image_source(encoded).size == (8, 8)


def test_missing_and_unreadable_files_say_so(tmp_path):
    with pytest.raises(ValueError, match=r"`images`: no such file: 'missing.png'"):
        load_image_source("missing.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="is not a readable image"):
        load_image_source(str(text), argument_name="image")
