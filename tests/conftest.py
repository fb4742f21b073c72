import os

# no hub access in tests, no progress bars in the logs, one thread (the machine is shared)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import json  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

DIGITS_EN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS_ZH = "零一二三四五六七八九"


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """English digit words -> Chinese digits ("three one four" -> "三一四"): learnable in seconds."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ds = [rng.randrange(10) for _ in range(rng.randint(2, 6))]
        out.append({"en": " ".join(DIGITS_EN[d] for d in ds) + " .", "zh": "".join(DIGITS_ZH[d] for d in ds) + "。"})
    return out


@pytest.fixture
def digits_file(tmp_path):
    path = tmp_path / "digits.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in synthetic_pairs(600)))
    return path



def pytest_collection_modifyitems(session, config, items):
    """The longest files first (they set ``RUN_FIRST = n``, the larger the earlier): with one pytest-xdist worker
    per core (`make test`) a long file that starts last keeps one core busy alone at the end; started first, the
    short files fill the other core around it. A stable sort: the rest keep their order."""
    items.sort(key=lambda item: -getattr(getattr(item, "module", None), "RUN_FIRST", 0))
