"""The image API, driven by OpenAI's own Python client against a real server on a loopback port."""

from __future__ import annotations

import base64
import io
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from nextstep import NextStepPipeline
from nextstep.io.images import ImageTooLarge, load_rgb, pixels_to_pil
from nextstep.serving.api import Limits
from nextstep.shapes.dataset import ShapesDataset

from .serving import API_KEY, STEPS, free_port, serve, wait_until_healthy


@pytest.fixture(scope="module")
def pipe() -> NextStepPipeline:
    return NextStepPipeline.from_pretrained()


@pytest.fixture(scope="module")
def served(pipe):
    with serve(pipe, allowed_hosts=["nextstep.test"], cors_origins=["http://app.test"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(served) -> OpenAI:
    return OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0)


def generate(client: OpenAI, prompt: str, seed: int, n: int = 1, **extra) -> list[str]:
    r = client.images.generate(model="nextstep-shapes", prompt=prompt, n=n, size="64x64", response_format="b64_json",
                               extra_body={"seed": seed, "steps": STEPS, **extra})
    assert [d.model_extra["seed"] for d in r.data] == [seed + k for k in range(n)]
    return [d.b64_json for d in r.data]


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def source_png(seed: int = 3) -> bytes:
    sample = next(iter(ShapesDataset(size=64, seed=seed, edits=True)))
    buf = io.BytesIO()
    pixels_to_pil(sample["source"][None])[0].save(buf, format="PNG")
    return buf.getvalue()


def test_the_openai_client_generates_images(client):
    images = generate(client, "a red circle", seed=11, n=2)
    decoded = [decode(b) for b in images]
    assert all(im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB" for im in decoded)
    assert images[0] != images[1]  # image k uses seed + k


def test_image_k_of_a_request_is_the_image_of_seed_plus_k(client):
    together = generate(client, "two blue squares", seed=40, n=3)
    alone = [generate(client, "two blue squares", seed=40 + k)[0] for k in range(3)]
    assert together == alone


@pytest.mark.parametrize("prompts, shared", [
    # prompts of one length share model calls (drawn without a thought: a thought joins the image
    # prompt, and its length is the model's to choose)
    (["a red circle", "a blue square", "a purple square", "a green triangle"], True),
    # others run in calls of their own length: nothing is padded for a neighbour (with thoughts)
    (["a red circle", "a green triangle above a blue square", "three yellow circles", "a square"], False),
])
def test_concurrent_requests_match_their_lone_results(client, served, prompts, shared):
    pipe = served.engine.pipe
    lengths = {pipe.prompt_length(p, None, pipe.settings) for p in prompts}
    assert (len(lengths) == 1) == shared
    extra = {"think": False} if shared else {}
    alone = [generate(client, p, seed=7, **extra) for p in prompts]
    calls_before, gather_s = served.engine.batches, served.engine.gather_s
    # A gathering window long enough for four HTTP requests to arrive on a busy machine (50 ms is
    # not when another process holds the cores, nor was 1 s beside a training run), so whether they
    # share a call is the engine's doing. Only the shared case waits it out; the others are one
    # request per length, so each of their calls would wait the whole window.
    served.engine.gather_s = 5.0 if shared else 1.0
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda p: generate(client, p, seed=7, **extra), prompts))
    finally:
        served.engine.gather_s = gather_s
    assert together == alone  # byte-identical PNGs, whatever shared the call
    if shared:
        assert served.engine.batches - calls_before < len(prompts)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_the_cli_the_api_and_pipe_give_the_same_pngs(client, served, tmp_path):
    """One seed rule everywhere: image k of a request is the image of seed + k."""
    from nextstep.cli import main

    prompt, n, seed = "a purple triangle above an orange square", 4, 7
    assert main(["generate", prompt, "-n", str(n), "--seed", str(seed), "--steps", str(STEPS),
                 "-o", str(tmp_path / "cli.png")]) == 0
    cli = [(tmp_path / f"cli_{k}.png").read_bytes() for k in range(n)]
    api = [base64.b64decode(b) for b in generate(client, prompt, seed, n)]
    pipe = served.engine.pipe
    called = [png_bytes(im) for im in pipe(prompt, num_images_per_prompt=n, generator=seed,
                                           num_inference_steps=STEPS).images]
    assert cli == api == called
    assert len(set(cli)) == n  # and they are n different images


def test_every_setting_reaches_the_model(client):
    plain = generate(client, "a red circle", seed=3)
    for extra in ({"timesteps_shift": 3.0}, {"sampler": "ode"}, {"use_norm": False}, {"cfg_schedule": "linear"},
                  {"context_noise_std": 0.5}, {"positive_prompt": "on a dark background"}):
        assert generate(client, "a red circle", seed=3, **extra) != plain, extra


def test_the_openai_client_edits_an_image(client):
    def edit(seed: int) -> list[str]:
        r = client.images.edit(image=("source.png", source_png(), "image/png"), prompt="make the red circle blue",
                               n=2, size="64x64", response_format="b64_json",
                               extra_body={"seed": seed, "steps": STEPS})
        return [d.b64_json for d in r.data]

    first = edit(5)
    assert len(first) == 2 and all(decode(b).size == (64, 64) for b in first)
    assert edit(5) == first


def test_health_needs_no_key_and_the_rest_does(served):
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}  # it tells nothing to anyone
    assert httpx.get(served.url + "/metrics").status_code == 401
    assert "<form" in httpx.get(served.url + "/").text
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(served.url + "/v1/images/generations", json={"prompt": "a circle"}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"


AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "   "}, 400, "prompt"),
    ({"prompt": "a red circle " * 100}, 400, "prompt"),
    ({"prompt": "a circle", "negative_prompt": "x" * 2000}, 400, "negative_prompt"),
    ({"prompt": "a circle", "size": "60x60"}, 400, "size"),
    ({"prompt": "a circle", "size": "4096x4096"}, 400, "size"),
    ({"prompt": "a circle", "size": "big"}, 400, "size"),
    ({"prompt": "a circle", "n": 0}, 400, "n"),
    ({"prompt": "a circle", "n": 1000}, 400, "n"),
    ({"prompt": "a circle", "cfg": 0.5}, 400, "cfg"),
    ({"prompt": "a circle", "steps": 1}, 400, "steps"),
    ({"prompt": "a circle", "seed": -1}, 400, "seed"),
    ({"prompt": "a circle", "timesteps_shift": 0}, 400, "timesteps_shift"),
    ({"prompt": "a circle", "noise_level": 2}, 400, "noise_level"),
    ({"prompt": "a circle", "sampler": "heun"}, 422, "sampler"),
    ({"prompt": "a circle", "n": "many"}, 422, "n"),
    ({"prompt": "a circle", "response_format": "url"}, 422, "response_format"),
    ({"n": 1}, 422, "prompt"),
])
def test_bad_generation_requests_get_openai_shaped_errors(served, body, status, param):
    r = httpx.post(served.url + "/v1/images/generations", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_a_body_over_the_cap_gets_413(served):
    r = httpx.post(served.url + "/v1/images/generations", headers=AUTH,
                   json={"prompt": "a circle", "negative_prompt": "x" * 300_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(served.url + "/v1/images/edits", headers=AUTH, data={"prompt": "remove the circle"},
                   files={"image": ("big.png", b"\x89PNG" + b"0" * 300_000, "image/png")})
    assert r.status_code == 413


@pytest.mark.parametrize("name, data", [
    ("notes.txt", b"this is not a picture"),
    ("cut.png", source_png()[:200]),  # a truncated PNG
    ("empty.png", b""),
])
def test_bad_uploads_get_400(served, name, data):
    r = httpx.post(served.url + "/v1/images/edits", headers=AUTH, data={"prompt": "remove the red circle"},
                   files={"image": (name, data, "image/png")})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "image"


def test_a_full_queue_and_a_timeout_get_503_with_retry_after(pipe):
    with serve(pipe, api_key=None, slots=2, max_queue=2) as s:
        r = httpx.post(s.url + "/v1/images/generations", json={"prompt": "a circle", "n": 3, "steps": STEPS})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
    with serve(pipe, api_key=None, limits=Limits(timeout_s=0.001)) as s:
        r = httpx.post(s.url + "/v1/images/generations", json={"prompt": "a circle", "steps": STEPS})
        assert r.status_code == 503 and r.json()["error"]["code"] == "timeout"
        assert httpx.get(s.url + "/health").status_code == 200  # the server lives on


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be between 1 and 65535"),
    (["--api-key-file", "{tmp}/empty"], "holds no key"),
    (["--api-key-file", "{tmp}/missing"], "does not exist"),
    (["--api-key", ""], "may not be empty"),
    (["--cors-origin", "app.example.com"], "scheme://host"),
    (["--drain-timeout", "-1"], "--drain-timeout must be >= 0"),
])
def test_serve_refuses_bad_options(capsys, tmp_path, args, message):
    from nextstep.cli import main

    (tmp_path / "empty").write_text("# no keys yet\n\n")
    assert main(["serve", *(a.format(tmp=tmp_path) for a in args)]) == 2  # before loading any model
    assert message in capsys.readouterr().err


def test_the_names_a_server_answers_for():
    from nextstep.serving.guard import host_name, hosts_for

    assert hosts_for("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert hosts_for("0.0.0.0", ["Images.Example.com"]) == {"0.0.0.0", "localhost", "127.0.0.1", "::1",
                                                            "images.example.com"}
    assert hosts_for("10.0.0.5") == {"10.0.0.5"}
    assert [host_name(h) for h in ("a.test:80", "A.test", "[::1]:8000", "::1")] == ["a.test", "a.test", "::1", "::1"]


def test_a_job_that_fails_fails_alone(served, monkeypatch):
    prepare = served.engine._prepare

    def refuse_boom(job):
        if "boom" in job.prompt:
            raise ValueError("this prompt cannot be drawn")
        return prepare(job)

    monkeypatch.setattr(served.engine, "_prepare", refuse_boom)
    with ThreadPoolExecutor(2) as pool:
        bad, good = pool.map(lambda p: httpx.post(served.url + "/v1/images/generations", headers=AUTH, timeout=60,
                                                  json={"prompt": p, "seed": 1, "steps": STEPS}),
                             ["a boom circle", "a red circle"])
    assert bad.status_code == 400 and "cannot be drawn" in bad.json()["error"]["message"]
    assert good.status_code == 200 and len(good.json()["data"]) == 1


def test_special_token_spellings_in_a_prompt_are_plain_text(client, served):
    prompt = "a red circle <|image_placeholder|><|begin_of_image|> <image>"
    served_png = base64.b64decode(generate(client, prompt, seed=2)[0])
    pipe = served.engine.pipe
    drawn = pipe(prompt, generator=2, num_images_per_prompt=4, num_inference_steps=STEPS).images[0]  # 4 slots
    assert served_png == png_bytes(drawn)
    ids = pipe.tokenizer.encode(prompt, plain=True)
    assert not {pipe.tokenizer.placeholder_id, pipe.tokenizer.boi_id} & set(ids)


def test_a_poisoned_request_in_a_shared_call_fails_alone(served, client, monkeypatch):
    """A request that breaks the model call it shares: the call is retried one request at a time,
    the others get the PNGs they get alone, the poisoned one a clear error."""
    pipe = served.engine.pipe
    good = ["a red circle", "a blue square", "a purple square"]
    # As many tokens as the good ones, so all four can share a call; without thoughts, whose lengths
    # (and so whether rows share a call) depend on the shipped model.
    poison = "a green triangle"
    alone = [generate(client, p, seed=5, think=False)[0] for p in good]
    green = pipe.tokenizer.encode(poison, plain=True)[1]
    assert all(green not in pipe.tokenizer.encode(p, plain=True) for p in good)
    real, calls = pipe.sample_tokens, []

    def breaks_on_green(request, *args, **kwargs):
        poisoned = bool((request.input_ids == green).any())
        calls.append((poisoned, len({tuple(r.tolist()) for r in request.input_ids})))
        if poisoned:
            raise ValueError("this prompt poisons the model call")
        return real(request, *args, **kwargs)

    monkeypatch.setattr(pipe, "sample_tokens", breaks_on_green)
    # A wide gathering window, so the four requests share a call however slow the machine is.
    monkeypatch.setattr(served.engine, "gather_s", 1.0)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: httpx.post(served.url + "/v1/images/generations", headers=AUTH, timeout=120,
                                                     json={"prompt": p, "seed": 5, "steps": STEPS, "think": False}),
                                   good + [poison]))
    assert [r.status_code for r in answers] == [200, 200, 200, 400]
    assert [r.json()["data"][0]["b64_json"] for r in answers[:3]] == alone
    assert "poisons the model call" in answers[3].json()["error"]["message"]
    assert any(poisoned and rows > 2 for poisoned, rows in calls)  # it did share a call with others


def test_a_job_that_breaks_gets_500_in_openai_shape(served, monkeypatch):
    def broken(job):
        raise RuntimeError("the model fell over")

    monkeypatch.setattr(served.engine, "_prepare", broken)
    r = httpx.post(served.url + "/v1/images/generations", headers=AUTH, timeout=60,
                   json={"prompt": "a red circle", "seed": 1, "steps": STEPS})
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error" and "fell over" in error["message"]


# ---------------------------------------------------------------- Host, Origin and CORS

def error_code(r: httpx.Response) -> str:
    return r.json()["error"]["code"]


@pytest.mark.parametrize("host, status", [
    ("127.0.0.1:{port}", 200), ("localhost:{port}", 200), ("LocalHost", 200), ("nextstep.test:{port}", 200),
    ("evil.example:{port}", 421), ("evil.example", 421), ("127.0.0.1.evil.example", 421), ("", 421),
])
def test_the_host_header_must_name_this_server(served, host, status):
    """A page on evil.example whose name re-resolves to 127.0.0.1 (DNS rebinding) sends its own name."""
    r = httpx.get(served.url + "/health", headers={"Host": host.format(port=served.port)})
    assert r.status_code == status, r.text
    if status != 200:
        assert error_code(r) == "invalid_host" and r.json()["error"]["type"] == "invalid_request_error"


def test_a_cross_origin_form_post_is_refused_before_any_work(served):
    """A "simple" request needs no preflight, so a page elsewhere could POST a form at us: refused,
    before the body is read (a body over the cap still gets 403, not 413) and before any model call."""
    images = served.engine.images
    for body in (b"x" * 1000, b"x" * 300_000):
        r = httpx.post(served.url + "/v1/images/edits", content=body, headers={
            **AUTH, "Origin": "http://evil.example", "Content-Type": "multipart/form-data; boundary=x"})
        assert r.status_code == 403 and error_code(r) == "origin_refused"
        assert "access-control-allow-origin" not in r.headers
    r = httpx.post(served.url + "/v1/images/generations", headers={**AUTH, "Origin": "null"},
                   json={"prompt": "a red circle", "steps": STEPS})
    assert r.status_code == 403
    assert served.engine.images == images


def test_same_origin_and_allowed_origins_pass(served):
    body = {"prompt": "a red circle", "seed": 2, "steps": STEPS, "size": "64x64"}
    same = httpx.post(served.url + "/v1/images/generations", headers={**AUTH, "Origin": served.url}, json=body,
                      timeout=60)
    assert same.status_code == 200 and "access-control-allow-origin" not in same.headers
    preflight = httpx.options(served.url + "/v1/images/generations", headers={
        "Origin": "http://app.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "http://app.test"
    assert {"POST"} <= set(map(str.strip, preflight.headers["access-control-allow-methods"].split(",")))
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    allowed = httpx.post(served.url + "/v1/images/generations", headers={**AUTH, "Origin": "http://app.test"},
                         json=body, timeout=60)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://app.test"
    assert allowed.json()["data"] == same.json()["data"]
    refused = httpx.options(served.url + "/v1/images/generations", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers


def test_several_api_keys(pipe):
    with serve(pipe, api_key=["first-key", "second-key"]) as s:
        for key, status in (("first-key", 200), ("second-key", 200), ("third-key", 401), ("first-ke", 401)):
            assert httpx.get(s.url + "/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == status


# ---------------------------------------------------------------- uploads

def png_claiming(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header says width x height: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def memory_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


@pytest.mark.parametrize("side", [5000, 20000])  # over our cap; 20000 is over PIL's own too
def test_a_decompression_bomb_is_refused_without_decoding(served, side):
    bomb = png_claiming(side, side)
    assert len(bomb) < 200
    peak = memory_kib("VmHWM")
    r = httpx.post(served.url + "/v1/images/edits", headers=AUTH, data={"prompt": "make the red circle blue"},
                   files={"image": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 413 and error_code(r) == "image_too_large" and r.json()["error"]["param"] == "image"
    assert memory_kib("VmHWM") - peak < 50 * 1024  # the server runs in this process: its peak did not move


def picture_in(mode: str) -> tuple[bytes, Image.Image]:
    """An upload in `mode` and the RGB image it should be read as (PIL's convert, as the CLI does)."""
    source = Image.open(io.BytesIO(source_png()))
    if mode == "I;16":
        im = Image.fromarray(np.asarray(source.convert("L"), dtype=np.uint16) * 257)  # 16-bit grey
    else:
        im = source.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
    return buf.getvalue(), Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "I;16", "1"])
def test_the_cli_and_the_server_read_every_mode_alike(mode, tmp_path):
    from nextstep.cli.edit import read_source

    data, expected = picture_in(mode)
    (tmp_path / "in").write_bytes(data)
    assert load_rgb(data).tobytes() == expected.tobytes()
    assert read_source(tmp_path / "in", (64, 64)).tobytes() == expected.tobytes()


def test_an_animation_gives_its_first_frame(served):
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "green")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    first = load_rgb(buf.getvalue())
    assert first.mode == "RGB" and first.getpixel((5, 5))[0] > 200 > max(first.getpixel((5, 5))[1:])  # red
    with pytest.raises(ImageTooLarge):
        load_rgb(png_claiming(100, 100), max_pixels=99 * 100)


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "I;16"])
def test_edits_take_any_mode(client, mode):
    data, _ = picture_in(mode)
    r = client.images.edit(image=("in.png", data, "image/png"), prompt="make the red circle blue", n=1,
                           size="64x64", response_format="b64_json", extra_body={"seed": 1, "steps": STEPS})
    assert decode(r.data[0].b64_json).size == (64, 64)


# ---------------------------------------------------------------- metrics

def scrape(url: str, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    r = httpx.get(url + "/metrics", headers=headers or {})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_count_what_was_asked(pipe):
    with serve(pipe) as s:
        gen = s.url + "/v1/images/generations"
        for seed in range(3):
            assert httpx.post(gen, headers=AUTH, timeout=60,
                              json={"prompt": "a red circle", "n": 2, "seed": seed, "steps": STEPS}).status_code == 200
        assert httpx.post(gen, headers=AUTH, json={"prompt": "a circle", "n": 0}).status_code == 400
        assert httpx.post(gen, json={"prompt": "a circle"}).status_code == 401
        assert httpx.get(s.url + "/nowhere", headers=AUTH).status_code == 404
        m = scrape(s.url, AUTH)
        route = "/v1/images/generations"
        assert m[("nextstep_requests_total", (("route", route), ("status", "200")))] == 3
        assert m[("nextstep_requests_total", (("route", route), ("status", "400")))] == 1
        assert m[("nextstep_requests_total", (("route", route), ("status", "401")))] == 1
        assert m[("nextstep_requests_total", (("route", "other"), ("status", "404")))] == 1
        assert m[("nextstep_images_total", ())] == 6 == s.engine.images
        assert m[("nextstep_batch_images_count", ())] == s.engine.batches
        assert m[("nextstep_batch_images_sum", ())] == 6
        assert m[("nextstep_request_seconds_count", (("route", route),))] == 5
        assert m[("nextstep_queued_images", ())] == 0 and m[("nextstep_requests_in_progress", ())] == 0


# ---------------------------------------------------------------- disconnects and shutdown

def test_clients_that_leave_while_queued_cost_no_model_work(pipe, monkeypatch):
    with serve(pipe, slots=4, max_queue=64) as s:
        gate, started, calls = threading.Event(), threading.Event(), []
        run = s.engine._run

        def slow_run(requests):  # the first call holds the engine until the test lets it go
            calls.append(len(requests))
            started.set()
            gate.wait(60)
            return run(requests)

        monkeypatch.setattr(s.engine, "_run", slow_run)
        gen = s.url + "/v1/images/generations"

        def leave(i: int) -> str:
            try:
                httpx.post(gen, headers=AUTH, timeout=1.0, json={"prompt": "a blue square", "seed": i, "steps": STEPS})
                return "answered"
            except httpx.TimeoutException:
                return "left"

        with ThreadPoolExecutor(17) as pool:
            first = pool.submit(httpx.post, gen, headers=AUTH, timeout=120,
                                json={"prompt": "a red circle", "seed": 1, "steps": STEPS})
            assert started.wait(30)
            assert list(pool.map(leave, range(16))) == ["left"] * 16
            deadline = time.monotonic() + 10
            while s.engine.queued() and time.monotonic() < deadline:  # the server notices within ~0.1 s
                time.sleep(0.05)
            assert s.engine.queued() == 0
            gate.set()
            assert first.result().status_code == 200
        time.sleep(0.5)  # time for the worker to have taken anything left
        assert calls == [1] and s.engine.batches == 1 and s.engine.images == 1
        m = scrape(s.url, AUTH)
        assert m[("nextstep_requests_total", (("route", "/v1/images/generations"), ("status", "499")))] == 16


def test_sigterm_finishes_accepted_requests_and_exits_0(tmp_path):
    """`nextstep serve` as a process, with keys from all three sources; SIGTERM mid-flight."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (tmp_path / "keys").write_text("# the team's keys\n\nfile-key\n")
    cmd = [sys.executable, "-m", "nextstep", "serve", "--port", str(port), "--slots", "4", "--api-key", "arg-key",
           "--api-key-file", str(tmp_path / "keys"), "--drain-timeout", "120"]
    server = subprocess.Popen(cmd, env={**os.environ, "NEXTSTEP_API_KEY": "env-key"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(url, 120)
        for key, status in (("arg-key", 200), ("env-key", 200), ("file-key", 200), ("# the team's keys", 401)):
            assert httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == status
        key = {"Authorization": "Bearer env-key"}
        with ThreadPoolExecutor(8) as pool:
            answers = [pool.submit(httpx.post, url + "/v1/images/generations", headers=key, timeout=300,
                                   json={"prompt": "a red circle", "seed": i, "steps": 40}) for i in range(8)]
            deadline = time.monotonic() + 60
            while scrape(url, key)[("nextstep_requests_in_progress", ())] < 8:
                assert time.monotonic() < deadline, "the 8 requests never were in flight together"
                time.sleep(0.02)
            server.send_signal(signal.SIGTERM)
            statuses = [a.result().status_code for a in answers]
        assert statuses == [200] * 8
        assert server.wait(120) == 0, server.stdout.read()
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
