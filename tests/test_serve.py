"""serve: the HTTP API as its clients use it: good uploads every way, every bad input, a live server."""
import base64
import http.client
import io
import json
import socket
import struct
import threading
import time
import zlib
from urllib.parse import urlsplit

import anyio
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from mnistlab import data, models, predict, serve


@pytest.fixture(scope="module")
def client(served_run):
    with TestClient(serve.create_app(served_run)) as client:
        yield client


@pytest.fixture(scope="module")
def digits(mnist_dir):
    """12 real test digits as a user would upload them: dark ink on light paper, 140x140 PNG files."""
    test = data.load("mnist", "test", mnist_dir)
    files = []
    for image in test.images[:12]:
        paper = Image.fromarray(255 - image.numpy()).resize((140, 140), Image.BILINEAR)
        files.append(png(paper))
    return files, test.labels[:12]


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def expected(served_run, files):
    """What the Python API says about the same files: the server must answer exactly this."""
    predictor = predict.Predictor(served_run)
    images = [predict.read_image(raw) for raw in files]
    return predictor.predict(images), predictor.prepare(images)


def check_prediction(answer: dict, probabilities: np.ndarray, prepared: torch.Tensor, classes):
    assert list(answer["probabilities"]) == classes
    assert np.allclose(list(answer["probabilities"].values()), probabilities, atol=1e-5)
    assert answer["index"] == int(probabilities.argmax()) and answer["label"] == classes[answer["index"]]
    assert answer["probability"] == pytest.approx(float(probabilities.max()), abs=1e-6)
    header, _, encoded = answer["prepared"].partition(",")
    assert header == "data:image/png;base64"
    seen = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert seen.size == (28, 28) and torch.equal(torch.from_numpy(np.array(seen)), prepared)


# --- Good requests ------------------------------------------------------------------------------

def test_every_way_of_sending_one_image_answers_what_the_python_api_does(client, served_run, digits):
    files, labels = digits
    probabilities, prepared = expected(served_run, files[:1])
    answers = [
        client.post("/predict", files={"file": ("digit.png", files[0], "image/png")}),
        client.post("/predict", json={"image": b64(files[0])}),
        client.post("/predict", json={"image": "data:image/png;base64," + b64(files[0])}),  # a canvas's toDataURL
        client.post("/predict", content=files[0], headers={"content-type": "image/png"}),
    ]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        check_prediction(answer.json(), probabilities[0], prepared[0], list("0123456789"))
    assert answers[0].json()["label"] == str(labels[0].item())


def test_batches_keep_their_order_and_read_real_digits(client, served_run, digits):
    files, labels = digits
    probabilities, prepared = expected(served_run, files)
    multipart = client.post("/predict", files=[("files", (f"{i}.png", raw, "image/png")) for i, raw in enumerate(files)])
    as_json = client.post("/predict", json={"images": [b64(raw) for raw in files]})
    for answer in (multipart, as_json):
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert len(predictions) == len(files)
        for i, prediction in enumerate(predictions):
            check_prediction(prediction, probabilities[i], prepared[i], list("0123456789"))
    read = [int(p["label"]) for p in multipart.json()["predictions"]]
    assert sum(r == label for r, label in zip(read, labels.tolist())) >= 10  # a ~90% model on 12 digits


def test_jpeg_and_a_light_on_dark_drawing_are_read(client):
    canvas = Image.new("L", (280, 280), 0)
    canvas.paste(255, (130, 40, 150, 240))  # a white "1" on black, as the draw page sends it
    for raw, kind in ((png(canvas), "image/png"), (png(canvas.convert("RGB"), "JPEG"), "image/jpeg")):
        answer = client.post("/predict", files={"file": ("one", raw, kind)})
        assert answer.status_code == 200, answer.text
        assert answer.json()["label"] == "1"


def test_model_and_health_describe_what_is_served(client, served_run):
    info = client.get("/model").json()
    metrics = json.loads((served_run / "metrics.json").read_text())
    net, _ = models.load_model(served_run)
    assert info == {"name": "seed003", "dataset": "mnist", "classes": list("0123456789"),
                    "params": models.count_params(net)["total"], "test_accuracy": metrics["test_accuracy"],
                    "run": served_run.name}
    assert client.get("/health").json() == {"status": "ok", "model": "seed003"}


def test_docs_and_the_page_need_no_internet(client):
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "/docs-assets/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text.lower()
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert client.get(f"/docs-assets/{asset}").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"multipart/form-data", "application/json"} <= set(schema["paths"]["/predict"]["post"]["requestBody"]["content"])
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere


# --- Bad requests: a clear 4xx JSON error, and the server goes on ----------------------------------

def png_header_only(width: int, height: int, rows_of_zeros: bool = False) -> bytes:
    """A PNG claiming width x height (1-bit grey). With rows_of_zeros, its data really inflates to
    that size: a decompression bomb, ~100 KB that would decode to width*height pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    idat = b""
    if rows_of_zeros:
        compressor, row = zlib.compressobj(9), bytes(1 + (width + 7) // 8)
        idat = b"".join(compressor.compress(row * 1000) for _ in range(height // 1000)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def one_png() -> bytes:
    canvas = Image.new("L", (56, 56), 255)
    canvas.paste(0, (26, 8, 30, 48))
    return png(canvas)


def raw(body: bytes, kind: str = "image/png") -> dict:
    return dict(content=body, headers={"content-type": kind})


BAD_REQUESTS = {
    "not an image": (dict(files={"file": ("notes.png", b"these are my notes, not a picture", "image/png")}),
                     422, "not a readable image"),
    "truncated PNG": (dict(files={"file": ("cut.png", one_png()[:-30], "image/png")}), 422, "truncated"),
    "truncated JPEG": (raw(png(Image.new("RGB", (300, 300), "white"), "JPEG")[:400], "image/jpeg"), 422, "truncated"),
    "empty body": (raw(b""), 400, "empty"),
    "empty file": (dict(files={"file": ("empty.png", b"", "image/png")}), 400, "empty"),
    "empty JSON body": (raw(b"", "application/json"), 400, "empty"),
    "image over 10 MB": (raw(one_png() + bytes(11 * 2**20)), 413, "10 MB limit"),
    "body over the cap": (raw(bytes(17 * 2**20)), 413, "16 MB limit"),
    "over 4096x4096": (raw(png_header_only(5000, 64)), 422, "4096x4096"),
    "decompression bomb": (raw(png_header_only(40000, 40000, rows_of_zeros=True)), 422, "4096x4096"),
    "blank image": (raw(png(Image.new("L", (64, 64), 255))), 422, "blank"),
    "wrong content type": (raw(b"1,2,3", "text/csv"), 415, "not accepted"),
    "no content type": (dict(content=b"abc"), 415, "not accepted"),
    "form fields instead of multipart": (dict(data={"image": "abc"}), 415, "not accepted"),
    "malformed JSON": (raw(b'{"image": ', "application/json"), 400, "malformed JSON"),
    "JSON nested too deeply": (raw(b"[" * 100_000 + b"]" * 100_000, "application/json"), 400, "malformed JSON"),
    "malformed base64": (dict(json={"image": "not*base64!"}), 400, "not valid base64"),
    "base64 of a non-string": (dict(json={"image": 12}), 400, "base64 string"),
    "JSON without image": (dict(json={"picture": "abc"}), 400, '"image"'),
    "images not a list": (dict(json={"images": "abc"}), 400, "list"),
    "too many images": (dict(json={"images": [b64(b"x")] * 65}), 413, "64 images per request"),
    "too many files": (dict(files=[("files", (f"{i}.png", b"x", "image/png")) for i in range(66)]), 413,
                       "64 images per request"),
    "bad image inside a batch": (dict(json={"images": [b64(one_png()), b64(b"garbage")]}), 422, "images[1]"),
    "unknown form field": (dict(files={"picture": ("a.png", b"x", "image/png")}), 400, "unknown form field"),
    "text where a file goes": (dict(files={"file": (None, b"abc")}), 400, "not a file"),
    "malformed multipart": (raw(b"--nothing--", "multipart/form-data"), 400, "multipart"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_input_is_a_clear_4xx_and_the_server_goes_on(client, case):
    request, status, message = BAD_REQUESTS[case]
    answer = client.post("/predict", **request)
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and message.lower() in detail.lower() and "\n" not in detail and "Traceback" not in detail
    assert client.post("/predict", **raw(one_png())).json()["label"] == "1"


def test_a_decoder_crash_is_the_file_s_fault_and_a_bug_is_a_json_500(served_run, monkeypatch):
    with TestClient(serve.create_app(served_run), raise_server_exceptions=False) as client:
        def crash(raw_bytes):
            raise IndexError("tile outside the image")
        monkeypatch.setattr(serve, "read_image", crash)
        answer = client.post("/predict", **raw(one_png()))
        assert answer.status_code == 422 and "cannot be decoded (IndexError" in answer.json()["detail"]
        monkeypatch.undo()
        monkeypatch.setattr(serve, "png_data_url", crash)
        answer = client.post("/predict", **raw(one_png()))
        assert answer.status_code == 500 and "internal error (IndexError)" in answer.json()["detail"]
        monkeypatch.undo()
        assert client.post("/predict", **raw(one_png())).json()["label"] == "1"


def test_a_body_without_length_is_cut_off_at_the_cap(served_run):
    """A chunked upload that never ends: the app stops reading once the cap is passed."""
    app, chunks = serve.create_app(served_run), 0
    sent = []

    async def receive():
        nonlocal chunks
        chunks += 1
        return {"type": "http.request", "body": bytes(2**20), "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"image/png"), (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    anyio.run(app, scope, receive, send)
    assert sent[0]["status"] == 413
    assert chunks == serve.MAX_BODY_BYTES // 2**20 + 1  # read up to the cap, not a byte further


# --- A live server: loopback, as clients use it ---------------------------------------------------

def multipart(raw_image: bytes) -> tuple[bytes, str]:
    boundary = "mnistlab-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + raw_image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_a_declared_huge_body_is_refused_before_it_is_sent(live_server):
    """Content-Length of 1 GB: the 413 comes back while the client has sent only 64 KB."""
    address = urlsplit(live_server)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 1000000000\r\n\r\n" + bytes(65536))
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert "16 MB limit" in json.loads(body)["detail"]


def test_eight_parallel_clients_for_twenty_seconds_get_no_errors(live_server, digits):
    """8 clients, each on its own keep-alive connection, post single digits (multipart or JSON) for
    20 s; every answer must be 200 with the label a lone request got."""
    files, _ = digits
    address = urlsplit(live_server)
    bodies = [multipart(raw_image) for raw_image in files]
    bodies += [(json.dumps({"image": b64(raw_image)}).encode(), "application/json") for raw_image in files]

    def post(connection, body, kind) -> tuple[int, dict]:
        connection.request("POST", "/predict", body=body, headers={"Content-Type": kind})
        response = connection.getresponse()
        return response.status, json.loads(response.read())

    alone = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    labels = [post(alone, *body)[1]["label"] for body in bodies]
    alone.close()

    done, errors, stop = [0] * 8, [], time.monotonic() + 20

    def run(client: int):
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        i = client
        try:
            while time.monotonic() < stop:
                status, answer = post(connection, *bodies[i % len(bodies)])
                if status != 200 or answer.get("label") != labels[i % len(bodies)]:
                    errors.append((client, status, answer.get("detail", answer.get("label"))))
                done[client] += 1
                i += 1
        except Exception as err:  # a dropped connection or a timeout is an error too
            errors.append((client, type(err).__name__, str(err)))
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(client,)) for client in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert min(done) > 0, done
    print(f"8 clients, 20 s: {sum(done)} requests, {sum(done) / 20:.0f}/s")
