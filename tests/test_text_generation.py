"""Text generation with the LM head, and self-CoT (`think=True`): determinism, batch invariance,
greedy copying, stop tokens, thoughts in the image prompt, the CLI, the server engine, and the
first text logits against the reference fixture.

The reference-tiny checkpoint (tests/fixtures) is an official-format model that was never
trained to think: its thoughts are random text, which is what these mechanics need.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nextstep.cli import main
from nextstep.config import NextStepConfig
from nextstep.data.batching import Collator
from nextstep.model import NextStep
from nextstep.pipeline import NextStepPipeline
from nextstep.sampling.requests import merge_requests
from nextstep.sampling.text import TextSampling, draw_uniforms, sample_text
from nextstep.serving import Engine
from nextstep.settings import GenerationSettings, InvalidSettings
from nextstep.text import THOUGHT_OPEN, Plain, image_prefix

from .conftest import assert_close

COPIED = "the quick brown fox jumps over the lazy dog"
STEPS = 2  # flow steps per image token: the images only need to exist


@pytest.fixture(scope="module")
def pipe(ref10: Path) -> NextStepPipeline:
    p = NextStepPipeline.from_pretrained(ref10 / "model", ref10 / "vae", device="cpu", dtype=torch.float32)
    p.settings = p.settings.with_overrides(hw=(64, 64), num_sampling_steps=STEPS, cfg=3.0)
    return p


@pytest.fixture(scope="module")
def copier(pipe: NextStepPipeline) -> NextStepPipeline:
    """A tiny NextStep trained from scratch (100 steps, about 2 s) to write COPIED then <|endoftext|>."""
    torch.manual_seed(0)
    model = NextStep(pipe.model.config)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([pipe.tokenizer.encode(COPIED) + [pipe.tokenizer.tokenizer.token_to_id("<|endoftext|>")]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        logits = model.lm_head(model.forward_hidden(ids)[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"the copy model did not learn its string (loss {loss.item():.3f})"
    model.eval()
    return NextStepPipeline(model, pipe.vae, pipe.tokenizer)


# ---------------------------------------------------------------------- sampling
def test_sampling_with_a_seed_is_deterministic_and_batch_invariant(pipe: NextStepPipeline) -> None:
    prompts = ["a red circle", "a blue square", "two green triangles on a dark background", "a"]
    assert len(pipe.tokenizer.encode(prompts[0])) == len(pipe.tokenizer.encode(prompts[1]))  # they share a call
    together = pipe.generate_text(prompts, max_new_tokens=12, seed=7)
    alone = [pipe.generate_text(p, max_new_tokens=12, seed=7) for p in prompts]
    assert together == alone
    assert pipe.generate_text(prompts, max_new_tokens=12, seed=7) == together  # same seed, same text
    assert pipe.generate_text(prompts, max_new_tokens=12, seed=8) != together
    # Per-row seeds at the sampling level: row k of a batch is the row alone, whatever its neighbours.
    s = pipe.settings.with_overrides(thought_max_tokens=10, text_top_k=50, text_top_p=0.9)
    rows = [(Plain(p),) for p in ["a red circle", "a blue square", "a red circle"]]
    batch = pipe.write(rows, [None] * 3, [1, 2, 3], s, [], batch_size=3)
    assert batch == [pipe.write([r], [None], [seed], s, [], batch_size=1)[0] for r, seed in zip(rows, [1, 2, 3])]
    assert batch[0] != batch[2]  # the same prompt with another seed: other text
    assert all(len(t) == 10 for t in batch)  # no stop tokens: max_new_tokens each


def test_greedy_copies_the_trained_string_and_stops(copier: NextStepPipeline) -> None:
    words = COPIED.split(" ")
    prompt = " ".join(words[:2])
    text = copier.generate_text(prompt, max_new_tokens=40, temperature=0)
    assert prompt + text == COPIED  # and it stopped at <|endoftext|>, which is not returned
    # Greedy ignores the seed; a stop token of our choosing ends the text before it.
    assert copier.generate_text(prompt, max_new_tokens=40, temperature=0, seed=5) == text
    fox = copier.tokenizer.encode(" fox")
    assert len(fox) == 1
    assert copier.generate_text(prompt, max_new_tokens=40, temperature=0, stop=[fox[0]]) == " brown"
    assert copier.generate_text(prompt, max_new_tokens=40, temperature=0, stop=[" fox"]) == " brown"


def test_max_new_tokens_bounds_the_text(copier: NextStepPipeline) -> None:
    s = copier.settings.with_overrides(text_temperature=0.0)
    for n in (1, 3, 5):
        (ids,) = copier.write([(Plain("the quick"),)], [None], [0], s.with_overrides(thought_max_tokens=n),
                              copier.special_ids, 1)
        assert len(ids) == n
        assert copier.tokenizer.decode(ids) == COPIED[len("the quick"):][:len(copier.tokenizer.decode(ids))]


def test_top_k_one_is_greedy_and_bad_sampling_is_refused(copier: NextStepPipeline) -> None:
    greedy = copier.generate_text("the quick", max_new_tokens=8, temperature=0)
    assert copier.generate_text("the quick", max_new_tokens=8, temperature=1.5, top_k=1, seed=3) == greedy
    assert copier.generate_text("the quick", max_new_tokens=8, top_p=1e-6, seed=4) == greedy
    with pytest.raises(InvalidSettings, match="text_top_p"):
        GenerationSettings(text_top_p=0)
    with pytest.raises(InvalidSettings, match="text_temperature"):
        GenerationSettings(text_temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        copier.generate_text("the quick", max_new_tokens=0)
    with pytest.raises(ValueError, match="one token"):
        copier.generate_text("the quick", stop=["brown fox"])
    with pytest.raises(ValueError, match="empty"):
        copier.generate_text("")


def test_inverse_cdf_follows_the_probabilities() -> None:
    """Over many uniforms, each token is picked in proportion to its (top-k / top-p cut) probability."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    u = draw_uniforms(list(range(2000)), 1)[:, 0]
    for sampling, expected in [(TextSampling(1.0, 0, 1.0), [0.5, 0.3, 0.15, 0.05]),
                               (TextSampling(1.0, 2, 1.0), [0.625, 0.375, 0, 0]),
                               (TextSampling(1.0, 0, 0.7), [0.625, 0.375, 0, 0])]:
        picked = sampling.pick(logits.expand(len(u), -1), u)
        share = torch.bincount(picked, minlength=4).float() / len(u)
        assert torch.allclose(share, torch.tensor(expected), atol=0.04), (sampling, share)


# ---------------------------------------------------------------------- the reference checkpoint
@pytest.mark.parametrize("name", ["lm_text", "lm_text_padded"])
def test_first_text_token_logits_are_the_reference_logits(pipe: NextStepPipeline, expected10: dict, name: str
                                                          ) -> None:
    ids = expected10[f"{name}/input_ids"]
    mask = expected10.get(f"{name}/attention_mask", torch.ones_like(ids))
    expected = expected10[f"{name}/logits_last"][:, 0]
    trace: dict = {}
    sample_text(pipe.model, ids, mask, 1, TextSampling(0.0, 0, 1.0), torch.zeros(len(ids), 1), trace=trace)
    assert_close(trace["logits"][0], expected, 1e-5, "first-token logits (batched, left-padded)")
    # Through the pipeline: each prompt as plain text, the logits its first token is drawn from.
    for row in range(len(ids)):
        text = pipe.tokenizer.decode(ids[row][mask[row].bool()].tolist())
        trace = {}
        pipe.write([(Plain(text),)], [None], [0], pipe.settings, pipe.special_ids, 1, trace=trace)
        vocab = len(pipe.tokenizer)  # the padded rows of the LM head are never sampled
        assert_close(trace["logits"][0][:, :vocab], expected[row:row + 1, :vocab], 1e-5, f"{name} row {row}")
        assert torch.isinf(trace["logits"][0][:, vocab:]).all()


def test_think_on_a_model_never_trained_to_think(pipe: NextStepPipeline) -> None:
    prompts = ["a red circle", "two blue squares above a green triangle"]
    out = pipe(prompts, think=True, generator=11, num_images_per_prompt=2, thought_max_tokens=6)
    assert len(out.images) == 4 and all(im.size == (64, 64) for im in out.images)
    assert len(out.texts) == 4 and all(isinstance(t, str) and t == t.strip() for t in out.texts)
    # Each image's thought and image are those of its prompt and seed alone.
    alone = pipe(prompts[1], think=True, generator=12, thought_max_tokens=6)
    assert alone.texts[0] == out.texts[3]
    assert alone.images[0].tobytes() == out.images[3].tobytes()
    plain = pipe(prompts[0], generator=11)
    assert plain.texts == [""]


def test_the_thought_is_in_the_conditional_row_only(pipe: NextStepPipeline) -> None:
    s = pipe.settings.with_overrides(think=True, thought_max_tokens=5)
    (images,) = pipe.generate(["a red circle"], s, [3])
    ((i, _, (thought,)),) = list(pipe.iter_generate(["a red circle"], s, [3]))
    request = pipe.prepare("a red circle", None, 1, 3, s, plain=True, thoughts=[thought])
    enc = pipe.tokenizer.encode
    cond = enc("a red circle") + enc(THOUGHT_OPEN, plain=True) + enc(thought, plain=True)
    prefix = request.input_ids[0, request.attention_mask[0].bool()].tolist()
    assert prefix[:len(cond)] == cond and prefix[len(cond)] == pipe.tokenizer.image_area_id
    uncond = request.input_ids[1, request.attention_mask[1].bool()].tolist()
    assert uncond == pipe.tokenizer.encode(image_prefix(*request.grid))  # no caption, so no thought
    drawn = pipe.decode_tokens(pipe.sample_tokens(request), request.grid)[0]
    assert drawn.tobytes() == images[0].tobytes()


def test_given_thoughts_are_drawn_as_written_ones_would_be(pipe: NextStepPipeline) -> None:
    s = pipe.settings.with_overrides(think=True, thought_max_tokens=5)
    ((_, written_images, written),) = list(pipe.iter_generate(["a red circle"], s, [3], n=2))
    ((_, images, thoughts),) = list(pipe.iter_generate(["a red circle"], s, [3], n=2, thoughts=[written]))
    assert thoughts == written and [im.tobytes() for im in images] == [im.tobytes() for im in written_images]
    ((_, planned, thoughts),) = list(pipe.iter_generate(["a red circle"], s, [3], n=2,
                                                        thoughts=[["red circle top left", written[1]]]))
    assert thoughts == ["red circle top left", written[1]]
    assert planned[0].tobytes() != written_images[0].tobytes() and planned[1].tobytes() == written_images[1].tobytes()
    for bad, settings in (([["one"]], s), ([written], pipe.settings.with_overrides(think=False))):
        with pytest.raises(ValueError, match="thoughts: 2 for each of the 1 prompts, with settings that think"):
            list(pipe.iter_generate(["a red circle"], settings, [3], n=2, thoughts=bad))


def test_an_edit_thinks_before_its_target(pipe: NextStepPipeline) -> None:
    source = Image.new("RGB", (64, 64), "red")
    out = pipe("make it blue", image=source, think=True, generator=2, thought_max_tokens=4, source_image="last")
    assert len(out.images) == 1 and len(out.texts) == 1
    s = pipe.settings.with_overrides(source_image="last")
    row = pipe.thought_prompt("make it blue", source, s)
    ids = pipe.tokenizer.encode_row(row)
    assert ids[-len(pipe.tokenizer.encode(THOUGHT_OPEN)):] == pipe.tokenizer.encode(THOUGHT_OPEN)
    assert ids.index(pipe.tokenizer.image_area_id) > 0  # the source block stands before the thought


def test_fixed_length_edit_thoughts_are_the_training_rows_and_keep_the_copy_distance(pipe: NextStepPipeline) -> None:
    """With `edit_thought_tokens` an edit's prompt is the training row (`[data] edit_thought_tokens`) up
    to its target, and the target starts the same distance after the source whatever the thought."""
    tok, n = pipe.tokenizer, 48
    thoughts = ["red circle top left", "blue square middle centre, green triangle bottom right on a dark background"]
    assert len(tok.encode(thoughts[0], plain=True)) < len(tok.encode(thoughts[1], plain=True)) <= n
    s = pipe.settings.with_overrides(think_edits=True, source_image="last", edit_thought_tokens=n)
    collator = Collator(tok, caption_dropout=0.0, source_image="last", edit_thought_tokens=n)
    source = Image.new("RGB", (64, 64), "red")
    distances = set()
    for thought in thoughts:
        request = pipe.prepare("make it blue", source, 1, 3, s, plain=True, thoughts=[thought])
        prompt = request.input_ids[0, request.attention_mask[0].bool()].tolist()
        row = collator([{"key": "e", "instruction": "make it blue", "source": torch.zeros(3, 64, 64),
                         "target": torch.zeros(3, 64, 64), "plan": thought}])
        ids, labels = row["input_ids"][0].tolist(), row["labels"][0].tolist()
        assert prompt == ids[:len(prompt)] and ids[len(prompt)] == tok.placeholder_id
        boi = [i for i, t in enumerate(prompt) if t == tok.boi_id]
        distances.add(boi[1] - boi[0])
        pads = [i for i, t in enumerate(ids) if t == tok.pad_id]
        assert len(pads) == n - len(tok.encode(thought, plain=True))
        assert labels[pads[0]] == tok.pad_id and all(labels[i] == -100 for i in pads[1:])  # the first ends it
    assert len(distances) == 1
    # The row a thought is written after ends at THOUGHT_OPEN: the padding comes after the thought.
    written_after = tok.encode_row(pipe.thought_prompt("make it blue", source, s))
    assert written_after[-len(tok.encode(THOUGHT_OPEN)):] == tok.encode(THOUGHT_OPEN)
    assert tok.pad_id not in written_after
    # Unpadded (the default), the distance follows the thought's length.
    unpadded = set()
    for thought in thoughts:
        request = pipe.prepare("make it blue", source, 1, 3, s.with_overrides(edit_thought_tokens=0), plain=True,
                               thoughts=[thought])
        boi = (request.input_ids[0] == tok.boi_id).nonzero()[:, 0].tolist()
        unpadded.add(boi[1] - boi[0])
    assert len(unpadded) == 2
    # A written thought longer than the setting is cut; a training plan longer than it leaves its row out.
    long = pipe.prepare("make it blue", source, 1, 3, s.with_overrides(edit_thought_tokens=3), plain=True,
                        thoughts=[thoughts[1]])
    short = pipe.prepare("make it blue", source, 1, 3, s.with_overrides(edit_thought_tokens=3), plain=True,
                         thoughts=[" ".join(thoughts[1].split()[:1])])
    assert long.input_ids.shape[1] == short.input_ids.shape[1]
    tight = Collator(tok, caption_dropout=0.0, source_image="last", edit_thought_tokens=3)
    assert tight([{"key": "e", "instruction": "make it blue", "source": torch.zeros(3, 64, 64),
                   "target": torch.zeros(3, 64, 64), "plan": thoughts[1]}])["skipped"] == ["e"]


def test_an_edit_thought_followed_by_its_source_is_the_training_row(pipe: NextStepPipeline) -> None:
    """With `edit_source_after_thought` a planned edit's prompt is the training row (`[data]
    edit_source_after_thought`) up to its target: instruction, source, thought, source again; the
    target follows its second source as an unplanned target follows its only one, and the images of
    merged requests are those each request gives alone."""
    tok = pipe.tokenizer
    thoughts = ["red circle top left", "blue square middle centre, green triangle bottom right on a dark background"]
    s = pipe.settings.with_overrides(think_edits=True, source_image="last", edit_source_after_thought=True,
                                     thought_max_tokens=4)
    collator = Collator(tok, caption_dropout=0.0, source_image="last", edit_source_after_thought=True)
    source = Image.new("RGB", (64, 64), "red")
    unplanned = pipe.prepare("make it blue", source, 1, 3, s, plain=True)
    boi = (unplanned.input_ids[0] == tok.boi_id).nonzero()[:, 0].tolist()
    last_gap = {boi[-1] - boi[-2]}  # from the source's begin-of-image to the target's
    requests = []
    for thought in thoughts:
        request = pipe.prepare("make it blue", source, 2, 3, s, plain=True, thoughts=[thought, thought])
        requests.append(request)
        prompt = request.input_ids[0, request.attention_mask[0].bool()].tolist()
        row = collator([{"key": "e", "instruction": "make it blue", "source": torch.zeros(3, 64, 64),
                         "target": torch.zeros(3, 64, 64), "plan": thought}])
        ids = row["input_ids"][0].tolist()
        assert prompt == ids[:len(prompt)] and ids[len(prompt)] == tok.placeholder_id
        assert row["latents_mask"].tolist() == [0.0, 0.0, 1.0] and len(row["pixel_values"]) == 3
        boi = [i for i, t in enumerate(prompt) if t == tok.boi_id]
        assert len(boi) == 3  # source, source again, target
        last_gap.add(boi[2] - boi[1])
        # cond rows hold two sources each, uncond_1 rows one: 2 x 2 + 2 latents
        assert request.images_per_row == (2, 1) and request.latents.shape[0] == 6
        assert (request.input_ids == tok.placeholder_id).sum() == 6 * 16
    assert len(last_gap) == 1  # the target as far from a source as without a thought
    requests = [requests[0], pipe.prepare("make it red", Image.new("RGB", (64, 64), "blue"), 2, 4, s, plain=True,
                                          thoughts=[thoughts[0]] * 2)]
    merged = pipe.sample_tokens(merge_requests(requests))
    alone = torch.cat([pipe.sample_tokens(r) for r in requests])
    torch.testing.assert_close(merged, alone, rtol=0, atol=1e-4)  # batch size: float reassociation only
    # The whole call: a written thought, then the source again (the row it is written after ends at
    # THOUGHT_OPEN, so the thought is not cut short by the repeated source).
    out = pipe("make it blue", image=source, generator=2, **{k: getattr(s, k) for k in (
        "think_edits", "source_image", "edit_source_after_thought", "thought_max_tokens")})
    assert len(out.images) == 1 and out.texts[0] == out.texts[0].strip()
    written_after = tok.encode_row(pipe.thought_prompt("make it blue", source, s))
    assert written_after.count(tok.boi_id) == 1
    with pytest.raises(InvalidSettings, match="edit_thought_tokens and edit_source_after_thought"):
        s.with_overrides(edit_thought_tokens=8)
    with pytest.raises(ValueError, match="choose one"):
        Collator(tok, edit_thought_tokens=8, edit_source_after_thought=True)


def test_think_is_for_text_to_image_and_think_edits_for_edits(pipe: NextStepPipeline, monkeypatch) -> None:
    """A model may plan captions and not edits: each kind reads its own setting, and a call's `think=`
    (the CLI's and the API's `--think`/`think`) asks for its own kind."""
    source = Image.new("RGB", (64, 64), "red")
    written = []
    write_thoughts = pipe.write_thoughts
    monkeypatch.setattr(pipe, "write_thoughts",
                        lambda prompts, *a: written.append(prompts) or write_thoughts(prompts, *a))
    captions_only = pipe.settings.with_overrides(think=True, thought_max_tokens=4, source_image="last")
    ((_, edited, thoughts),) = list(pipe.iter_generate(["make it blue"], captions_only, [2], images=[source]))
    assert written == [] and thoughts == [""]
    plain = pipe("make it blue", image=source, generator=2, source_image="last")
    assert edited[0].tobytes() == plain.images[0].tobytes()
    ((_, _, thoughts),) = list(pipe.iter_generate(["a red circle"], captions_only, [2]))
    assert written == [["a red circle"]]
    edits_only = captions_only.with_overrides(think=False, think_edits=True)
    ((_, edited, thoughts),) = list(pipe.iter_generate(["make it blue"], edits_only, [2], images=[source]))
    assert written[1:] == [["make it blue"]]
    asked = pipe("make it blue", image=source, think=True, generator=2, thought_max_tokens=4, source_image="last")
    assert asked.texts == thoughts and asked.images[0].tobytes() == edited[0].tobytes()
    assert pipe("a red circle", generator=2, think_edits=True).texts == [""] and len(written) == 3


# ---------------------------------------------------------------------- CLI and server
def test_cli_prints_and_saves_each_thought(pipe: NextStepPipeline, ref10: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "model"
    shutil.copytree(ref10 / "model", model)
    shutil.copytree(ref10 / "vae", model / "vae")
    (model / "generation_defaults.json").write_text(json.dumps(
        {"hw": [64, 64], "num_sampling_steps": STEPS, "cfg": 3.0, "thought_max_tokens": 5}))
    out = tmp_path / "t.png"
    assert main(["generate", "a red circle", "--model", str(model), "--think", "-n", "2", "--seed", "4",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    expected = pipe("a red circle", think=True, generator=4, num_images_per_prompt=2, thought_max_tokens=5).texts
    for k in range(2):
        assert (tmp_path / f"t_{k}.txt").read_text(encoding="utf-8") == expected[k] + "\n"
        assert f"thought: {expected[k]}" in printed
    assert main(["generate", "a red circle", "--model", str(model), "-o", str(tmp_path / "plain.png")]) == 0
    assert not (tmp_path / "plain.txt").exists()  # no thought, no text file


def test_engine_thinks_then_draws_as_the_pipeline_does(pipe: NextStepPipeline) -> None:
    s = pipe.settings.with_overrides(think=True, thought_max_tokens=5)
    engine = Engine(pipe, slots=2, max_queue=8, gather_s=0.05)
    try:
        futures = engine.submit("a red circle", [21, 22], s) + engine.submit("a red circle", [23], pipe.settings)
        got = [f.result(120) for f in futures]
    finally:
        engine.close()
    (images,) = pipe.generate(["a red circle"], s, [21], n=2)
    ((_, _, thoughts),) = list(pipe.iter_generate(["a red circle"], s, [21], n=2))
    assert [im.info.get("thought") for im in got] == [*thoughts, None]
    # Up to one level: the engine calls 2 slots, the pipeline draws a thought of its own length alone
    # (float32 matmuls may round differently at another batch size, see tests/test_cli.py `close`).
    assert all(np.abs(np.asarray(a, np.int16) - np.asarray(b)).max() <= 1 for a, b in zip(got, images))


def test_api_returns_each_thought_as_revised_prompt(pipe: NextStepPipeline) -> None:
    import httpx

    from .serving import API_KEY, serve

    s = pipe.settings.with_overrides(think=True)
    ((_, _, thoughts),) = list(pipe.iter_generate(["a red circle"], s, [31], n=2))
    with serve(pipe, slots=2) as served:
        body = {"prompt": "a red circle", "n": 2, "seed": 31, "size": "64x64", "think": True}
        r = httpx.post(served.url + "/v1/images/generations", json=body,
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
        assert r.status_code == 200, r.text
        assert [d["revised_prompt"] for d in r.json()["data"]] == thoughts
        r = httpx.post(served.url + "/v1/images/generations", json={**body, "think": False},
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
        assert [d["revised_prompt"] for d in r.json()["data"]] == [None, None]
        # An edit's `think` form field is the edits' setting (think_edits).
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
        source = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        edit_s = pipe.settings.with_overrides(think_edits=True)
        ((_, _, thoughts),) = list(pipe.iter_generate(["make it blue"], edit_s, [5], n=1, images=[source]))
        r = httpx.post(served.url + "/v1/images/edits", headers={"Authorization": f"Bearer {API_KEY}"},
                       data={"prompt": "make it blue", "seed": "5", "think": "true"},
                       files={"image": ("s.png", buf.getvalue(), "image/png")}, timeout=120)
        assert r.status_code == 200, r.text
        assert [d["revised_prompt"] for d in r.json()["data"]] == thoughts
