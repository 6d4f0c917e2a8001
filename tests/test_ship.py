"""`python -m nextstep.training.ship`: reshipping a model keeps the card that ships with it."""

from __future__ import annotations

import json

from nextstep.pipeline import SHIPPED_MODEL
from nextstep.training.ship import main as ship_main


def test_ship_takes_its_card_and_defaults_from_the_destination(tmp_path):
    """recipes/shapes/build.sh ships with `--card nextstep/assets/shapes/MODEL_CARD.md`, the
    destination's own card: it is read before the destination is replaced, so it survives whole."""
    dest = tmp_path / "shapes"
    dest.mkdir()
    card = "# a card\n\nkept as it is, byte for byte: é\n"
    (dest / "MODEL_CARD.md").write_text(card)
    (dest / "generation_defaults.json").write_text(json.dumps({"cfg": 2.5}))
    (dest / "stale.txt").write_text("from the previous ship")
    assert ship_main([str(SHIPPED_MODEL), str(dest), "--defaults", str(dest / "generation_defaults.json"),
                      "--card", str(dest / "MODEL_CARD.md")]) == 0
    assert (dest / "MODEL_CARD.md").read_text() == card
    assert json.loads((dest / "generation_defaults.json").read_text()) == {"cfg": 2.5}
    assert (dest / "model.safetensors").is_file() and (dest / "vae" / "config.json").is_file()
    assert not (dest / "stale.txt").exists()  # the destination is replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # no temporary or old folder left
