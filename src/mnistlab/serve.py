"""The HTTP API and the draw-a-digit page: a run folder's model behind FastAPI and uvicorn.

`POST /predict` takes images three ways (a multipart upload, JSON with base64, or the raw image
bytes), one or a batch, and answers with the label, every class's probability and the 28x28 image
the model saw, prepared by `predict.prepare` (the same preparation as the CLI and the Python API).
Requests are untrusted: the body is capped while it is read, images are decoded by
`predict.read_image` (size, dimension and decompression-bomb limits) and every mistake is a 4xx
JSON error `{"detail": "..."}` naming the problem; nothing a client sends takes the server down.
"""
from __future__ import annotations

import base64
import binascii
import importlib.resources
import importlib.util
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel
from starlette.formparsers import MultiPartException, MultiPartParser

from . import __version__, models
from .errors import MnistlabError
from .predict import MAX_BYTES, Predictor, read_image

# A body may hold one MAX_BYTES image base64-encoded (4/3 of it) with the JSON around it; a batch
# shares the same cap. Bigger bodies are refused from Content-Length, or once the cap is read.
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_BATCH = 64  # images per request, bounding one request's work: 64 drawn canvases take ~1 s of 2 cores
IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/gif", "image/webp")


# --- What /predict and /model answer ------------------------------------------------------------

class Prediction(BaseModel):
    label: str                       # the most probable class's name
    index: int                       # its index in the model's classes
    probability: float               # its probability
    probabilities: dict[str, float]  # every class's probability, in the model's class order
    prepared: str                    # the 28x28 image the model saw, as a PNG data URL


class BatchPrediction(BaseModel):
    predictions: list[Prediction]    # in the order the images were sent


class ModelInfo(BaseModel):
    name: str
    dataset: str
    classes: list[str]
    params: int
    test_accuracy: float | None      # from the run's metrics.json; None when it has none
    run: str


@dataclass
class Upload:
    """One image of a request: where it came from (for error messages) and its bytes."""
    where: str
    raw: bytes


class RequestError(Exception):
    """A client mistake, answered as `status` with {"detail": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --- Reading a request's images -----------------------------------------------------------------

async def capped_stream(request: Request):
    """The request body chunk by chunk, refused once it passes MAX_BODY_BYTES, so a client that
    sends no Content-Length (chunked) or lies in it still cannot make the server read a huge body."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large(int(declared))
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > MAX_BODY_BYTES:
            raise _too_large(received, more=True)
        yield chunk


def _too_large(size: int, more: bool = False) -> RequestError:
    return RequestError(413, f"the request body is {'over ' if more else ''}{size / 2**20:.1f} MB, over the "
                             f"{MAX_BODY_BYTES // 2**20} MB limit; send a smaller image "
                             f"(at most {MAX_BYTES // 2**20} MB each)")


async def read_body(request: Request) -> bytes:
    return b"".join([chunk async for chunk in capped_stream(request)])


async def read_uploads(request: Request) -> tuple[list[Upload], bool]:
    """The images of a request and whether it is a batch (`files` / `images` rather than `file` /
    `image`), from a multipart form, JSON with base64 strings, or a raw image body."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        uploads, batch = await read_multipart(request)
    elif media_type == "application/json":
        uploads, batch = read_json(await read_body(request))
    elif media_type in IMAGE_TYPES or media_type == "application/octet-stream":
        uploads, batch = [Upload("the image", await read_body(request))], False
    else:
        raise RequestError(415, f"content type {media_type or '(none)'!r} is not accepted; send "
                                "multipart/form-data with a `file` field, application/json with "
                                '{"image": "<base64>"}, or the image itself as image/png, image/jpeg, ...')
    if not uploads:
        raise RequestError(400, "the request holds no image; send a `file` (or `files`) form field, "
                                'or JSON {"image": "<base64>"} (or {"images": [...]})')
    if len(uploads) > MAX_BATCH:
        raise RequestError(413, f"{len(uploads)} images is over the {MAX_BATCH} images per request limit; "
                                "split the batch")
    for upload in uploads:
        if not upload.raw:
            raise RequestError(400, f"{upload.where} is empty (0 bytes); send the image file's content")
    return uploads, batch


async def read_multipart(request: Request) -> tuple[list[Upload], bool]:
    parser = MultiPartParser(request.headers, capped_stream(request), max_files=MAX_BATCH + 1, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        if str(err).startswith("Too many files"):
            raise RequestError(413, f"over the {MAX_BATCH} images per request limit; split the batch") from None
        raise RequestError(400, f"malformed multipart form ({err}); send it as a browser or "
                                "`curl -F file=@digit.png` does") from None
    try:
        unknown = sorted(set(form.keys()) - {"file", "files"})
        if unknown:
            raise RequestError(400, f"unknown form field {unknown[0]!r}; send the image as `file` "
                                    "(one) or `files` (a batch)")
        batch = "files" in form
        if "file" in form and batch:
            raise RequestError(400, "send either `file` (one image) or `files` (a batch), not both")
        name = "files" if batch else "file"
        fields = form.getlist(name)
        if not batch and len(fields) > 1:
            raise RequestError(400, "several `file` fields; send a batch as `files`")
        uploads = []
        for i, field in enumerate(fields):
            where = f"{name}[{i}]" if batch else "the image"
            if isinstance(field, str):
                raise RequestError(400, f"{where} is a text field, not a file; upload the image as a file")
            uploads.append(Upload(f"{where} ({field.filename})" if field.filename else where, await field.read()))
        return uploads, batch
    finally:
        await form.close()


def read_json(body: bytes) -> tuple[list[Upload], bool]:
    """{"image": "<base64>"} or {"images": ["<base64>", ...]}; data URLs (data:image/png;base64,...)
    are accepted as they are, since that is what a browser's canvas gives."""
    if not body:
        raise RequestError(400, 'the request body is empty; send JSON {"image": "<base64>"}')
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"malformed JSON ({err}); send {{\"image\": \"<base64>\"}}") from None
    except RecursionError:
        raise RequestError(400, 'malformed JSON (nested too deeply); send {"image": "<base64>"}') from None
    if not isinstance(document, dict) or len({"image", "images"} & set(document)) != 1:
        raise RequestError(400, 'the JSON must be an object with "image" (a base64 string) or "images" '
                                "(a list of them)")
    if "image" in document:
        return [Upload("the image", decode_base64(document["image"], '"image"'))], False
    images = document["images"]
    if not isinstance(images, list):
        raise RequestError(400, '"images" must be a list of base64 strings')
    if len(images) > MAX_BATCH:
        raise RequestError(413, f"{len(images)} images is over the {MAX_BATCH} images per request limit; "
                                "split the batch")
    return [Upload(f"images[{i}]", decode_base64(text, f"images[{i}]")) for i, text in enumerate(images)], True


def decode_base64(text, where: str) -> bytes:
    if not isinstance(text, str):
        raise RequestError(400, f"{where} must be a base64 string, not {type(text).__name__}")
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(400, f"{where} is a data URL without ;base64; send base64-encoded bytes")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, f"{where} is not valid base64 ({err}); encode the image file's bytes "
                                "with standard base64") from None


# --- Classifying ----------------------------------------------------------------------------------

def png_data_url(image_u8: torch.Tensor) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image_u8.numpy(), mode="L").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def classify(predictor: Predictor, uploads: list[Upload]) -> list[Prediction]:
    """Decode, prepare and classify a request's images in one batch. Runs in a worker thread: the
    decoding and the network release the GIL for most of their time."""
    prepared = []
    for upload in uploads:
        try:
            prepared.append(predictor.prepare([read_image(upload.raw)])[0])
        except MnistlabError as err:
            status = 413 if len(upload.raw) > MAX_BYTES else 422
            raise RequestError(status, _named(err, upload.where)) from None
        except Exception as err:  # a decoder's unforeseen failure on hostile bytes is still the file's fault
            raise RequestError(422, f"{upload.where} cannot be decoded ({type(err).__name__}: {err}); "
                                    "send a PNG, JPEG, BMP, GIF or WebP file") from None
    batch = torch.stack(prepared)
    with torch.inference_mode():
        probabilities = predictor.predict_logits(batch).softmax(1)
    results = []
    for image_u8, probs in zip(batch, probabilities):
        index = int(probs.argmax())
        results.append(Prediction(label=predictor.classes[index], index=index, probability=float(probs[index]),
                                  probabilities={name: round(float(p), 6) for name, p in zip(predictor.classes, probs)},
                                  prepared=png_data_url(image_u8)))
    return results


def _named(err: Exception, where: str) -> str:
    """The error's message about `where` (read_image calls every image "the image")."""
    message = str(err)
    return message.replace("the image", where, 1) if message.startswith("the image") else f"{where}: {message}"


def model_info(predictor: Predictor) -> ModelInfo:
    metrics_path = predictor.run / "metrics.json"
    try:
        accuracy = json.loads(metrics_path.read_text()).get("test_accuracy") if metrics_path.is_file() else None
    except (OSError, ValueError):
        accuracy = None  # a broken metrics.json must not stop serving the model
    return ModelInfo(name=predictor.arch.name, dataset=predictor.dataset, classes=predictor.classes,
                     params=models.count_params(predictor.net)["total"], test_accuracy=accuracy,
                     run=predictor.run.name)


# --- The app ----------------------------------------------------------------------------------------

PREDICT_BODY = {  # /predict reads its body itself (capped); this tells /docs what it accepts
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary", "description": "one image"},
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": f"a batch of up to {MAX_BATCH} images"}}}},
        "application/json": {"schema": {"type": "object", "properties": {
            "image": {"type": "string", "description": "base64 of an image file (a data: URL is fine too)"},
            "images": {"type": "array", "items": {"type": "string"}, "description": "a batch, base64 each"}}}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    },
}
ERRORS = {status: {"description": text, "content": {"application/json": {"example": {"detail": "..."}}}}
          for status, text in [(400, "malformed request: empty body, bad JSON or base64, unknown field"),
                               (413, f"body over {MAX_BODY_BYTES // 2**20} MiB, image over {MAX_BYTES // 2**20} MiB, "
                                     f"or more than {MAX_BATCH} images"),
                               (415, "content type not accepted"),
                               (422, "not an image, truncated, over 4096x4096 pixels, a decompression bomb, "
                                     "or blank")]}


def swagger_assets() -> Path | None:
    """Swagger UI's files from the swagger-ui-py package (the `serve` extra), found without importing
    it, so that /docs needs no CDN; None when it is not installed."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(list(spec.submodule_search_locations)[0]) / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None


def create_app(run: str | Path | Predictor) -> FastAPI:
    """The FastAPI app serving a run folder's model (or a loaded Predictor)."""
    predictor = run if isinstance(run, Predictor) else Predictor(run)
    info = model_info(predictor)
    page = importlib.resources.files("mnistlab").joinpath("static/draw.html").read_text(encoding="utf-8")
    assets = swagger_assets()
    app = FastAPI(title=f"mnistlab: {info.name} on {info.dataset}", version=__version__,
                  description="Classify MNIST-family images with a trained mnistlab run. The page at `/` "
                              "lets you draw one.", docs_url=None if assets else "/docs", redoc_url=None)
    app.state.predictor = predictor

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        # A bug of ours, not the client's: still JSON, and logged with its traceback by uvicorn.
        return JSONResponse({"detail": f"internal error ({type(err).__name__}); the server goes on, "
                                       "please report it with the request that caused it"}, status_code=500)

    if assets:
        app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

        @app.get("/docs", include_in_schema=False)
        async def docs(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "").rstrip("/")
            return get_swagger_ui_html(openapi_url=root + app.openapi_url, title=app.title + " - docs",
                                       swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
                                       swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
                                       swagger_favicon_url=f"{root}/docs-assets/favicon-32x32.png")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def draw_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict:
        """Liveness: the model is loaded and the server answers."""
        return {"status": "ok", "model": info.name}

    @app.get("/model", response_model=ModelInfo)
    async def model() -> ModelInfo:
        """What is served: model name, data set, class names, parameter count, test accuracy."""
        return info

    @app.post("/predict", response_model=Prediction | BatchPrediction, responses=ERRORS,
              openapi_extra={"requestBody": PREDICT_BODY})
    async def predict(request: Request):
        """Classify one image (`file` / `image` / a raw image body) or a batch (`files` / `images`).

        Images may be PNG, JPEG, BMP, GIF or WebP of any size up to 4096x4096 and 10 MB, dark on
        light or light on dark; each is prepared the way the model's data set was made."""
        uploads, batch = await read_uploads(request)
        results = await run_in_threadpool(classify, predictor, uploads)
        return BatchPrediction(predictions=results) if batch else results[0]

    return app


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          access_log: bool = True) -> None:
    """Run the API and page with uvicorn until Ctrl-C.

    threads: torch's intra-op threads (default 2, or 1 on a one-core machine). Requests already run in
    parallel worker threads; still, with 8 clients on 2 cores, 2 threads served 105-112 requests/s
    and 1 thread 74-80 (benchmarks/serve.py, RESULTS.md). More would oversubscribe the cores."""
    torch.set_num_threads(max(1, threads or min(2, os.cpu_count() or 1)))
    app = create_app(run)  # load before listening: a bad run folder fails here, with its message
    print(f"mnistlab: serving {app.state.predictor.arch.name} from {run} on http://{host}:{port}/ "
          f"(API docs at /docs; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level="info")
