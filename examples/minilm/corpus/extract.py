"""Writes wordnet-examples.txt from WordNet 3.0's data files (see README.md).

Usage: python3 extract.py DIR > wordnet-examples.txt, where DIR holds data.noun, data.verb,
data.adj and data.adv (Debian's wordnet-base puts them in /usr/share/wordnet).

`--every N` keeps every Nth example instead of every fifth (1: all of them, 1.1 MB; for
$FACTORIZE_MINILM_CORPUS, not for the repository); `--held-out sentences.json` then drops the
examples that share a run of four words with a held-out sentence (120-159), as the shipped
file's test demands.
"""
import argparse
import json
import re

MIN_WORDS = 6  # shorter examples are mostly phrases ("only superficial differences")
EVERY = 5  # keeps the file near 230 KB
HELD_OUT = slice(120, 160)
RUN = 4  # words in a row that a line may not share with a held-out sentence


def words(sentence):
    return re.findall(r"[a-z0-9']+", sentence.lower())


def key(sentence):
    return " ".join(words(sentence))


def runs(sentence):
    w = words(sentence)
    return {tuple(w[i : i + RUN]) for i in range(len(w) - RUN + 1)}


def held_out_runs(path):
    """The runs of RUN words of the held-out sentences of sentences.json at `path`."""
    with open(path) as f:
        held_out = json.load(f)["sentences"][HELD_OUT]
    return set().union(*map(runs, held_out))


def examples(folder):
    seen, found = set(), []
    for pos in ["noun", "verb", "adj", "adv"]:
        with open(f"{folder}/data.{pos}", encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                gloss = line.split("|", 1)[1]
                for quoted in re.findall(r'"([^"]+)"', gloss):
                    sentence = " ".join(quoted.split())
                    if len(sentence.split()) >= MIN_WORDS and key(sentence) not in seen:
                        seen.add(key(sentence))
                        found.append(sentence)
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--every", type=int, default=EVERY)
    parser.add_argument("--held-out", metavar="SENTENCES_JSON")
    args = parser.parse_args()
    kept = examples(args.dir)[:: args.every]
    if args.held_out:
        banned = held_out_runs(args.held_out)
        kept = [s for s in kept if not runs(s) & banned]
    for sentence in kept:
        print(sentence)


if __name__ == "__main__":
    main()
