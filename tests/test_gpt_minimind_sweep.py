"""gpt_minimind/sweep.py: which points share a shape and differ only in their vocabulary, where their
tokenizers live, and that the picture draws both layouts (the trainings themselves are train_pretrain's)."""

from pathlib import Path

from gpt_minimind import sweep


def _row(name: str, vocab: int, n_params: int, loss: float) -> dict:
    C, L, _, _, batch = sweep.GRID[name][:5]
    return {"name": name, "hidden_size": C, "num_hidden_layers": L, "batch_size": batch, "n_params": n_params,
            "tokens_seen": 4e6, "valid_loss": loss, "bigram_valid_loss": 6.2, "trigram_valid_loss": 5.6,
            "dtype": "bfloat16", "vocab_size": vocab, "valid_nats_per_char": loss * 0.75,
            "bigram_nats_per_char": 4.7, "trigram_nats_per_char": 4.2}


def test_vocabulary_points_train_their_own_tokenizer_and_form_one_family():
    cfg = sweep.SweepConfig(tokenizer_dir="tok", out_dir="out")
    assert sweep.point_vocab("w128_l2") == 0 and sweep.point_vocab("w128_l2_v3200") == 3200
    assert sweep.point_tokenizer_dir("w128_l2", cfg) == Path("tok")
    assert sweep.point_tokenizer_dir("w128_l2_v3200", cfg) == Path("out/tokenizer_v3200")
    rows = [_row("w128_l4", 6400, 1_600_000, 5.9), _row("w128_l2_v12800", 12800, 2_000_000, 5.9),
            _row("w128_l2", 6400, 1_200_000, 5.8), _row("w128_l2_v3200", 3200, 800_000, 5.5)]
    assert [r["name"] for r in sweep.vocabulary_family(rows)] == ["w128_l2_v3200", "w128_l2", "w128_l2_v12800"]
    assert sweep.vocabulary_family(rows[:1] + rows[2:3]) == []  # no vocabulary point, no family


def test_the_picture_draws_with_and_without_vocabulary_points(tmp_path):
    import matplotlib.image

    rows = [_row("w128_l4", 6400, 1_600_000, 5.9), _row("w128_l2", 6400, 1_200_000, 5.8)]
    sweep.draw(rows, tmp_path / "two.png", 240)
    sweep.draw(rows + [_row("w128_l2_v3200", 3200, 800_000, 5.5)], tmp_path / "three.png", 240,
               mark={"name": "default", "n_params": 1_200_000, "tokens_seen": 1e7, "valid_loss": 5.4})
    two, three = (matplotlib.image.imread(tmp_path / f) for f in ("two.png", "three.png"))
    assert three.shape[1] > two.shape[1]  # the third panel: nats per character against the vocabulary
