"""The image API, driven by OpenAI's own Python client against a real server on a loopback port."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI
from PIL import Image

from nextstep import NextStepPipeline
from nextstep.io.images import pixels_to_pil
from nextstep.serving.api import Limits
from nextstep.shapes.dataset import ShapesDataset

from .serving import API_KEY, STEPS, serve


@pytest.fixture(scope="module")
def pipe() -> NextStepPipeline:
    return NextStepPipeline.from_pretrained()


@pytest.fixture(scope="module")
def served(pipe):
    with serve(pipe) as s:
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
    # prompts of one length share model calls
    (["a red circle", "a blue square", "a purple square", "a green triangle"], True),
    # others run in calls of their own length: nothing is padded for a neighbour
    (["a red circle", "a green triangle above a blue square", "three yellow circles", "a square"], False),
])
def test_concurrent_requests_match_their_lone_results(client, served, prompts, shared):
    pipe = served.engine.pipe
    lengths = {pipe.prompt_length(p, None, pipe.settings) for p in prompts}
    assert (len(lengths) == 1) == shared
    alone = [generate(client, p, seed=7) for p in prompts]
    calls_before = served.engine.batches
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: generate(client, p, seed=7), prompts))
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
    assert httpx.get(served.url + "/health").json()["status"] == "ok"
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


def test_serve_refuses_a_bad_port(capsys):
    from nextstep.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err


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
