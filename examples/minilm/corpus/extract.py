"""Writes wordnet-examples.txt from WordNet 3.0's data files (see README.md).

Usage: python3 extract.py DIR > wordnet-examples.txt, where DIR holds data.noun, data.verb,
data.adj and data.adv (Debian's wordnet-base puts them in /usr/share/wordnet).
"""
import re
import sys

MIN_WORDS = 6  # shorter examples are mostly phrases ("only superficial differences")
EVERY = 5  # keeps the file near 230 KB


def key(sentence):
    return " ".join(re.findall(r"[a-z0-9']+", sentence.lower()))


def main(folder):
    seen, examples = set(), []
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
                        examples.append(sentence)
    for sentence in examples[::EVERY]:
        print(sentence)


if __name__ == "__main__":
    main(sys.argv[1])
