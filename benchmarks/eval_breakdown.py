"""Break an evaluation's answers down beyond its report (CPU, reads the per-sample JSONL).

python benchmarks/eval_breakdown.py [benchmarks/results/eval_smollm2_cpu/results.jsonl]

Prints (1) ring against dense: on how many paired samples (same task, length, sample, prompt)
ring generated exactly dense's tokens (an exact method: any difference is a bug); (2) star's
correct answers by the context block that holds the needle (block = needle depth x context
tokens // block size), beside dense's on the same samples; (3) each task's mean score for
dense and star (4 blocks, full anchor) per length, over the samples both answered (the README's
compact table).
"""
import collections
import json
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def ring_vs_dense(rows):
    dense = {(r["task"], r["length"], r["sample"], r["prompt_sha256"]): r for r in rows
             if r["method"] == "dense"}
    cells = collections.defaultdict(lambda: [0, 0])
    for r in rows:
        if r["method"] != "ring":
            continue
        d = dense.get((r["task"], r["length"], r["sample"], r["prompt_sha256"]))
        if d is None:
            continue
        cell = cells[(r["task"], r["length"])]
        cell[0] += r["tokens"] == d["tokens"]
        cell[1] += 1
    return dict(cells)


def by_needle_block(rows, tasks=("passkey", "niah_single")):
    dense = {(r["task"], r["length"], r["sample"]): r["correct"] for r in rows
             if r["method"] == "dense"}
    out = collections.defaultdict(lambda: [0, 0, 0])     # star correct, dense correct, n
    for r in rows:
        if r["method"] != "star" or r["task"] not in tasks or r.get("depth") is None:
            continue
        key = (r["task"], r["length"], r["sample"])
        if key not in dense:
            continue
        block = min(int(r["depth"] * r["context_tokens"]) // r["block_size"], r["blocks"] - 1)
        cell = out[(r["task"], r["length"], block + 1)]
        cell[0] += bool(r["correct"])
        cell[1] += bool(dense[key])
        cell[2] += 1
    return dict(out)


def paired_scores(rows, methods=("dense", "star")):
    """{(task, length): (mean score per method, n)} over samples every method answered."""
    by = collections.defaultdict(dict)
    for r in rows:
        if r["method"] in methods:
            by[(r["task"], r["length"], r["sample"])][r["method"]] = r["score"]
    cells = collections.defaultdict(list)
    for (task, length, _), scores in by.items():
        if len(scores) == len(methods):
            cells[(task, length)].append([scores[m] for m in methods])
    return {key: (tuple(sum(col) / len(v) for col in zip(*v)), len(v)) for key, v in cells.items()}


def main(argv):
    path = argv[1] if len(argv) > 1 else "benchmarks/results/eval_smollm2_cpu/results.jsonl"
    rows = load(path)
    print(f"{len(rows)} answers in {path}\n")
    print("| task | length | ring tokens == dense tokens |\n| --- | --- | --- |")
    total = [0, 0]
    for (task, length), (same, n) in sorted(ring_vs_dense(rows).items()):
        print(f"| {task} | {length} | {same}/{n} |")
        total[0] += same
        total[1] += n
    print(f"| all | | {total[0]}/{total[1]} |\n")
    print("| task | length | needle in block | star correct | dense correct |\n| --- | --- | --- | --- | --- |")
    for (task, length, block), (s, d, n) in sorted(by_needle_block(rows).items()):
        print(f"| {task} | {length} | {block} | {s}/{n} | {d}/{n} |")
    cells = paired_scores(rows)
    lengths = sorted({length for _, length in cells})
    print("\n| task | " + " | ".join(f"{length // 1024}k dense / star (n)" for length in lengths)
          + " |\n| --- |" + " --- |" * len(lengths))
    for task in sorted({task for task, _ in cells}):
        row = []
        for length in lengths:
            hit = cells.get((task, length))
            row.append(f"{hit[0][0]:.2f} / {hit[0][1]:.2f} ({hit[1]})" if hit else "-")
        print(f"| {task} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv)
