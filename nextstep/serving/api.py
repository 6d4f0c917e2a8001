"""The HTTP API: OpenAI's Images API shape, served by FastAPI.

    POST /v1/images/generations   JSON: prompt, n, size "WxH" (e.g. "64x64"), response_format "b64_json",
                                  and our extras: seed and the generation settings (see GenerationBody)
    POST /v1/images/edits         multipart: image (file), prompt, the same options, cfg_img and source_image
    GET  /metrics                 Prometheus text: requests, images, queue depth, batch sizes, latencies
    GET  /health                  {"status": "ok"} (never needs the API key)
    GET  /                        the web page

Before any route runs, every request passes `Guard`: its Host header must name this server (DNS
rebinding), a browser's cross-origin request is refused unless its Origin is allowed (CORS), and
with API keys every route but /health and the page needs one.

Errors come in OpenAI's shape, {"error": {"message", "type", "param", "code"}}:
400 for bad values, 401 for a missing or wrong key, 403 for a refused origin, 413 for a body or an
image over the cap, 421 for a Host that is not this server, 422 for a body of the wrong form,
500 when generation failed, 503 with Retry-After when the queue is full, a request waited longer
than the timeout or the server is shutting down.
"""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..io.images import ImageTooLarge, load_rgb
from ..settings import SEED_MODULUS, GenerationSettings, InvalidSettings, parse_size
from .engine import Engine, QueueFull
from .guard import BodyLimit, Guard, error_body, hosts_for
from .metrics import Metrics


@dataclass
class Limits:
    max_n: int = 8  # images per request
    max_side: int | None = None  # pixels, each side; None: twice the model's default size, within its positions
    max_body_bytes: int = 2 * 1024 * 1024  # request body
    max_image_pixels: int = 4096 * 4096  # an upload's width * height, checked before decoding
    max_prompt_chars: int = 1000
    max_steps: int = 100  # flow sampling steps per token
    timeout_s: float = 120.0  # a request's wait for its images
    retry_after_s: int = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}


class GenerationBody(BaseModel):
    """POST /v1/images/generations. Unknown fields are ignored, as OpenAI's clients send a few.
    Unset settings are the model's (`GenerationSettings`); `steps` is `num_sampling_steps`."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    n: int = 1
    size: str | None = Field(None, description='"WxH" in pixels, e.g. "64x64"; default: the model\'s size')
    response_format: Literal["b64_json"] | None = "b64_json"
    model: str | None = None
    seed: int | None = Field(None, description="image k of the request uses seed + k; default: random")
    cfg: float | None = Field(None, description="text guidance scale (>= 1)")
    steps: int | None = Field(None, description="flow sampling steps per token")
    negative_prompt: str | None = None
    positive_prompt: str | None = None
    cfg_schedule: Literal["constant", "linear"] | None = None
    timesteps_shift: float | None = None
    step_schedule: Literal["fixed", "fast"] | None = None
    sampler: Literal["euler_maruyama", "sde", "cps", "ode"] | None = None
    noise_level: float | None = None
    use_norm: bool | None = None
    context_noise_std: float | None = None
    think: bool | None = Field(None, description="write a thought first (self-CoT), returned as revised_prompt")


# The generation settings a JSON body may set by name (besides `steps` and `size`).
SETTING_EXTRAS = {"cfg", "negative_prompt", "positive_prompt", "cfg_schedule", "timesteps_shift", "step_schedule",
                  "sampler",
                  "noise_level", "use_norm", "context_noise_std", "think"}


def create_app(engine: Engine, api_keys: Iterable[str] = (), limits: Limits | None = None,
               model_name: str = "nextstep-shapes", host: str = "127.0.0.1", allowed_hosts: Iterable[str] = (),
               cors_origins: Iterable[str] = (), metrics: Metrics | None = None) -> FastAPI:
    """The FastAPI app serving `engine`, for a server bound to `host` (see Guard for `allowed_hosts`,
    `cors_origins` and `api_keys`). Model calls are counted in /metrics when the engine was made
    with `Engine(on_batch=metrics.on_batch)` and that `metrics` is passed here."""
    limits = limits or Limits()
    metrics = metrics or Metrics()
    app = FastAPI(title="nextstep", version="1", description=__doc__)
    pipe = engine.pipe
    token_px = pipe.down_factor
    max_side = limits.max_side or largest_side(engine)
    metrics.queued.set_function(engine.queued)
    routes: set[str] = set()  # filled below, once the routes exist
    # The last added is the outermost: Guard refuses before BodyLimit lets anything read the body.
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.add_middleware(Guard, hosts=hosts_for(host, allowed_hosts), any_ip=host in ("0.0.0.0", "::", ""),
                       cors_origins=set(cors_origins), keys=list(api_keys), metrics=metrics, routes=routes)

    # ---------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "form")]
        param = ".".join(loc) or None
        return JSONResponse(error_body(f"{param or 'body'}: {first.get('msg', 'invalid')}", "invalid_request_error",
                                       param, "invalid_value"), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), e.status_code)

    @app.exception_handler(Exception)  # a bug still answers in OpenAI's shape, not as plain text
    async def unexpected_error(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error ({type(e).__name__})", "server_error"), 500)

    # ---------------------------------------------------------------- checks
    def size_of(size: str | None) -> tuple[int, int]:
        if size is None or size == "auto":
            return pipe.default_size
        try:
            h, w = parse_size(size)
        except ValueError as e:
            raise APIError(400, str(e), "size") from None
        for side in (w, h):
            if side < token_px or side % token_px:
                raise APIError(400, f"size {size}: each side must be a positive multiple of {token_px}", "size")
            if side > max_side:
                raise APIError(400, f"size {size}: each side can be at most {max_side}", "size")
        return h, w

    def settings_for(size: str | None, steps: int | None, **given: Any) -> GenerationSettings:
        try:
            return pipe.settings.with_overrides(hw=size_of(size), num_sampling_steps=steps, **given)
        except InvalidSettings as e:
            raise APIError(400, str(e), ",".join("steps" if n == "num_sampling_steps" else n for n in e.names)) \
                from None

    def check_common(prompt: str, n: int, negative_prompt: str | None, cfg: float | None, steps: int | None,
                     seed: int | None) -> None:
        if not prompt.strip():
            raise APIError(400, "prompt is empty", "prompt")
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt or "")):
            if len(text) > limits.max_prompt_chars or engine.prompt_tokens(text) > engine.max_prompt_tokens:
                raise APIError(400, f"{name} is too long (at most {limits.max_prompt_chars} characters and "
                                    f"{engine.max_prompt_tokens} tokens)", name)
        if not 1 <= n <= limits.max_n:
            raise APIError(400, f"n must be between 1 and {limits.max_n}, got {n}", "n")
        if cfg is not None and not 1 <= cfg <= 50:
            raise APIError(400, f"cfg must be between 1 and 50, got {cfg}", "cfg")
        if steps is not None and not 2 <= steps <= limits.max_steps:
            raise APIError(400, f"steps must be between 2 and {limits.max_steps}, got {steps}", "steps")
        if seed is not None and not 0 <= seed < SEED_MODULUS:
            raise APIError(400, f"seed must be between 0 and {SEED_MODULUS - 1}, got {seed}", "seed")

    async def run(request: Request, prompt: str, n: int, seed: int | None, settings: GenerationSettings,
                  image: Image.Image | None = None) -> dict[str, Any]:
        seed = secrets.randbelow(SEED_MODULUS) if seed is None else seed
        seeds = [(seed + k) % SEED_MODULUS for k in range(n)]
        retry = {"Retry-After": str(limits.retry_after_s)}
        try:
            futures = engine.submit(prompt, seeds, settings, image)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except QueueFull as e:
            raise APIError(503, f"the server is busy ({e}); retry shortly", kind="server_error",
                           code="queue_full", headers=retry) from None
        except RuntimeError as e:  # the engine is closed: the server is shutting down
            raise APIError(503, f"the server is not taking requests ({e})", kind="server_error",
                           code="shutting_down", headers=retry) from None
        try:
            images = await wait_for_images(request, futures)
        except ValueError as e:  # the pipeline refused the request
            raise APIError(400, str(e)) from None
        except (APIError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise APIError(500, f"generation failed ({type(e).__name__}: {e})", kind="server_error") from None
        return {"created": int(time.time()),
                "data": [{"b64_json": png_base64(im), "revised_prompt": im.info.get("thought"), "seed": s}
                         for im, s in zip(images, seeds)]}

    async def wait_for_images(request: Request, futures: list[Future]) -> list[Image.Image]:
        """The jobs' images, watching the client meanwhile: a client that left, or a wait past the
        timeout, cancels the jobs, and the engine skips cancelled jobs, so they cost no model work."""
        waiting = asyncio.gather(*map(asyncio.wrap_future, futures))
        deadline = time.monotonic() + limits.timeout_s
        try:
            while not waiting.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise APIError(503, f"no result within {limits.timeout_s:g} s; retry shortly",
                                   kind="server_error", code="timeout",
                                   headers={"Retry-After": str(limits.retry_after_s)})
                await asyncio.wait({waiting}, timeout=min(left, 0.1))
                if not waiting.done() and await request.is_disconnected():
                    # 499, as nginx logs it: nobody reads this answer, but /metrics counts it.
                    raise APIError(499, "the client closed the request", code="client_closed")
            try:
                return waiting.result()
            except asyncio.CancelledError:  # the engine cancelled the jobs: it is closing
                raise APIError(503, "the server is shutting down; retry shortly", kind="server_error",
                               code="shutting_down", headers={"Retry-After": str(limits.retry_after_s)}) from None
        finally:
            if not waiting.done():
                waiting.cancel()
                # Read its outcome when it settles, or asyncio logs "exception was never retrieved".
                waiting.add_done_callback(lambda w: w.cancelled() or w.exception())
                for f in futures:
                    f.cancel()

    async def read_upload(upload: UploadFile, hw: tuple[int, int]) -> Image.Image:
        """The uploaded image as RGB at (height, width) `hw`; decoded in a worker thread, as a large
        picture takes a while and the event loop must keep serving."""
        data = await upload.read()
        if not data:
            raise APIError(400, "image is empty", "image")
        try:
            source = await asyncio.to_thread(load_rgb, data, limits.max_image_pixels)
        except ImageTooLarge as e:
            raise APIError(413, str(e), "image", "image_too_large") from None
        except ValueError as e:
            raise APIError(400, f"image could not be read as a picture ({e})", "image") from None
        return await asyncio.to_thread(source.resize, (hw[1], hw[0]), Image.Resampling.BICUBIC)

    # ---------------------------------------------------------------- routes
    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness only: it needs no key, so it tells nothing (the figures are in /metrics)."""
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_text() -> Response:
        """Prometheus text format: requests by route and status, images, queue depth, batch sizes and
        latencies."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text())

    @app.post("/v1/images/generations")
    async def generations(body: GenerationBody, request: Request) -> dict[str, Any]:
        check_common(body.prompt, body.n, body.negative_prompt, body.cfg, body.steps, body.seed)
        extras = body.model_dump(include=SETTING_EXTRAS)
        return await run(request, body.prompt, body.n, body.seed, settings_for(body.size, body.steps, **extras))

    @app.post("/v1/images/edits")
    async def edits(
        request: Request,
        image: UploadFile = File(..., description="the source image (PNG, JPEG, WebP)"),
        prompt: str = Form(..., description="the edit instruction"),
        n: int = Form(1),
        size: str | None = Form(None, description="output 'WxH'; default: the model's size"),
        response_format: Literal["b64_json"] | None = Form("b64_json"),
        model: str | None = Form(None),
        seed: int | None = Form(None),
        cfg: float | None = Form(None),
        cfg_img: float | None = Form(None, description="image guidance scale (>= 1)"),
        steps: int | None = Form(None),
        negative_prompt: str | None = Form(None),
        positive_prompt: str | None = Form(None),
        cfg_schedule: Literal["constant", "linear"] | None = Form(None),
        timesteps_shift: float | None = Form(None),
        step_schedule: Literal["fixed", "fast"] | None = Form(None),
        sampler: Literal["euler_maruyama", "sde", "cps", "ode"] | None = Form(None),
        noise_level: float | None = Form(None),
        use_norm: bool | None = Form(None),
        context_noise_std: float | None = Form(None),
        source_image: Literal["first", "last"] | None = Form(None, description="where the instruction "
                                                                               "sees the source image"),
        think: bool | None = Form(None, description="write a thought first (self-CoT)"),
    ) -> dict[str, Any]:
        check_common(prompt, n, negative_prompt, cfg, steps, seed)
        if cfg_img is not None and not 1 <= cfg_img <= 50:
            raise APIError(400, f"cfg_img must be between 1 and 50, got {cfg_img}", "cfg_img")
        settings = settings_for(size, steps, cfg=cfg, cfg_img=cfg_img, negative_prompt=negative_prompt,
                                positive_prompt=positive_prompt, cfg_schedule=cfg_schedule,
                                timesteps_shift=timesteps_shift, step_schedule=step_schedule, sampler=sampler,
                                noise_level=noise_level,
                                use_norm=use_norm, context_noise_std=context_noise_std, source_image=source_image,
                                think_edits=think)  # an edit's `think` is the edits' setting
        source = await read_upload(image, settings.hw)
        return await run(request, prompt, n, seed, settings, source)

    routes.update(r.path for r in app.routes)
    return app


def largest_side(engine: Engine) -> int:
    """Twice the model's default side, shrunk until an edit of a square that size fits the
    model's positions (source and target tokens plus the longest prompt)."""
    pipe, f = engine.pipe, engine.pipe.down_factor
    positions = pipe.model.config.max_position_embeddings
    side = 2 * max(pipe.default_size)
    while side > f:
        if engine.longest_prompt((side, side), edit=True) + (side // f) ** 2 <= positions:
            break
        side -= f
    return side


def png_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")

