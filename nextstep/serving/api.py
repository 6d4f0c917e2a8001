"""The HTTP API: OpenAI's Images API shape, served by FastAPI.

    POST /v1/images/generations   JSON: prompt, n, size "WxH" (e.g. "64x64"), response_format "b64_json",
                                  and our extras: seed and the generation settings (see GenerationBody)
    POST /v1/images/edits         multipart: image (file), prompt, the same options, cfg_img and source_image
    GET  /health                  liveness and queue figures (never needs the API key)
    GET  /                        the web page

Errors come in OpenAI's shape, {"error": {"message", "type", "param", "code"}}:
400 for bad values, 401 for a missing or wrong key, 413 for a body over the cap,
422 for a body of the wrong form, 503 with Retry-After when the queue is full
or a request waited longer than the timeout.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import secrets
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..settings import SEED_MODULUS, GenerationSettings, InvalidSettings, parse_size
from .engine import Engine, QueueFull


@dataclass
class Limits:
    max_n: int = 8  # images per request
    max_side: int | None = None  # pixels, each side; None: twice the model's default size, within its positions
    max_body_bytes: int = 2 * 1024 * 1024  # request body
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


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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
    sampler: Literal["euler_maruyama", "sde", "cps", "ode"] | None = None
    noise_level: float | None = None
    use_norm: bool | None = None
    context_noise_std: float | None = None


# The generation settings a JSON body may set by name (besides `steps` and `size`).
SETTING_EXTRAS = {"cfg", "negative_prompt", "positive_prompt", "cfg_schedule", "timesteps_shift", "sampler",
                  "noise_level", "use_norm", "context_noise_std"}


class BodyLimit:
    """ASGI middleware: answer 413 once a request body passes `limit` bytes (declared or streamed)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send)
        seen = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large(send)

    async def _too_large(self, send: Any) -> None:
        response = JSONResponse(error_body(f"the request body is over {self.limit} bytes", "invalid_request_error",
                                           code="request_too_large"), status_code=413)
        await response({"type": "http"}, None, send)


class _BodyTooLarge(Exception):
    pass


def create_app(engine: Engine, api_key: str | None = None, limits: Limits | None = None,
               model_name: str = "nextstep-shapes") -> FastAPI:
    """The FastAPI app serving `engine`. With `api_key`, every route but /health and the page
    needs `Authorization: Bearer <api_key>` (the page holds no data: it asks for the key)."""
    limits = limits or Limits()
    app = FastAPI(title="nextstep", version="1", description=__doc__)
    pipe = engine.pipe
    token_px = pipe.down_factor
    max_side = limits.max_side or largest_side(engine)

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

    @app.middleware("http")
    async def auth(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.url.path not in ("/health", "/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(error_body("missing or wrong API key (Authorization: Bearer KEY)",
                                               "invalid_request_error", code="invalid_api_key"), 401)
        return await call_next(request)

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

    async def run(prompt: str, n: int, seed: int | None, settings: GenerationSettings,
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
        try:
            images = await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, futures)), limits.timeout_s)
        except asyncio.TimeoutError:
            for f in futures:
                f.cancel()
            raise APIError(503, f"no result within {limits.timeout_s:g} s; retry shortly", kind="server_error",
                           code="timeout", headers=retry) from None
        except ValueError as e:  # the pipeline refused the request
            raise APIError(400, str(e)) from None
        except Exception as e:
            raise APIError(500, f"generation failed ({type(e).__name__}: {e})", kind="server_error") from None
        return {"created": int(time.time()),
                "data": [{"b64_json": png_base64(im), "revised_prompt": None, "seed": s}
                         for im, s in zip(images, seeds)]}

    # ---------------------------------------------------------------- routes
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "queued_images": engine.queued(), "batches": engine.batches,
                "images": engine.images, "slots": engine.slots}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text())

    @app.post("/v1/images/generations")
    async def generations(body: GenerationBody) -> dict[str, Any]:
        check_common(body.prompt, body.n, body.negative_prompt, body.cfg, body.steps, body.seed)
        extras = body.model_dump(include=SETTING_EXTRAS)
        return await run(body.prompt, body.n, body.seed, settings_for(body.size, body.steps, **extras))

    @app.post("/v1/images/edits")
    async def edits(
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
        sampler: Literal["euler_maruyama", "sde", "cps", "ode"] | None = Form(None),
        noise_level: float | None = Form(None),
        use_norm: bool | None = Form(None),
        context_noise_std: float | None = Form(None),
        source_image: Literal["first", "last"] | None = Form(None, description="where the instruction "
                                                                               "sees the source image"),
    ) -> dict[str, Any]:
        check_common(prompt, n, negative_prompt, cfg, steps, seed)
        if cfg_img is not None and not 1 <= cfg_img <= 50:
            raise APIError(400, f"cfg_img must be between 1 and 50, got {cfg_img}", "cfg_img")
        settings = settings_for(size, steps, cfg=cfg, cfg_img=cfg_img, negative_prompt=negative_prompt,
                                positive_prompt=positive_prompt, cfg_schedule=cfg_schedule,
                                timesteps_shift=timesteps_shift, sampler=sampler, noise_level=noise_level,
                                use_norm=use_norm, context_noise_std=context_noise_std, source_image=source_image)
        h, w = settings.hw
        source = (await asyncio.to_thread(read_image, await image.read())).resize((w, h), Image.Resampling.BICUBIC)
        return await run(prompt, n, seed, settings, source)

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


def read_image(data: bytes) -> Image.Image:
    """An uploaded file as RGB, or a 400 naming what is wrong with it."""
    if not data:
        raise APIError(400, "image is empty", "image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > 4096 * 4096:  # checked from the header, before decoding
                raise APIError(400, f"image of {im.width}x{im.height} px is too large", "image")
            im.load()  # a truncated file fails here, not later
            return im.convert("RGB")
    except APIError:
        raise
    except Exception as e:
        raise APIError(400, f"image could not be read as a picture ({type(e).__name__}: {e})", "image") from None


def png_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def with_body_limit(app: FastAPI, limits: Limits) -> BodyLimit:
    """The ASGI app to serve: `app` behind the request-size cap."""
    return BodyLimit(app, limits.max_body_bytes)
