"""Real-data loaders: buckets, folder, JSONL, WebDataset shards (local and http), splitting, resume, bad input."""

from __future__ import annotations

import functools
import http.server
import io
import json
import logging
import math
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from nextstep.cli import main
from nextstep.data import (
    OFFICIAL_HW_UNITS,
    Collator,
    DataError,
    FolderDataset,
    JsonlDataset,
    ShardDataset,
    ShardWriter,
    buckets,
    closest_bucket,
    expand_braces,
    fit_to_bucket,
    open_dataset,
)
from nextstep.data.stream import StreamDataset, is_bookkeeping
from nextstep.shapes.grammar import parse_caption, parse_instruction
from nextstep.shapes.tokenizer import shapes_tokenizer



def _png(path: Path, size=(40, 30), colour=(200, 10, 10), mode="RGB") -> None:
    Image.new(mode, size, colour if mode == "RGB" else colour + (128,)).save(path)


def _run(dataset: StreamDataset, workers: int = 0, batch_size: int = 4, limit: int | None = None) -> list[dict]:
    """Iterate like a training loop (collated batches, positions marked), returning the samples' keys/batches."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=list)
    seen = []
    for batch in loader:
        dataset.mark_consumed(batch)
        seen += [s for s in batch if not is_bookkeeping(s)]
        if limit is not None and len(seen) >= limit:
            break
    return seen


# ---------------------------------------------------------------------- buckets
def test_buckets_are_the_official_list_at_256_and_512():
    assert buckets(256) == tuple((16 * h, 16 * w) for h, w in OFFICIAL_HW_UNITS)
    assert buckets(512) == tuple((32 * h, 32 * w) for h, w in OFFICIAL_HW_UNITS)
    for base in (256, 512):
        for h, w in buckets(base):
            assert abs(h * w / base**2 - 1) < 0.05  # about the base area
    assert (128, 512) in buckets(256) and (512, 128) in buckets(256)  # 1:4 to 4:1


@pytest.mark.parametrize("base", [64, 128, 192, 256, 384])
def test_buckets_are_whole_tokens(base):
    bs = buckets(base)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in bs)
    assert len(set(bs)) == len(bs) and (base, base) in bs
    assert {(w, h) for h, w in bs} == set(bs)  # every portrait bucket has its landscape twin


def test_closest_bucket_matches_aspect_in_log_space():
    assert closest_bucket(1000, 1000, 256) == (256, 256)
    assert closest_bucket(100, 400, 256) == (128, 512)
    assert closest_bucket(400, 100, 256) == (512, 128)
    assert closest_bucket(100, 10000, 256) == (128, 512)  # beyond 1:4 clamps to the widest
    h, w = closest_bucket(300, 450, 256)  # 2:3
    assert abs(math.log(h / w) - math.log(2 / 3)) < 0.06
    for bad in (0, 100, -16, 250):
        with pytest.raises(ValueError, match="multiple of 16"):
            buckets(bad)
    with pytest.raises(ValueError, match="positive"):
        closest_bucket(0, 10, 256)


def test_fit_to_bucket_covers_then_centre_crops():
    # 300x100, left third red, middle green, right third blue; a square bucket keeps the middle.
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, :100] = (255, 0, 0)
    arr[:, 100:200] = (0, 255, 0)
    arr[:, 200:] = (0, 0, 255)
    out = np.asarray(fit_to_bucket(Image.fromarray(arr), (64, 64)))
    assert out.shape == (64, 64, 3)
    assert (out[:, 8:56, 1] > 200).all() and (out[:, 8:56, 0] < 50).all()
    wide = fit_to_bucket(Image.fromarray(arr), closest_bucket(100, 300, 256))
    assert wide.size == (448, 144)  # trains at its own aspect ratio, ~the base area


# ---------------------------------------------------------------------- folder and JSONL
@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    (root / "nested").mkdir(parents=True)
    _png(root / "a.jpg", (64, 64))
    (root / "a.txt").write_text("a red square\n")
    _png(root / "b.png", (200, 50))
    (root / "b.json").write_text(json.dumps({"caption": "a wide thing", "other": 1}))
    _png(root / "nocaption.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    (root / "corrupt.txt").write_text("broken")
    (root / "orphan.txt").write_text("text with no image")
    _png(root / "nested" / "photo.2023.png", (30, 60))
    (root / "nested" / "photo.2023.txt").write_text("tall")
    _png(root / "alpha.png", (32, 32), (0, 0, 255), mode="RGBA")
    (root / "alpha.json").write_text(json.dumps({"text": ["first caption", "second"]}))
    (root / "empty.png").write_bytes(b"")
    (root / "empty.txt").write_text("   ")
    return root


def test_folder_loader_reads_sidecars_and_skips_bad_samples(folder, caplog):
    ds = FolderDataset(folder, resolution=64, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="nextstep.data"):
        samples = _run(ds)
    got = {s["key"]: s for s in samples}
    assert set(got) == {"a", "b", "nested/photo.2023", "alpha"}
    assert got["a"]["caption"] == "a red square" and got["b"]["caption"] == "a wide thing"
    assert got["alpha"]["caption"] == "first caption"
    assert got["a"]["pixels"].shape == (3, 64, 64)
    assert got["b"]["pixels"].shape == (3, 32, 128)  # 4:1 -> the widest bucket
    assert got["nested/photo.2023"]["pixels"].shape == (3, 96, 48)
    assert got["alpha"]["pixels"][:, 0, 0].tolist() == pytest.approx([-1 + 2 * 127 / 255, -1 + 2 * 127 / 255, 1],
                                                                    abs=0.02)  # half-transparent blue on white
    assert ds.stats == {"missing caption": 1, "unreadable (UnidentifiedImageError)": 1, "missing image": 1,
                        "empty caption": 1}
    assert "corrupt" in caplog.text and "missing caption" in caplog.text
    assert ds.consumed == 4 and ds.state_dict()["done"]["items"] == {"prefix": 8, "extra": []}


def test_jsonl_loader(tmp_path):
    _png(tmp_path / "x.png", (64, 32))
    lines = [
        json.dumps({"file": "x.png", "caption": "first", "labels": {"ignored": True}}),
        "{not json",
        json.dumps({"image": str(tmp_path / "x.png"), "text": "absolute path"}),
        json.dumps({"file": "missing.png", "caption": "no such file"}),
        json.dumps({"file": "x.png"}),
        "",
        json.dumps(["a", "list"]),
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    ds = JsonlDataset(tmp_path / "m.jsonl", resolution=64, shuffle=False)
    samples = _run(ds)
    assert [s["caption"] for s in samples] == ["first", "absolute path"]
    assert samples[0]["pixels"].shape == (3, 48, 96)  # 1:2 at base 64
    assert sum(ds.stats.values()) == 4 and ds.stats["bad manifest line"] == 2
    assert ds.stats["unreadable (FileNotFoundError)"] == 1
    with pytest.raises(FileNotFoundError):
        JsonlDataset(tmp_path / "nope.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no lines"):
        JsonlDataset(tmp_path / "blank.jsonl")


def test_jsonl_plans_reach_the_rows_between_caption_and_image(tmp_path):
    """A manifest line's optional "plan" (a thought) goes into the sample and the collated row reads
    caption + THOUGHT_OPEN + plan + image block; a plan that is not text is a skipped line."""
    from nextstep.text import THOUGHT_OPEN

    _png(tmp_path / "x.png", (32, 32))
    lines = [json.dumps({"file": "x.png", "caption": "a red circle", "plan": " red circle top left "}),
             json.dumps({"file": "x.png", "caption": "no plan"}),
             json.dumps({"file": "x.png", "caption": "bad plan", "plan": 3})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    ds = JsonlDataset(tmp_path / "m.jsonl", resolution=32, shuffle=False)
    samples = _run(ds)
    assert [(s["caption"], s.get("plan")) for s in samples] == [("a red circle", "red circle top left"),
                                                               ("no plan", None)]
    assert ds.stats["bad plan"] == 1
    tokenizer = shapes_tokenizer()
    ids = Collator(tokenizer, token_pixels=16)([{**samples[0], "key": "k"}])["input_ids"][0].tolist()
    thought = tokenizer.encode(THOUGHT_OPEN) + tokenizer.encode("red circle top left")
    assert any(ids[i:i + len(thought)] == thought for i in range(len(ids)))


def test_edit_triplets_from_folder_and_jsonl(tmp_path):
    root = tmp_path / "edits"
    root.mkdir()
    _png(root / "e1.source.png", (64, 64), (1, 2, 3))
    _png(root / "e1.target.png", (64, 64), (250, 2, 3))
    (root / "e1.txt").write_text("make it red")
    _png(root / "e2.src.jpg", (96, 64))
    _png(root / "e2.tgt.jpg", (64, 128))  # the source is fitted to the target's bucket
    (root / "e2.json").write_text(json.dumps({"instruction": "<image> turn it"}))
    _png(root / "e3.source.png")
    (root / "e3.txt").write_text("no target")
    ds = FolderDataset(root, resolution=64, task="edit", shuffle=False)
    got = {s["key"]: s for s in _run(ds)}
    assert set(got) == {"e1", "e2"} and ds.stats == {"missing target image": 1}
    assert got["e1"]["instruction"] == "make it red"
    assert got["e2"]["source"].shape == got["e2"]["target"].shape == (3, 96, 48)
    out = tmp_path / "cli"
    main(["data", "shapes", "--out", str(out), "--num", "6", "--edits"])
    samples = _run(JsonlDataset(out / "manifest.jsonl", resolution=64, task="edit"))
    assert len(samples) == 6 and all(parse_instruction(s["instruction"]) for s in samples)


# ---------------------------------------------------------------------- WebDataset shards
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """9 shards of 60 shapes samples (the last shard short), and each key's caption."""
    out = tmp_path_factory.mktemp("wds")
    assert main(["data", "shapes", "--out", str(out), "--num", "60", "--size", "64", "--seed", "8",
                 "--format", "webdataset", "--shard-size", "7"]) == 0
    folder = tmp_path_factory.mktemp("ref")
    main(["data", "shapes", "--out", str(folder), "--num", "60", "--size", "64", "--seed", "8"])
    truth = {Path(json.loads(x)["file"]).stem: json.loads(x)["caption"]
             for x in (folder / "manifest.jsonl").read_text().splitlines()}
    return out, truth


PATTERN = "shapes-{000000..000008}.tar"


def test_brace_expansion():
    assert expand_braces("a-{0..2}.tar") == ["a-0.tar", "a-1.tar", "a-2.tar"]
    assert expand_braces("s{008..010}") == ["s008", "s009", "s010"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad, why in (("x{1..}", "digits"), ("x{5..2}", "before it starts"), ("x{1..2", "unbalanced")):
        with pytest.raises(DataError, match=why):
            expand_braces(bad)


def test_two_ranks_two_workers_yield_every_sample_exactly_once(shards):
    out, truth = shards
    keys = []
    for rank in (0, 1):
        ds = ShardDataset(str(out / PATTERN), resolution=64, seed=1, shuffle_buffer=10, rank=rank, world_size=2)
        for s in _run(ds, workers=2):
            keys.append(s["key"])
            assert s["caption"] == truth[s["key"]] and s["pixels"].shape == (3, 64, 64)
        assert not ds.stats
    assert sorted(keys) == sorted(truth) and len(keys) == 60


def test_epochs_reshuffle_but_keep_the_sample_set(shards):
    out, _ = shards
    ds = ShardDataset(str(out / PATTERN), resolution=64, seed=1)
    first = [s["key"] for s in _run(ds)]
    ds.set_epoch(1)
    second = [s["key"] for s in _run(ds)]
    assert first != second and sorted(first) == sorted(second)


def test_resume_from_a_saved_position_has_no_repeats_or_gaps(shards):
    out, _ = shards

    def make() -> ShardDataset:
        return ShardDataset(str(out / PATTERN), resolution=64, seed=3, shuffle_buffer=5, rank=0, world_size=2)

    everything = sorted(s["key"] for s in _run(make(), workers=2))
    ds = make()
    before = [s["key"] for s in _run(ds, workers=2, limit=12)]  # stops with workers mid-shard
    state = json.loads(json.dumps(ds.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    after = [s["key"] for s in _run(resumed, workers=1)]  # a different worker count is fine
    assert not set(before) & set(after)
    assert sorted(before + after) == everything
    assert resumed.state_dict()["consumed"] == len(everything)


def test_resume_refuses_another_setup(shards):
    out, _ = shards
    ds = ShardDataset(str(out / PATTERN), resolution=64, rank=0, world_size=2)
    state = ds.state_dict()
    with pytest.raises(DataError, match="world_size"):
        ShardDataset(str(out / PATTERN), resolution=64, rank=0, world_size=4).load_state_dict(state)
    with pytest.raises(DataError, match="not a saved data position"):
        ds.load_state_dict({"epoch": 3})
    sample = next(iter(ds))
    ds.set_epoch(1)
    with pytest.raises(DataError, match="epoch"):
        ds.mark_consumed(sample)


@pytest.fixture()
def http_server(shards):
    out, _ = shards
    handler = functools.partial(_QuietHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_shards_stream_over_http_and_a_missing_one_is_skipped(http_server, shards):
    _, truth = shards
    urls = [f"{http_server}/{PATTERN}", f"{http_server}/no-such-shard.tar"]
    ds = ShardDataset(urls, resolution=64, seed=2)
    keys = [s["key"] for s in _run(ds, workers=2)]
    assert sorted(keys) == sorted(truth)
    assert ds.stats == {"unreadable shard (HTTPError)": 1}


def test_bad_shards_are_skipped_and_counted(shards, tmp_path, caplog):
    out, truth = shards
    (tmp_path / "empty.tar").write_bytes(b"")
    with tarfile.open(tmp_path / "no-members.tar", "w"):
        pass
    data = (out / "shapes-000001.tar").read_bytes()
    (tmp_path / "truncated.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file" * 100)
    with ShardWriter(tmp_path, "nothing"):
        pass  # no samples: no shard
    assert not list(tmp_path.glob("nothing-*"))
    with ShardWriter(tmp_path, "mixed") as w:
        w.write("ok", {"png": _blank_png(), "txt": "a circle"})
        w.write("nocap", {"png": _blank_png()})
        w.write("badimg", {"png": b"junk", "txt": "a square"})
    names = ["empty.tar", "no-members.tar", "truncated.tar", "garbage.tar", "mixed-000000.tar"]
    ds = ShardDataset([str(tmp_path / n) for n in names] + [str(out / "shapes-000000.tar")], resolution=64)
    with caplog.at_level(logging.WARNING, logger="nextstep.data"):
        keys = [s["key"] for s in _run(ds)]  # in-process, so the log is captured here
    assert len(keys) == len(set(keys))
    shard0 = {f"{k:06d}" for k in range(7)}
    truncated = set(keys) - shard0 - {"ok"}
    assert shard0 | {"ok"} <= set(keys) and truncated <= {f"{k:06d}" for k in range(7, 14)}
    assert ds.stats == {"empty shard": 2, "unreadable shard (ReadError)": 2, "missing caption": 1,
                        "unreadable (UnidentifiedImageError)": 1}
    assert "empty shard" in caplog.text and "garbage.tar" in caplog.text
    with pytest.raises(FileNotFoundError, match="not found"):
        ShardDataset(str(tmp_path / "none-{0..3}.tar"))


def _blank_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (245, 245, 245)).save(buf, format="PNG")
    return buf.getvalue()


def test_edit_shards(tmp_path):
    out = tmp_path / "edits"
    main(["data", "shapes", "--out", str(out), "--num", "9", "--edits", "--format", "webdataset",
          "--shard-size", "4"])
    ds = open_dataset(str(out / "shapes-{000000..000002}.tar"), resolution=64, task="edit")
    assert isinstance(ds, ShardDataset)
    samples = _run(ds)
    assert len(samples) == 9
    assert all(s["source"].shape == s["target"].shape == (3, 64, 64) for s in samples)


def test_open_dataset_dispatch(tmp_path, folder):
    assert isinstance(open_dataset(folder, 64), FolderDataset)
    main(["data", "shapes", "--out", str(tmp_path / "s"), "--num", "2"])
    assert isinstance(open_dataset(tmp_path / "s" / "manifest.jsonl", 64), JsonlDataset)
    with pytest.raises(ValueError, match="task"):
        open_dataset(folder, 64, task="video")


def test_collated_batches_keep_the_position(shards):
    """The Collator passes the bookkeeping through, so mark_consumed works on real batches."""
    out, truth = shards
    tok = shapes_tokenizer()  # built in memory: no fixture needed
    ds = ShardDataset(str(out / PATTERN), resolution=64)
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=Collator(tok))
    n = 0
    for batch in loader:
        ds.mark_consumed(batch)
        n += batch["input_ids"].shape[0]
    assert n == len(truth) == ds.consumed
    assert all(parse_caption(c) for c in truth.values())
